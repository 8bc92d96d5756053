//! The bad-input suite: what a broken or hostile client (or peer) sends, each case with the
//! answer it must get — an error frame, a nack, a close code, an HTTP status, a closed
//! socket — and never a panic, a hang, or a lost message for anyone else. Two real nodes
//! joined by the backbone run it in token mode, while a well-behaved publisher on one node
//! and a subscriber on the other exchange a steady stream that must arrive whole, in order.

use crate::common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{WAIT, close_code, cluster, http_with};
use futures_util::{SinkExt, StreamExt};
use tern_client::{Client, ClientOptions, Event};
use tern_edge::auth::{AuthMode, Claims, Operation, mint_hs256};
use tern_proto::close;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const SECRET: &str = "bad-input-suite-secret-0123456789abcdefghij";
const MAX_MESSAGE: usize = 1024;
/// The smallest frame limit the node accepts for `MAX_MESSAGE`: the suite checks it carries
/// every payload the message limit allows, however escaped.
const MAX_FRAME: usize = tern_edge::config::min_frame_bytes(MAX_MESSAGE);

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A token for `sub` allowing `caps` (pattern → operations), expiring at `exp`.
fn token_with(sub: &str, exp: u64, caps: &[(&str, &[Operation])]) -> String {
    let capability: BTreeMap<String, Vec<Operation>> =
        caps.iter().map(|(p, ops)| ((*p).to_owned(), ops.to_vec())).collect();
    mint_hs256(SECRET, &Claims { sub: sub.into(), exp, iat: Some(now()), capability }).unwrap()
}

fn chat_token(sub: &str) -> String {
    token_with(
        sub,
        now() + 3600,
        &[
            ("chat:*", &[Operation::Subscribe, Operation::Publish]),
            ("log:*", &[Operation::Subscribe, Operation::Publish, Operation::History]),
            ("nolog:*", &[Operation::History]),
        ],
    )
}

/// A JSON WebSocket connection that sent Connect with `token` and got `connected`.
async fn connected(addr: SocketAddr, token: &str) -> common::Ws {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?format=json")).await.unwrap();
    let frame = serde_json::json!({"connect": {"protocol": 1, "token": token}});
    ws.send(WsMessage::Text(frame.to_string().into())).await.unwrap();
    let v = next_json(&mut ws).await;
    assert!(v.get("connected").is_some(), "{v}");
    ws
}

async fn next_json(ws: &mut common::Ws) -> serde_json::Value {
    // One deadline across the node's pings (they come every 200 ms here).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await.expect("an answer in time") {
            Some(Ok(WsMessage::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

/// "error:CODE", "nack:CODE", or the frame's kind.
fn outcome(v: &serde_json::Value) -> String {
    for kind in ["error", "nack"] {
        if let Some(code) = v.get(kind).and_then(|e| e.get("code")).and_then(|c| c.as_str()) {
            return format!("{kind}:{}", code.trim_start_matches("ERROR_CODE_"));
        }
    }
    v.as_object().and_then(|o| o.keys().next().cloned()).unwrap_or_default()
}

/// Frames sent on one connected session, each answered by an error or a nack; the session
/// stays usable throughout.
fn frame_cases() -> Vec<(&'static str, String, &'static str)> {
    let long_channel = format!("chat:{}", "x".repeat(300));
    let nested = format!("{}1{}", "[".repeat(2_000), "]".repeat(2_000));
    let big = "y".repeat(MAX_MESSAGE + 1);
    vec![
        ("not JSON", "hello".into(), "error:BAD_FRAME"),
        ("empty object", "{}".into(), "error:UNKNOWN_FRAME"),
        ("JSON array", "[1,2]".into(), "error:BAD_FRAME"),
        ("JSON null", "null".into(), "error:BAD_FRAME"),
        ("truncated JSON", r#"{"subscribe":{"requestId":1,"#.into(), "error:BAD_FRAME"),
        (
            "requestId as a string",
            r#"{"subscribe":{"requestId":"one","channel":"chat:a"}}"#.into(),
            "error:BAD_FRAME",
        ),
        (
            "negative requestId",
            r#"{"subscribe":{"requestId":-1,"channel":"chat:a"}}"#.into(),
            "error:BAD_FRAME",
        ),
        (
            "requestId beyond u32",
            r#"{"subscribe":{"requestId":1e30,"channel":"chat:a"}}"#.into(),
            "error:BAD_FRAME",
        ),
        (
            "channel as a number",
            r#"{"subscribe":{"requestId":1,"channel":5}}"#.into(),
            "error:BAD_FRAME",
        ),
        (
            "text as an object",
            r#"{"publish":{"requestId":1,"channel":"chat:a","text":{"a":1}}}"#.into(),
            "nack:BAD_FRAME",
        ),
        (
            "binary that is not base64",
            r#"{"publish":{"requestId":1,"channel":"chat:a","binary":"***"}}"#.into(),
            "nack:BAD_FRAME",
        ),
        ("unknown frame type", r#"{"frobnicate":{"requestId":1}}"#.into(), "error:UNKNOWN_FRAME"),
        ("two frame types in one", r#"{"heartbeat":{},"publish":{}}"#.into(), "error:BAD_FRAME"),
        ("deeply nested JSON", nested, "error:BAD_FRAME"),
        (
            "empty channel",
            r#"{"subscribe":{"requestId":1,"channel":""}}"#.into(),
            "error:INVALID_CHANNEL",
        ),
        (
            "channel with a space",
            r#"{"subscribe":{"requestId":1,"channel":"chat:a b"}}"#.into(),
            "error:INVALID_CHANNEL",
        ),
        (
            "channel with a control character",
            r#"{"subscribe":{"requestId":1,"channel":"chat:\u0001"}}"#.into(),
            "error:INVALID_CHANNEL",
        ),
        (
            "channel of 305 bytes",
            format!(r#"{{"subscribe":{{"requestId":1,"channel":"{long_channel}"}}}}"#),
            "error:INVALID_CHANNEL",
        ),
        (
            "publish to an invalid channel",
            r#"{"publish":{"requestId":1,"channel":"chat:a b","text":"x"}}"#.into(),
            "nack:INVALID_CHANNEL",
        ),
        (
            "message id of 200 bytes",
            format!(
                r#"{{"publish":{{"requestId":1,"channel":"chat:a","id":"{}","text":"x"}}}}"#,
                "i".repeat(200)
            ),
            "nack:INVALID_ARGUMENT",
        ),
        (
            "event name with a control character",
            r#"{"publish":{"requestId":1,"channel":"chat:a","name":"a\u0007","text":"x"}}"#.into(),
            "nack:INVALID_ARGUMENT",
        ),
        (
            "payload over max_message_bytes",
            format!(r#"{{"publish":{{"requestId":1,"channel":"chat:a","text":"{big}"}}}}"#),
            "nack:MESSAGE_TOO_LARGE",
        ),
        (
            "subscribe outside the capabilities",
            r#"{"subscribe":{"requestId":1,"channel":"admin:all"}}"#.into(),
            "error:FORBIDDEN",
        ),
        (
            "publish outside the capabilities",
            r#"{"publish":{"requestId":1,"channel":"admin:all","text":"x"}}"#.into(),
            "nack:FORBIDDEN",
        ),
        (
            "history without the capability",
            r#"{"history":{"requestId":1,"channel":"chat:a"}}"#.into(),
            "error:FORBIDDEN",
        ),
        (
            "subscribe to a prefix-similar namespace",
            r#"{"subscribe":{"requestId":1,"channel":"chatroom:a"}}"#.into(),
            "error:FORBIDDEN",
        ),
        (
            "renewal signed with another key",
            format!(
                r#"{{"auth":{{"requestId":1,"token":"{}"}}}}"#,
                mint_hs256(
                    "another-secret-another-secret-another-secret",
                    &Claims {
                        sub: "mallory".into(),
                        exp: now() + 3600,
                        iat: None,
                        capability: [("*".to_owned(), vec![Operation::Publish])].into(),
                    }
                )
                .unwrap()
            ),
            "error:UNAUTHORIZED",
        ),
        (
            "renewal naming another client (escalation)",
            format!(
                r#"{{"auth":{{"requestId":1,"token":"{}"}}}}"#,
                token_with("root", now() + 3600, &[("*", &[Operation::Publish])])
            ),
            "error:INVALID_ARGUMENT",
        ),
        (
            "renewal with alg none",
            format!(r#"{{"auth":{{"requestId":1,"token":"{}"}}}}"#, alg_none("mallory")),
            "error:UNAUTHORIZED",
        ),
        (
            "renewal with garbage",
            r#"{"auth":{"requestId":1,"token":"a.b.c"}}"#.into(),
            "error:UNAUTHORIZED",
        ),
        ("second connect", r#"{"connect":{"protocol":1}}"#.into(), "error:ALREADY_CONNECTED"),
        // `*` is a capability pattern, not a channel: INVALID_CHANNEL on every surface,
        // whatever the token allows.
        ("subscribe to `*`", r#"{"subscribe":{"requestId":1,"channel":"*"}}"#.into(), "error:INVALID_CHANNEL"),
        ("publish to `*`", r#"{"publish":{"requestId":1,"channel":"*","text":"x"}}"#.into(), "nack:INVALID_CHANNEL"),
        ("history of `*`", r#"{"history":{"requestId":1,"channel":"*"}}"#.into(), "error:INVALID_CHANNEL"),
        // One order of checks on every surface: the request itself, then the capability,
        // then what the node supports and its limits. A request with two faults gets the
        // answer of the one checked first (`admin:` is outside the token).
        (
            "a forbidden publish with a message id of 200 bytes",
            format!(
                r#"{{"publish":{{"requestId":1,"channel":"admin:x","id":"{}","text":"x"}}}}"#,
                "i".repeat(200)
            ),
            "nack:INVALID_ARGUMENT",
        ),
        (
            "a forbidden publish over max_message_bytes",
            format!(r#"{{"publish":{{"requestId":1,"channel":"admin:x","text":"{big}"}}}}"#),
            "nack:MESSAGE_TOO_LARGE",
        ),
        (
            "a forbidden publish after an origin that is no node",
            r#"{"publish":{"requestId":1,"channel":"admin:x","text":"x","after":{"origin":"nowhere","seq":"1"}}}"#.into(),
            "nack:INVALID_ARGUMENT",
        ),
        (
            "a forbidden history of 5,000 messages",
            r#"{"history":{"requestId":1,"channel":"admin:x","limit":5000}}"#.into(),
            "error:INVALID_ARGUMENT",
        ),
        (
            "a forbidden resume listing 257 origins",
            resume_on("admin:x", (0..257).map(|i| format!("r{i}/n")).collect()),
            "error:INVALID_ARGUMENT",
        ),
        (
            "history the token does not allow, of a namespace that keeps none",
            r#"{"history":{"requestId":1,"channel":"chat:none"}}"#.into(),
            "error:FORBIDDEN",
        ),
        (
            "history the token allows, of a namespace that keeps none",
            r#"{"history":{"requestId":1,"channel":"nolog:a"}}"#.into(),
            "error:UNSUPPORTED",
        ),
        // A resume vector is kept per subscription and searched per delivery: bounded,
        // and every entry names a node once.
        (
            "resume listing 257 origins",
            resume_with((0..257).map(|i| format!("r{i}/n")).collect()),
            "error:INVALID_ARGUMENT",
        ),
        (
            "resume naming an origin that is no node",
            resume_with(vec!["not a node".into()]),
            "error:INVALID_ARGUMENT",
        ),
        (
            "resume naming an origin twice",
            resume_with(vec!["eu/a".into(), "eu/a".into()]),
            "error:INVALID_ARGUMENT",
        ),
        // Limits agree across encodings: the payload is counted, not its escaping.
        (
            "a max-size text of control characters as six-byte escapes",
            publish_text(&"\\u0001".repeat(MAX_MESSAGE)),
            "ack",
        ),
        (
            "a max-size text of emoji as surrogate-pair escapes",
            publish_text(&"\\ud83d\\ude00".repeat(MAX_MESSAGE / 4)),
            "ack",
        ),
        (
            "a max-size text of escaped quotes and backslashes",
            publish_text(&"\\\"\\\\".repeat(MAX_MESSAGE / 2)),
            "ack",
        ),
        (
            "a max-size binary payload in base64",
            format!(
                r#"{{"publish":{{"requestId":1,"channel":"chat:a","binary":"{}"}}}}"#,
                "AAAA".repeat(MAX_MESSAGE / 3) + "AA=="
            ),
            "ack",
        ),
        (
            "one byte over, as escapes",
            publish_text(&"\\u0001".repeat(MAX_MESSAGE + 1)),
            "nack:MESSAGE_TOO_LARGE",
        ),
        // Numbers at the edge of their type are answered like any other.
        // (Sequenced once this node holds everything the peer had of the channel: the
        // position is the client's word, the peer's head is the bound.)
        (
            "publish after the largest position",
            r#"{"publish":{"requestId":1,"channel":"chat:a","text":"x","after":{"origin":"us-east/edge-1","epoch":"18446744073709551615","seq":"18446744073709551615"}}}"#.into(),
            "ack",
        ),
        (
            "publish with a durability this node does not know",
            r#"{"publish":{"requestId":1,"channel":"chat:a","text":"x","durability":7}}"#.into(),
            "nack:BAD_FRAME",
        ),
        (
            "subscribe rewinding the most messages and milliseconds",
            r#"{"subscribe":{"requestId":1,"channel":"chat:max","rewind":{"count":4294967295,"sinceMs":"18446744073709551615"}}}"#.into(),
            "subscribed",
        ),
        ("unsubscribe that", r#"{"unsubscribe":{"requestId":1,"channel":"chat:max"}}"#.into(), "unsubscribed"),
        ("heartbeat with the largest nonce", r#"{"heartbeat":{"nonce":"18446744073709551615"}}"#.into(), "heartbeat"),
        (
            "history forwards from the largest offset",
            r#"{"history":{"requestId":1,"channel":"log:a","forwards":true,"from":"18446744073709551615","limit":1000}}"#.into(),
            "history",
        ),
        // Presence (mallory's token has no `presence`): the request's own faults first, then
        // the capability. (One connection entering 100,000 channels and another client's
        // member: edge/tests/presence.rs.)
        (
            "presence enter without the capability",
            r#"{"presence":{"requestId":1,"channel":"chat:a","action":"PRESENCE_ACTION_ENTER"}}"#.into(),
            "error:FORBIDDEN",
        ),
        (
            "presence get without the capability",
            r#"{"presence":{"requestId":1,"channel":"chat:a","action":"PRESENCE_ACTION_GET"}}"#.into(),
            "error:FORBIDDEN",
        ),
        (
            "subscribe with presence without the capability",
            r#"{"subscribe":{"requestId":1,"channel":"chat:p","presence":true}}"#.into(),
            "error:FORBIDDEN",
        ),
        (
            "presence data over presence.max_data_bytes",
            format!(
                r#"{{"presence":{{"requestId":1,"channel":"chat:a","action":"PRESENCE_ACTION_ENTER","text":"{}"}}}}"#,
                "d".repeat(1025)
            ),
            "error:MESSAGE_TOO_LARGE",
        ),
        (
            "presence without an action",
            r#"{"presence":{"requestId":1,"channel":"chat:a"}}"#.into(),
            "error:INVALID_ARGUMENT",
        ),
        (
            "presence with an unknown action",
            r#"{"presence":{"requestId":1,"channel":"chat:a","action":"PRESENCE_ACTION_FLY"}}"#.into(),
            "error:BAD_FRAME",
        ),
        (
            "presence on a malformed channel",
            r#"{"presence":{"requestId":1,"channel":"chat a","action":"PRESENCE_ACTION_ENTER"}}"#.into(),
            "error:INVALID_CHANNEL",
        ),
        (
            "history at the largest times",
            r#"{"history":{"requestId":1,"channel":"log:a","sinceMs":"18446744073709551615","untilMs":"18446744073709551615","to":"18446744073709551615"}}"#.into(),
            "history",
        ),
    ]
}

/// A publish to `chat:a` whose `text` is `json`, as written (escapes and all).
fn publish_text(json: &str) -> String {
    format!(r#"{{"publish":{{"requestId":1,"channel":"chat:a","text":"{json}"}}}}"#)
}

/// A subscribe resuming with a vector of `origins` (each at epoch 1, seq 1).
fn resume_with(origins: Vec<String>) -> String {
    resume_on("chat:resumed", origins)
}

/// A `subscribe` of `channel` resuming from a vector of `origins`.
fn resume_on(channel: &str, origins: Vec<String>) -> String {
    let origins: Vec<serde_json::Value> = origins
        .into_iter()
        .map(|o| serde_json::json!({"origin": o, "epoch": "1", "seq": "1"}))
        .collect();
    serde_json::json!({"subscribe": {"requestId": 1, "channel": channel,
        "resume": {"node": "eu/x", "origins": origins}}})
    .to_string()
}

/// Requests that cannot be decoded still get their one answer, naming them: (name, frame,
/// channel the answer names). Publishes are answered by `nack` (in publish order), the
/// others by `error`.
fn malformed_requests() -> Vec<(&'static str, WsMessage, &'static str)> {
    // Subscribe{request_id: 41, channel: "chat:x", rewind: <a varint where a message goes>}.
    let mut subscribe = vec![0x08, 41, 0x12, 6];
    subscribe.extend_from_slice(b"chat:x");
    subscribe.extend_from_slice(&[0x18, 0x01]);
    let mut protobuf = vec![0x12, subscribe.len() as u8];
    protobuf.extend_from_slice(&subscribe);
    let text = |t: &str| WsMessage::Text(t.to_owned().into());
    vec![
        (
            "subscribe with a numeric channel",
            text(r#"{"subscribe":{"requestId":41,"channel":5}}"#),
            "",
        ),
        (
            "publish with text as an object",
            text(r#"{"publish":{"requestId":41,"channel":"chat:a","text":{"a":1}}}"#),
            "chat:a",
        ),
        (
            "publish of a cut emoji (a lone surrogate escape)",
            text(r#"{"publish":{"requestId":41,"channel":"chat:a","text":"hi \ud83d"}}"#),
            "chat:a",
        ),
        (
            "subscribe with request_id spelled as in the schema",
            text(r#"{"subscribe":{"request_id":41,"channel":"chat:a","rewind":5}}"#),
            "chat:a",
        ),
        (
            "history with a string limit",
            text(r#"{"history":{"requestId":41,"channel":"chat:a","limit":"many"}}"#),
            "chat:a",
        ),
        (
            "unsubscribe with an unknown field",
            text(r#"{"unsubscribe":{"requestId":"41","channel":"chat:a","frob":1}}"#),
            "chat:a",
        ),
        ("auth with a numeric token", text(r#"{"auth":{"requestId":41,"token":7}}"#), ""),
        (
            "a protobuf subscribe with a malformed rewind",
            WsMessage::Binary(protobuf.into()),
            "chat:x",
        ),
    ]
}

/// An unsigned token (`alg: none`): a real token's claims under a `none` header, no
/// signature.
fn alg_none(sub: &str) -> String {
    let real = token_with(sub, now() + 3600, &[("*", &[Operation::Subscribe, Operation::Publish])]);
    let payload = real.split('.').nth(1).unwrap();
    // {"alg":"none","typ":"JWT"}
    format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.")
}

/// A WebSocket frame as a client sends it (masked, unless `masked` is false).
fn raw_frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n < 65536 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12, 0x34, 0x56, 0x78];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A raw TCP connection upgraded to a JSON WebSocket (the 101 read off).
async fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /v1/ws?format=json HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// Reads server frames off a raw connection until a close frame; its code (None: the
/// socket ended without one).
async fn raw_close_code(s: &mut TcpStream) -> Option<u16> {
    let read = async {
        loop {
            let mut h = [0u8; 2];
            s.read_exact(&mut h).await.ok()?;
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let mut l = [0u8; 2];
                s.read_exact(&mut l).await.ok()?;
                len = u64::from(u16::from_be_bytes(l));
            } else if len == 127 {
                let mut l = [0u8; 8];
                s.read_exact(&mut l).await.ok()?;
                len = u64::from_be_bytes(l);
            }
            let mut payload = vec![0u8; len as usize];
            s.read_exact(&mut payload).await.ok()?;
            if h[0] & 0x0f == 0x8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.expect("closed in time")
}

/// The Connect frame, as raw text frame bytes.
fn raw_connect(token: &str) -> Vec<u8> {
    let f = serde_json::json!({"connect": {"protocol": 1, "token": token}}).to_string();
    raw_frame(true, 0x1, f.as_bytes(), true)
}

/// Cases that end the connection: (name, bytes after the upgrade, expected close code).
fn close_cases(token: &str) -> Vec<(&'static str, Vec<u8>, u16)> {
    let connect = raw_connect(token);
    let with_connect = |rest: Vec<u8>| [connect.clone(), rest].concat();
    let mut ping_flood = connect.clone();
    for _ in 0..2000 {
        ping_flood.extend(raw_frame(true, 0x9, b"", true));
    }
    let mut publish_flood = connect.clone();
    for i in 0..2000 {
        let p = format!(r#"{{"publish":{{"requestId":{i},"channel":"chat:flood","text":"x"}}}}"#);
        publish_flood.extend(raw_frame(true, 0x1, p.as_bytes(), true));
    }
    let huge_fragments: Vec<u8> = (0..40)
        .flat_map(|i| {
            let opcode = if i == 0 { 0x1 } else { 0x0 };
            raw_frame(false, opcode, &[b'a'; 1024], true)
        })
        .collect();
    vec![
        ("a frame before connect", raw_frame(true, 0x1, br#"{"heartbeat":{}}"#, true), 4002),
        ("a frame that does not decode before connect", raw_frame(true, 0x1, b"hello", true), 4002),
        ("an unknown frame before connect", raw_frame(true, 0x1, br#"{"frob":{}}"#, true), 4002),
        (
            "a connect that does not decode",
            raw_frame(true, 0x1, br#"{"connect":{"protocol":"one"}}"#, true),
            4002,
        ),
        // Who is asking is checked before what they ask.
        (
            "connect with a newer protocol and a forged token",
            raw_frame(true, 0x1, br#"{"connect":{"protocol":2,"token":"a.b.c"}}"#, true),
            4003,
        ),
        ("connect with an empty sub", raw_connect(&token_with("", now() + 3600, &[])), 4003),
        (
            "connect with an API key's client id as sub",
            raw_connect(&token_with("key:backend", now() + 3600, &[])),
            4003,
        ),
        (
            "invalid UTF-8 in a text frame",
            with_connect(raw_frame(true, 0x1, b"\xff\xfe", true)),
            1007,
        ),
        ("invalid UTF-8 before connect", raw_frame(true, 0x1, b"{\xc3\x28}", true), 1007),
        ("an unmasked client frame", raw_frame(true, 0x1, b"{}", false), 1002),
        ("a reserved opcode", with_connect(raw_frame(true, 0x3, b"x", true)), 1002),
        (
            "reserved bits set",
            with_connect({
                let mut f = raw_frame(true, 0x1, b"{}", true);
                f[0] |= 0x40;
                f
            }),
            1002,
        ),
        ("a continuation without a start", with_connect(raw_frame(true, 0x0, b"x", true)), 1002),
        ("a fragmented control frame", with_connect(raw_frame(false, 0x9, b"x", true)), 1002),
        (
            "a frame over max_frame_bytes",
            with_connect(raw_frame(true, 0x1, &vec![b'a'; MAX_FRAME + 1], true)),
            1009,
        ),
        ("fragments adding up past max_frame_bytes", with_connect(huge_fragments), 1009),
        (
            "a fragmented message that never ends",
            with_connect(raw_frame(false, 0x1, b"{\"heart", true)),
            4000,
        ),
        ("a ping flood", ping_flood, close::RATE_LIMITED),
        ("a publish flood", publish_flood, close::RATE_LIMITED),
        ("connect with an expired token", raw_connect(&token_with("eve", now() - 120, &[])), 4003),
        ("connect with alg none", raw_connect(&alg_none("eve")), 4003),
        (
            "connect with a wrongly signed token",
            raw_connect(&{
                let t = chat_token("eve");
                let (rest, _) = t.rsplit_once('.').unwrap();
                format!("{rest}.AAAA")
            }),
            4003,
        ),
        ("connect with a malformed token", raw_connect("not-a-token"), 4003),
        ("connect without a token", raw_connect(""), 4003),
        ("no connect within the connect timeout", Vec::new(), 4002),
    ]
}

/// Plays a peer with a valid certificate that sends impossible frames to us-east.
async fn impostor(c: &common::Cluster) -> Result<(), String> {
    use tern_backbone::core::Frame;
    use tern_proto::types::{ChannelName, Epoch, NodeId, Seq};
    let dir = c.dir.join("impostor");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(c.dir.join(f), dir.join(f)).unwrap();
    }
    let eu = NodeId::parse("eu-west/edge-1").unwrap();
    let us = NodeId::parse("us-east/edge-1").unwrap();
    let (cert, key) = tern_backbone::certs::issue_node(&dir, &eu).unwrap();
    let files = tern_backbone::certs::TlsFiles { ca: dir.join("ca.pem"), cert, key, crl: None };
    let (_, client_tls) = tern_backbone::certs::tls_configs(&files).unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
    let target = c.nodes[1].node.settings().config.backbone.as_ref().unwrap().listen;
    let name = tern_backbone::certs::node_dns_name(&us);
    let conn = endpoint
        .connect(target, &name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("the impostor's certificate is valid, yet: {e}"))?;
    let mut lane = conn.open_uni().await.map_err(|e| e.to_string())?;
    let channel = ChannelName::parse("bb:impossible").unwrap();
    let data = |seq: u64| Frame::Data {
        origin: eu.clone(),
        epoch: Epoch(u64::MAX),
        channel: channel.clone(),
        seq: Seq(seq),
        payload: bytes::Bytes::from_static(b"\x0a\x02bb"),
    };
    let mut bytes = tern_backbone::wire::encode(&data(u64::MAX)).to_vec();
    for k in 0..20_000u64 {
        bytes.extend_from_slice(&tern_backbone::wire::encode(&data((1 << 40) | (k * 7919))));
    }
    // A length prefix far over the frame limit.
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    bytes.extend_from_slice(b"garbage");
    lane.write_all(&bytes).await.map_err(|e| e.to_string())?;
    let _ = lane.finish();
    let closed = tokio::time::timeout(WAIT, conn.closed()).await.map_err(|_| "not closed")?;
    match closed {
        quinn::ConnectionError::ApplicationClosed(a) if a.error_code == 2u32.into() => Ok(()),
        other => Err(format!("expected a close for the bad frame (2), got {other}")),
    }
}

/// HTTP requests: (name, method, path, extra headers, content type, body, status).
type HttpCase = (&'static str, &'static str, String, String, &'static str, Vec<u8>, u16);

fn http_cases(token: &str) -> Vec<HttpCase> {
    let auth = format!("Authorization: Bearer {token}\r\n");
    let reader = token_with(
        "reader",
        now() + 3600,
        &[("chat:*", &[Operation::History]), ("log:*", &[Operation::History])],
    );
    let reader = format!("Authorization: Bearer {reader}\r\n");
    let path = "/v1/channels/chat:http/messages".to_owned();
    vec![
        ("publish without a token", "POST", path.clone(), String::new(), "application/json", br#"{"text":"x"}"#.to_vec(), 401),
        ("publish with a forged token", "POST", path.clone(), "Authorization: Bearer a.b.c\r\n".into(), "application/json", br#"{"text":"x"}"#.to_vec(), 401),
        ("publish with a malformed Authorization", "POST", path.clone(), "Authorization: Basic Zm9vOmJhcg==\r\n".into(), "application/json", br#"{"text":"x"}"#.to_vec(), 401),
        ("publish outside the capabilities", "POST", "/v1/channels/admin:x/messages".into(), auth.clone(), "application/json", br#"{"text":"x"}"#.to_vec(), 403),
        ("publish malformed JSON", "POST", path.clone(), auth.clone(), "application/json", b"{\"text\":".to_vec(), 400),
        ("publish with wrong field types", "POST", path.clone(), auth.clone(), "application/json", br#"{"text":5}"#.to_vec(), 400),
        ("publish to an invalid channel", "POST", "/v1/channels/chat:a%20b/messages".into(), auth.clone(), "application/json", br#"{"text":"x"}"#.to_vec(), 400),
        ("publish over max_message_bytes", "POST", path.clone(), auth.clone(), "text/plain", vec![b'z'; MAX_MESSAGE + 1], 413),
        ("history with a limit too large", "GET", format!("{path}?limit=100000"), reader.clone(), "text/plain", Vec::new(), 400),
        ("history in a direction that does not exist", "GET", format!("{path}?direction=sideways"), reader.clone(), "text/plain", Vec::new(), 400),
        ("history with a non-numeric position", "GET", format!("{path}?from=abc"), reader.clone(), "text/plain", Vec::new(), 400),
        ("history of a namespace that keeps none", "GET", path.clone(), reader.clone(), "text/plain", Vec::new(), 404),
        ("an unknown path", "GET", "/v1/nothing-here".into(), String::new(), "text/plain", Vec::new(), 404),
        ("a WebSocket path without an upgrade", "GET", "/v1/ws".into(), String::new(), "text/plain", Vec::new(), 426),
        ("an upgrade with an unknown format", "GET", "/v1/ws?format=xml".into(), "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n".into(), "text/plain", Vec::new(), 400),
        // What a request declares is honoured or refused, never reinterpreted.
        ("text declared as UTF-16", "POST", path.clone(), auth.clone(), "text/plain; charset=utf-16", b"h\0i\0".to_vec(), 415),
        ("text declared as Latin-1", "POST", path.clone(), auth.clone(), "text/plain;charset=ISO-8859-1", b"caf\xe9".to_vec(), 415),
        ("JSON declared as UTF-16", "POST", path.clone(), auth.clone(), "application/json; charset=utf-16le", br#"{"text":"x"}"#.to_vec(), 415),
        ("text declared as UTF-8", "POST", path.clone(), auth.clone(), "text/plain; charset=UTF-8", "caf\u{e9}".as_bytes().to_vec(), 201),
        ("JSON declared as quoted UTF-8", "POST", path.clone(), auth.clone(), "application/json; charset=\"utf-8\"", br#"{"text":"x"}"#.to_vec(), 201),
        ("a gzip-encoded body", "POST", path.clone(), format!("{auth}Content-Encoding: gzip\r\n"), "text/plain", b"\x1f\x8b\x08\x00".to_vec(), 415),
        ("an identity-encoded body", "POST", path.clone(), format!("{auth}Content-Encoding: identity\r\n"), "text/plain", b"plain".to_vec(), 201),
        ("two content types", "POST", path.clone(), format!("{auth}Content-Type: application/octet-stream\r\n"), "text/plain", b"x".to_vec(), 415),
        ("a content type that is not a media type", "POST", path.clone(), auth.clone(), "text", b"x".to_vec(), 415),
        ("an XML body", "POST", path.clone(), auth.clone(), "application/xml", b"<x/>".to_vec(), 415),
        ("binary ignores a charset", "POST", path.clone(), auth.clone(), "application/octet-stream; charset=utf-16", vec![0, 1, 2], 201),
        // The limits agree with the WebSocket's.
        ("a max-size text as JSON escapes", "POST", path.clone(), auth.clone(), "application/json", format!(r#"{{"text":"{}"}}"#, "\\u0001".repeat(MAX_MESSAGE)).into_bytes(), 201),
        ("a max-size text as plain text", "POST", path.clone(), auth.clone(), "text/plain", vec![b'z'; MAX_MESSAGE], 201),
        ("a body over max_frame_bytes", "POST", path.clone(), auth.clone(), "application/octet-stream", vec![0; MAX_FRAME + 1], 413),
        ("a durability this node does not know", "POST", path.clone(), auth.clone(), "application/json", br#"{"text":"x","durability":"DURABILITY_QUORUM"}"#.to_vec(), 400),
        // Numbers at the edge of their type.
        ("history forwards from the largest offset", "GET", "/v1/channels/log:http/messages?from=18446744073709551615&direction=forwards".into(), reader.clone(), "text/plain", Vec::new(), 200),
        ("history backwards to the largest time", "GET", "/v1/channels/log:http/messages?since=18446744073709551615&until=18446744073709551615&to=18446744073709551615".into(), reader.clone(), "text/plain", Vec::new(), 200),
        ("history with an offset beyond u64", "GET", format!("{path}?from=18446744073709551616"), reader.clone(), "text/plain", Vec::new(), 400),
    ]
}

/// The suite's API key: it may publish to `chat:*`.
const API_KEY: (&str, &str) = ("backend", "bad-input-suite-api-key-0123456789abcdef");

/// HTTP requests whose answer names the code the WebSocket gives the same fault:
/// (the request, the code in the JSON body; empty for a success).
fn http_answers(token: &str) -> Vec<(HttpCase, &'static str)> {
    use base64::Engine;
    let bearer = |t: &str| format!("Authorization: Bearer {t}\r\n");
    let auth = bearer(token);
    let key =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", API_KEY.0, API_KEY.1));
    let key = format!("Authorization: Basic {key}\r\n");
    let json = "application/json";
    let post = |name, path: &str, headers: &str, ct, body: &[u8], status| {
        (name, "POST", path.to_owned(), headers.to_owned(), ct, body.to_vec(), status)
    };
    let get = |name, path: &str, headers: &str, status| {
        (name, "GET", path.to_owned(), headers.to_owned(), "text/plain", Vec::new(), status)
    };
    let big = vec![b'z'; MAX_MESSAGE + 1];
    let long_id = format!(r#"{{"id":"{}","text":"x"}}"#, "i".repeat(200));
    vec![
        // `*` is no channel, whatever the caller may do.
        (
            post(
                "publish to `*` with a token for chat:*",
                "/v1/channels/*/messages",
                &auth,
                json,
                br#"{"text":"x"}"#,
                400,
            ),
            "ERROR_CODE_INVALID_CHANNEL",
        ),
        (
            post(
                "publish to `*` with an API key for chat:*",
                "/v1/channels/*/messages",
                &key,
                json,
                br#"{"text":"x"}"#,
                400,
            ),
            "ERROR_CODE_INVALID_CHANNEL",
        ),
        (
            get("history of `*`", "/v1/channels/*/messages", &auth, 400),
            "ERROR_CODE_INVALID_CHANNEL",
        ),
        // The request, then the capability.
        (
            post(
                "a token's publish outside its capabilities",
                "/v1/channels/admin:x/messages",
                &auth,
                json,
                br#"{"text":"x"}"#,
                403,
            ),
            "ERROR_CODE_FORBIDDEN",
        ),
        (
            post(
                "an API key's publish outside its capabilities",
                "/v1/channels/admin:x/messages",
                &key,
                json,
                br#"{"text":"x"}"#,
                403,
            ),
            "ERROR_CODE_FORBIDDEN",
        ),
        (
            post(
                "a forbidden publish of malformed JSON",
                "/v1/channels/admin:x/messages",
                &auth,
                json,
                b"{\"text\":",
                400,
            ),
            "ERROR_CODE_BAD_FRAME",
        ),
        (
            post(
                "a forbidden publish with a message id of 200 bytes",
                "/v1/channels/admin:x/messages",
                &auth,
                json,
                long_id.as_bytes(),
                400,
            ),
            "ERROR_CODE_INVALID_ARGUMENT",
        ),
        (
            post(
                "a forbidden publish over max_message_bytes",
                "/v1/channels/admin:x/messages",
                &auth,
                "text/plain",
                &big,
                413,
            ),
            "ERROR_CODE_MESSAGE_TOO_LARGE",
        ),
        (
            post(
                "a forbidden publish after an origin that is no node",
                "/v1/channels/admin:x/messages",
                &auth,
                json,
                br#"{"text":"x","after":{"origin":"nowhere","seq":"1"}}"#,
                400,
            ),
            "ERROR_CODE_INVALID_ARGUMENT",
        ),
        (
            get(
                "a forbidden history of 5,000 messages",
                "/v1/channels/admin:x/messages?limit=5000",
                &auth,
                400,
            ),
            "ERROR_CODE_INVALID_ARGUMENT",
        ),
        (
            get(
                "a history limit that is no number",
                "/v1/channels/log:a/messages?limit=many",
                &auth,
                400,
            ),
            "ERROR_CODE_BAD_FRAME",
        ),
        (
            get(
                "history the token does not allow, of a namespace that keeps none",
                "/v1/channels/chat:none/messages",
                &auth,
                403,
            ),
            "ERROR_CODE_FORBIDDEN",
        ),
        (
            get(
                "history the token allows, of a namespace that keeps none",
                "/v1/channels/nolog:a/messages",
                &auth,
                404,
            ),
            "ERROR_CODE_UNSUPPORTED",
        ),
        // Credentials that do not verify: 401, and the code says so.
        (
            post(
                "publish with a forged token",
                "/v1/channels/chat:a/messages",
                "Authorization: Bearer a.b.c\r\n",
                json,
                br#"{"text":"x"}"#,
                401,
            ),
            "ERROR_CODE_UNAUTHORIZED",
        ),
        (
            post(
                "publish with a token whose sub is empty",
                "/v1/channels/chat:a/messages",
                &bearer(&token_with("", now() + 3600, &[("chat:*", &[Operation::Publish])])),
                json,
                br#"{"text":"x"}"#,
                401,
            ),
            "ERROR_CODE_UNAUTHORIZED",
        ),
        (
            post(
                "publish with a token passing for an API key",
                "/v1/channels/chat:a/messages",
                &bearer(&token_with(
                    "key:backend",
                    now() + 3600,
                    &[("chat:*", &[Operation::Publish])],
                )),
                json,
                br#"{"text":"x"}"#,
                401,
            ),
            "ERROR_CODE_UNAUTHORIZED",
        ),
        (
            post(
                "publish with a wrong API key secret",
                "/v1/channels/chat:a/messages",
                "Authorization: Basic YmFja2VuZDp3cm9uZw==\r\n",
                json,
                br#"{"text":"x"}"#,
                401,
            ),
            "ERROR_CODE_UNAUTHORIZED",
        ),
        // A channel name may hold `/`, encoded in the path or not.
        (
            post(
                "publish to a channel with a slash",
                "/v1/channels/chat:match/2026/messages",
                &auth,
                "text/plain",
                b"x",
                201,
            ),
            "",
        ),
        (
            post(
                "publish to a channel with an encoded slash",
                "/v1/channels/chat:match%2F2026/messages",
                &auth,
                "text/plain",
                b"y",
                201,
            ),
            "",
        ),
        // The body decodes before its channel is looked at.
        (
            post("HTML to `*`", "/v1/channels/*/messages", &auth, "text/html", b"<p>", 415),
            "ERROR_CODE_BAD_FRAME",
        ),
        (
            post(
                "malformed JSON to `*`",
                "/v1/channels/*/messages",
                &auth,
                json,
                b"{\"text\":",
                400,
            ),
            "ERROR_CODE_BAD_FRAME",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_answer_and_well_behaved_clients_lose_nothing() {
    let data = common::temp_dir("bad-input");
    let c = cluster(&["eu-west", "us-east"], |i, cfg| {
        cfg.history.data_dir = data.join(i.to_string());
        cfg.history.namespaces = vec![tern_edge::config::HistoryNamespace {
            name: "log".into(),
            max_messages: 1000,
            max_age: Duration::from_secs(3600),
        }];
        cfg.auth.mode = AuthMode::Token;
        cfg.auth.hs256_secret = Some(SECRET.into());
        cfg.auth.leeway = Duration::ZERO;
        cfg.auth.api_keys = vec![tern_edge::auth::ApiKeyConfig {
            id: API_KEY.0.into(),
            secret: API_KEY.1.into(),
            capability: Some([("chat:*".to_owned(), vec![Operation::Publish])].into()),
        }];
        cfg.limits.max_message_bytes = MAX_MESSAGE;
        cfg.limits.max_frame_bytes = MAX_FRAME;
        cfg.limits.publish_rate = 200;
        cfg.limits.publish_burst = 200;
        cfg.limits.frame_rate = 500;
        cfg.limits.frame_burst = 1000;
        cfg.timeouts.connect = Duration::from_millis(500);
        cfg.timeouts.http_header = Duration::from_millis(500);
        cfg.heartbeat.interval = Duration::from_millis(200);
        cfg.heartbeat.idle_timeout = Duration::from_millis(1500);
        // A namespace every node takes from every origin without asking: the impostor's
        // frames below reach the replication core's hold-back buffer.
        cfg.backbone.as_mut().unwrap().replicate_all = vec!["bb".into()];
    })
    .await;
    let (target, other) = (c.nodes[0].addr, c.nodes[1].addr);

    // The well-behaved pair: a subscriber on the node under attack, a publisher on the
    // other, so the stream crosses the backbone while garbage hits it too.
    let opts =
        |sub: &str| ClientOptions { token: Some(chat_token(sub)), ..ClientOptions::default() };
    let watcher = Client::connect(&format!("ws://{target}"), opts("watcher")).await.unwrap();
    let mut sub = watcher.subscribe("chat:steady").await.unwrap();
    let publisher = Client::connect(&format!("ws://{other}"), opts("publisher")).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let steady = tokio::spawn(async move {
        let mut sent = 0u32;
        while !stopped.is_cancelled() {
            publisher.publish("chat:steady", format!("{sent}")).await.unwrap();
            sent += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sent
    });
    // The stream is flowing before the attack starts.
    let first = tokio::time::timeout(WAIT, sub.next()).await.unwrap().unwrap();
    assert!(matches!(first, Event::Message(_)), "{first:?}");
    let reader = tokio::spawn(async move {
        let mut got = vec![first];
        while let Some(ev) = tokio::time::timeout(WAIT, sub.next()).await.ok().flatten() {
            let done = matches!(&ev, Event::Message(m) if m.id == "last");
            got.push(ev);
            if done {
                break;
            }
        }
        got
    });

    let mut failures = Vec::new();
    let mut cases = 0;

    // 1. Frames on one session: each gets its error or nack; the session stays usable.
    let token = chat_token("mallory");
    let mut ws = connected(target, &token).await;
    for (name, frame, expected) in frame_cases() {
        cases += 1;
        ws.send(WsMessage::Text(frame.into())).await.unwrap();
        let got = outcome(&next_json(&mut ws).await);
        if got != expected {
            failures.push(format!("{name}: expected {expected}, got {got}"));
        }
    }
    // Random binary frames (protobuf is tried on binary frames): errors, never a close.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200 {
        let len = (seed % 64) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        ws.send(WsMessage::Binary(bytes.into())).await.unwrap();
        // Some random bytes decode as a valid frame (a heartbeat, an empty subscribe):
        // whatever the answer, it is an answer.
        let v = next_json(&mut ws).await;
        assert!(v.is_object(), "{v}");
    }
    cases += 1;
    ws.send(WsMessage::Text(r#"{"heartbeat":{"nonce":"7"}}"#.into())).await.unwrap();
    let v = next_json(&mut ws).await;
    if v["heartbeat"]["nonce"] != "7" {
        failures.push(format!("the session did not stay usable: {v}"));
    }
    // A resume from the largest positions, on a channel without history and one with: the
    // subscription (and a discontinuity where nothing can be replayed), nothing else.
    for channel in ["chat:max", "log:max"] {
        cases += 1;
        let resume = format!(
            r#"{{"subscribe":{{"requestId":5,"channel":"{channel}","resume":{{"position":{{"epoch":"18446744073709551615","offset":"18446744073709551615"}},"origins":[{{"origin":"eu-west/edge-1","epoch":"18446744073709551615","seq":"18446744073709551615"}}]}}}}}}"#
        );
        ws.send(WsMessage::Text(resume.into())).await.unwrap();
        let unsubscribe = format!(r#"{{"unsubscribe":{{"requestId":6,"channel":"{channel}"}}}}"#);
        ws.send(WsMessage::Text(unsubscribe.into())).await.unwrap();
        let mut kinds = Vec::new();
        while kinds.last().is_none_or(|k| k != "unsubscribed") && kinds.len() < 3 {
            kinds.push(outcome(&next_json(&mut ws).await));
        }
        kinds.retain(|k| k != "discontinuity");
        if kinds != ["subscribed", "unsubscribed"] {
            failures.push(format!("resume on {channel} from the largest positions: got {kinds:?}"));
        }
    }
    // A publish in protobuf with a durability this node does not know (JSON cannot carry
    // one): refused, not weakened to the default.
    cases += 1;
    let publish = tern_proto::client::Publish {
        request_id: 9,
        channel: "chat:a".into(),
        data: Some(tern_proto::client::publish::Data::Text("x".into())),
        durability: 7,
        ..Default::default()
    };
    let frame = tern_proto::codec::encode_client(
        tern_proto::client::client_frame::Kind::Publish(publish),
        tern_proto::codec::Format::Protobuf,
    );
    ws.send(WsMessage::Binary(frame)).await.unwrap();
    let v = next_json(&mut ws).await;
    if outcome(&v) != "nack:INVALID_ARGUMENT" || v["nack"]["requestId"] != 9 {
        failures.push(format!("an unknown durability: expected nack INVALID_ARGUMENT, got {v}"));
    }
    // Every request gets its one answer, naming it, even one that does not decode.
    for (name, frame, channel) in malformed_requests() {
        cases += 1;
        ws.send(frame).await.unwrap();
        let v = next_json(&mut ws).await;
        let kind = if name.starts_with("publish") { "nack" } else { "error" };
        let named = v[kind]["requestId"] == 41
            && v[kind]["channel"].as_str().unwrap_or("") == channel
            && v[kind]["code"] == "ERROR_CODE_BAD_FRAME";
        if !named {
            failures.push(format!(
                "{name}: expected {kind} BAD_FRAME for request 41 on {channel:?}, got {v}"
            ));
        }
    }
    // Switching rooms quickly: a subscribe and an unsubscribe back to back on a fresh
    // interest-routed channel (its first subscriber makes the node ask its peer) — and a
    // subscribe sent twice — each get their answer, in order, and nothing else follows.
    for i in 0..10 {
        cases += 1;
        let ch = format!("chat:switch-{i}");
        let frames = [
            format!(r#"{{"subscribe":{{"requestId":1,"channel":"{ch}"}}}}"#),
            format!(r#"{{"subscribe":{{"requestId":2,"channel":"{ch}"}}}}"#),
            format!(r#"{{"unsubscribe":{{"requestId":3,"channel":"{ch}"}}}}"#),
        ];
        let frames =
            if i % 2 == 0 { vec![&frames[0], &frames[2]] } else { frames.iter().collect() };
        // In one write, as a client sends them when the user switches rooms.
        for f in &frames {
            ws.feed(WsMessage::Text((*f).clone().into())).await.unwrap();
        }
        ws.flush().await.unwrap();
        let want: &[&str] = if i % 2 == 0 {
            &["subscribed 1", "unsubscribed 3"]
        } else {
            &["subscribed 1", "subscribed 2", "unsubscribed 3"]
        };
        let mut answers = Vec::new();
        for _ in want {
            let Ok(Some(Ok(WsMessage::Text(t)))) = tokio::time::timeout(WAIT, ws.next()).await
            else {
                break;
            };
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            let id = v.as_object().and_then(|o| o.values().next()).map(|b| b["requestId"].clone());
            answers.push(format!("{} {}", outcome(&v), id.unwrap_or_default()));
        }
        // And nothing more, even once the channel has a message: the next frame answers a
        // heartbeat.
        let bearer = format!("Authorization: Bearer {token}\r\n");
        let path = format!("/v1/channels/{ch}/messages");
        let (status, _) = http_with(target, "POST", &path, &bearer, "text/plain", b"gone").await;
        assert_eq!(status, 201);
        ws.send(WsMessage::Text(r#"{"heartbeat":{"nonce":"8"}}"#.into())).await.unwrap();
        let v = next_json(&mut ws).await;
        if v["heartbeat"]["nonce"] != "8" {
            answers.push(format!("then {v}"));
        }
        if answers != want {
            failures.push(format!("{ch}: expected {want:?}, got {answers:?}"));
        }
    }

    // 2. Cases that must end the connection, each with its close code.
    for (name, bytes, expected) in close_cases(&token) {
        cases += 1;
        let mut s = raw_ws(target).await;
        // The peer may close before taking everything (floods): that is fine.
        let _ = s.write_all(&bytes).await;
        let got = raw_close_code(&mut s).await;
        if got != Some(expected) {
            failures.push(format!("{name}: expected close {expected}, got {got:?}"));
        }
    }

    // 3. A token that expires during the connection, then is replayed.
    cases += 1;
    let short = token_with("replayer", now() + 2, &[("chat:*", &[Operation::Subscribe])]);
    let mut ws = connected(target, &short).await;
    let code = close_code(&mut ws).await;
    if code != Some(close::UNAUTHORIZED) {
        failures.push(format!("token expiring mid-connection: got {code:?}"));
    }
    cases += 1;
    let mut s = raw_ws(target).await;
    s.write_all(&raw_connect(&short)).await.unwrap();
    let code = raw_close_code(&mut s).await;
    if code != Some(close::UNAUTHORIZED) {
        failures.push(format!("expired token replayed: got {code:?}"));
    }

    // 4. HTTP.
    for (name, method, path, headers, ct, body, expected) in http_cases(&token) {
        cases += 1;
        let (status, text) = http_with(target, method, &path, &headers, ct, &body).await;
        if status != expected {
            failures.push(format!("HTTP {name}: expected {expected}, got {status} ({text})"));
        }
    }

    for ((name, method, path, headers, ct, body, expected), code) in http_answers(&token) {
        cases += 1;
        let (status, text) = http_with(target, method, &path, &headers, ct, &body).await;
        let got = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        if status != expected || got != code {
            failures
                .push(format!("HTTP {name}: expected {expected} {code}, got {status} ({text})"));
        }
    }

    // 5. Raw TCP: a handshake that never completes, and bytes that are not HTTP.
    cases += 1;
    let mut slow = TcpStream::connect(target).await.unwrap();
    slow.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(WAIT, slow.read(&mut buf)).await.expect("cut off in time");
    if !matches!(n, Ok(0) | Err(_)) && !String::from_utf8_lossy(&buf).contains(" 408 ") {
        failures.push(format!("slow-loris not cut off: {n:?}"));
    }
    cases += 1;
    let mut junk = TcpStream::connect(target).await.unwrap();
    junk.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, junk.read_to_end(&mut out)).await.expect("answered");
    let text = String::from_utf8_lossy(&out);
    if !(out.is_empty() || text.starts_with("HTTP/1.1 400")) {
        failures.push(format!("non-HTTP bytes: {text}"));
    }

    // 6. Garbage on the backbone port (QUIC over UDP): datagrams of every size, and a
    //    truncated Initial. The link to the peer must carry on.
    cases += 1;
    let backbone = c.nodes[0].node.settings().config.backbone.as_ref().unwrap().listen;
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..2000usize {
        let len = 1 + (i * 37) % 1400;
        let mut d = vec![(i % 256) as u8; len];
        if i % 3 == 0 {
            d[0] = 0xc0; // long header, looks like an Initial
        }
        let _ = udp.send_to(&d, backbone).await;
    }
    // Garbage over TCP to the same port number (nothing listens; nothing breaks).
    let _ = TcpStream::connect(backbone).await;

    // 7. An impostor with a certificate of the cluster CA naming eu-west/edge-1 (stolen
    //    credentials, or a confused operator) connects to us-east and sends impossible
    //    sequence numbers — u64::MAX and thousands far ahead — then a frame longer than
    //    the limit. us-east must drop the link with "bad frame" (code 2), hold bounded
    //    state, and the real eu-west link must come back (its connection was replaced, so
    //    it redials) with nothing of the steady stream lost.
    cases += 1;
    match impostor(&c).await {
        Ok(()) => {}
        Err(e) => failures.push(format!("impostor peer: {e}")),
    }

    // End the steady stream and check it arrived whole.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let sent = steady.await.unwrap();
    let closer = Client::connect(&format!("ws://{other}"), opts("closer")).await.unwrap();
    closer.publish_with("chat:steady", "", Some("last"), "last").await.unwrap();
    let got = reader.await.unwrap();
    let texts: Vec<String> = got
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => match &m.data {
                Some(tern_proto::client::message::Data::Text(t)) => Some(t.clone()),
                _ => None,
            },
            Event::Discontinuity { .. } => Some("DISCONTINUITY".into()),
        })
        .collect();
    let mut expected: Vec<String> = (0..sent).map(|k| k.to_string()).collect();
    expected.push("last".into());
    assert_eq!(texts, expected, "the well-behaved subscriber got every message, in order, once");

    // And the other direction across the healed link: eu-west → us-east.
    let back = Client::connect(&format!("ws://{other}"), opts("back")).await.unwrap();
    let mut back_sub = back.subscribe("chat:back").await.unwrap();
    let sender = Client::connect(&format!("ws://{target}"), opts("sender")).await.unwrap();
    sender.publish("chat:back", "after the impostor").await.unwrap();
    let ev = tokio::time::timeout(WAIT, back_sub.next()).await.expect("delivered").unwrap();
    assert!(matches!(ev, Event::Message(_)), "{ev:?}");

    assert!(cases >= 40, "the suite has {cases} cases");
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!(
        "bad-input suite: {cases} cases; the steady stream delivered {} messages whole",
        sent + 1
    );
    for n in c.nodes {
        n.stop().await;
    }
}

/// Messages in the storm's history, and their size (near the default
/// `limits.max_message_bytes`, 64 KiB).
const STORM_MESSAGES: usize = 100;
const STORM_BYTES: usize = 60_000;

/// Message `i` of the storm: its number, then padding to `STORM_BYTES`.
fn storm_text(i: usize) -> String {
    let mut t = format!("{i:05}:");
    t.extend(std::iter::repeat_n('x', STORM_BYTES - t.len()));
    t
}

/// `v` as JSON, cut to 300 bytes (storm frames hold megabytes).
fn short(v: &serde_json::Value) -> String {
    let mut s = v.to_string();
    if s.len() > 300 {
        let cut = (0..=300).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The number a storm message starts with.
fn storm_number(m: &serde_json::Value) -> usize {
    let text = m["text"].as_str().unwrap_or_else(|| panic!("a text message: {m}"));
    text[..5].parse().unwrap()
}

/// An HTTP reader of the storm: pages forwards through the whole history; a 503 must carry
/// `Retry-After` and `ERROR_CODE_RATE_LIMITED`, and is retried. Returns the message numbers
/// read and the refusals met.
async fn storm_http_reader(addr: SocketAddr) -> Result<(Vec<usize>, usize), String> {
    let (mut got, mut refusals, mut from) = (Vec::new(), 0, None::<u64>);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("not read within {WAIT:?} ({refusals} refusals)"));
        }
        let path = match from {
            Some(f) => {
                format!("/v1/channels/log:storm/messages?direction=forwards&limit=1000&from={f}")
            }
            None => "/v1/channels/log:storm/messages?direction=forwards&limit=1000".into(),
        };
        let (status, headers, body) =
            common::http_full(addr, "GET", &path, "", "text/plain", b"").await;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{status} {e}: {body:.200}"))?;
        match status {
            200 => {
                let messages =
                    v["messages"].as_array().ok_or(format!("no messages: {}", short(&v)))?;
                got.extend(messages.iter().map(storm_number));
                match v["next"]["from"].as_str().and_then(|f| f.parse().ok()) {
                    Some(f) => from = Some(f),
                    None if v["next"].is_null() => return Ok((got, refusals)),
                    None => return Err(format!("a `next` that is not a position: {}", v["next"])),
                }
            }
            503 => {
                let retry = headers.iter().find(|(k, _)| k == "retry-after").map(|(_, v)| v);
                if retry.is_none_or(|r| r.parse::<u64>().is_err())
                    || v["code"] != "ERROR_CODE_RATE_LIMITED"
                {
                    return Err(format!("a 503 not as documented: {headers:?} {v}"));
                }
                refusals += 1;
                // A test need not wait the whole second Retry-After asks for.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return Err(format!("HTTP {other}: {v}")),
        }
    }
}

/// A WebSocket of the storm with four readers (the per-connection limit) paging forwards
/// through the whole history at once. A refusal must be `error` RATE_LIMITED naming the
/// request, and is retried. Returns each reader's message numbers and the refusals met.
async fn storm_ws_readers(addr: SocketAddr) -> Result<(Vec<Vec<usize>>, usize), String> {
    let (mut c, _) = common::RawJson::connected(addr).await;
    let request = |id: u32, from: Option<&str>| {
        let mut h = serde_json::json!({"requestId": id, "channel": "log:storm", "forwards": true, "limit": 1000});
        if let Some(f) = from {
            h["from"] = f.into();
        }
        serde_json::json!({ "history": h }).to_string()
    };
    const READERS: usize = 4;
    let mut got = vec![Vec::new(); READERS];
    // The request each reader waits for (ids from 1: `page * READERS + reader + 1`), with
    // its `from`; `None` once the reader is done.
    let mut waiting: Vec<Option<(u32, Option<String>)>> =
        (1..=READERS).map(|r| Some((r as u32, None))).collect();
    for (id, _) in waiting.iter().flatten() {
        c.send(&request(*id, None)).await;
    }
    let mut refusals = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while waiting.iter().any(Option::is_some) {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("not read within {WAIT:?} ({refusals} refusals)"));
        }
        let v = c.recv().await;
        let (kind, body) = v.as_object().and_then(|o| o.iter().next()).ok_or(format!("{v}"))?;
        let id = body["requestId"].as_u64().ok_or(format!("an answer naming no request: {v}"))?;
        let reader = (id as usize + READERS - 1) % READERS;
        let Some((want, from)) = waiting[reader].clone() else {
            return Err(format!("an answer for a finished reader: {}", short(&v)));
        };
        if u64::from(want) != id {
            return Err(format!("expected request {want}, got {}", short(&v)));
        }
        match kind.as_str() {
            "history" => {
                let messages = body["messages"].as_array().cloned().unwrap_or_default();
                got[reader].extend(messages.iter().map(storm_number));
                waiting[reader] = match body["nextFrom"].as_str() {
                    Some(next) => {
                        let id = want + READERS as u32;
                        c.send(&request(id, Some(next))).await;
                        Some((id, Some(next.to_owned())))
                    }
                    None => None,
                };
            }
            "error" if body["code"] == "ERROR_CODE_RATE_LIMITED" => {
                refusals += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                c.send(&request(want, from.as_deref())).await;
            }
            _ => return Err(format!("unexpected answer: {}", short(&v))),
        }
    }
    Ok((got, refusals))
}

/// The read storm of the field report, on a shorter history (about 400 MB read): 100
/// messages of 60 KB; 32 HTTP readers and 8 WebSockets × 4 readers page through all of it
/// at once, while one more WebSocket asks for the whole history four times and a
/// rewind of it, and reads nothing. Every reader gets every message once, in order — after
/// the documented refusals (WebSocket `RATE_LIMITED`, HTTP 503 with `Retry-After`), which
/// it retries — the node lets the one that does not read go, and a bystander on the same
/// node, a plain protocol-level client, gets its live stream whole and in order throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_storm_is_served_whole_and_a_bystander_loses_nothing() {
    let data = common::temp_dir("storm");
    let dir = data.clone();
    let n = common::TestNode::start(move |cfg| {
        cfg.history.data_dir = dir;
        cfg.history.namespaces = vec![tern_edge::config::HistoryNamespace {
            name: "log".into(),
            max_messages: 1000,
            max_age: Duration::from_secs(3600),
        }];
        cfg.heartbeat.interval = Duration::from_secs(1);
        cfg.heartbeat.idle_timeout = Duration::from_secs(5);
        // A quarter of the default read memory, so that the storm meets the budget.
        cfg.limits.history_read_bytes = 16 << 20;
    })
    .await;
    let addr = n.addr;
    for i in 0..STORM_MESSAGES {
        let path = "/v1/channels/log:storm/messages";
        let (status, body) =
            http_with(addr, "POST", path, "", "text/plain", storm_text(i).as_bytes()).await;
        assert_eq!(status, 201, "{body}");
    }

    // The bystander, and its publisher, both on the node under the storm.
    let (mut bystander, _) = common::RawJson::connected(addr).await;
    bystander.send(r#"{"subscribe":{"requestId":1,"channel":"chat:calm"}}"#).await;
    assert!(bystander.recv().await.get("subscribed").is_some());
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let publisher = tokio::spawn(async move {
        let (mut p, _) = common::RawJson::connected(addr).await;
        let mut sent = 0u32;
        loop {
            let text = if stopped.is_cancelled() { "last".to_owned() } else { sent.to_string() };
            p.send(&format!(
                r#"{{"publish":{{"requestId":{sent},"channel":"chat:calm","text":"{text}"}}}}"#
            ))
            .await;
            let v = p.recv().await;
            assert!(v.get("ack").is_some(), "{v}");
            if text == "last" {
                return sent;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let watcher = tokio::spawn(async move {
        let mut texts = Vec::new();
        loop {
            let v = bystander.recv().await;
            let messages = v["deliver"]["messages"].as_array().cloned();
            for m in messages.unwrap_or_else(|| panic!("the bystander got {}", short(&v))) {
                texts.push(m["text"].as_str().unwrap_or("?").to_owned());
            }
            if texts.last().is_some_and(|t| t == "last") {
                return texts;
            }
        }
    });

    // The one that asks and does not read.
    let (mut staller, _) = common::RawJson::connected(addr).await;
    for id in 1..=4 {
        staller
            .send(&format!(
                r#"{{"history":{{"requestId":{id},"channel":"log:storm","limit":1000}}}}"#
            ))
            .await;
    }
    staller
        .send(r#"{"subscribe":{"requestId":5,"channel":"log:storm","rewind":{"count":100}}}"#)
        .await;

    let http: Vec<_> = (0..32).map(|_| tokio::spawn(storm_http_reader(addr))).collect();
    let ws: Vec<_> = (0..8).map(|_| tokio::spawn(storm_ws_readers(addr))).collect();
    let all: Vec<usize> = (0..STORM_MESSAGES).collect();
    let mut refusals = 0;
    for (i, h) in http.into_iter().enumerate() {
        let (got, refused) = h.await.unwrap().unwrap_or_else(|e| panic!("HTTP reader {i}: {e}"));
        assert!(got == all, "HTTP reader {i} read {} messages, not each once in order", got.len());
        refusals += refused;
    }
    for (i, h) in ws.into_iter().enumerate() {
        let (readers, refused) = h.await.unwrap().unwrap_or_else(|e| panic!("WebSocket {i}: {e}"));
        for (r, got) in readers.iter().enumerate() {
            assert!(
                got == &all,
                "WebSocket {i} reader {r} read {} messages, not each once in order",
                got.len()
            );
        }
        refusals += refused;
    }

    stop.cancel();
    let sent = publisher.await.unwrap();
    let texts = watcher.await.unwrap();
    let mut expected: Vec<String> = (0..sent).map(|k| k.to_string()).collect();
    expected.push("last".into());
    assert_eq!(texts, expected, "the bystander got every message once, in order");

    // Only the staller is left, holding its socket without reading: the node lets it go.
    assert!(
        common::eventually(|| n.node.connection_count() == 0).await,
        "a client that reads nothing is not kept ({} open)",
        n.node.connection_count()
    );
    drop(staller);
    println!(
        "read storm: 64 readers × {STORM_MESSAGES} messages of {STORM_BYTES} B read whole ({refusals} refusals retried); the bystander got {} messages whole",
        sent + 1
    );
    n.stop().await;
    let _ = std::fs::remove_dir_all(&data);
}
