//! The client protocol with hand-written frames over a raw client (no SDK): the documented
//! frames, error codes and close codes, over every transport (the WebSocket, HTTP
//! streaming, server-sent events, long polling) in both encodings where the transport
//! carries them.

use crate::common;

use common::transport::{ALL, BINARY, EVERY, Raw, Transport};
use common::{RawJson, TestNode, close_code, http};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test]
async fn hand_written_frames_publish_and_deliver() {
    for t in EVERY {
        for u in [(Transport::WebSocket, false), t] {
            publish_and_deliver(t, u).await;
        }
    }
}

/// A subscriber over `sub_t` and a publisher over `pub_t` (each: transport, protobuf).
async fn publish_and_deliver(sub_t: (Transport, bool), pub_t: (Transport, bool)) {
    let node = TestNode::start(|_| {}).await;
    let (mut sub, connected) = Raw::connected_in(node.addr, sub_t.0, sub_t.1).await;
    let c = &connected["connected"];
    assert_eq!(c["node"], "local/edge-1");
    assert_eq!(c["clientId"], "raw");
    assert_eq!(c["limits"]["maxMessageBytes"], 65536);
    sub.send(r#"{"subscribe":{"requestId":1,"channel":"chat:lobby"}}"#).await;
    let s = sub.recv().await;
    assert_eq!(s["subscribed"]["requestId"], 1);
    assert_eq!(s["subscribed"]["channel"], "chat:lobby");

    let (mut publ, _) = Raw::connected_in(node.addr, pub_t.0, pub_t.1).await;
    publ.send(r#"{"publish":{"requestId":7,"channel":"chat:lobby","id":"m-1","name":"greeting","text":"hi"}}"#).await;
    let ack = publ.recv().await;
    assert_eq!(ack["ack"]["requestId"], 7);
    assert_eq!(ack["ack"]["messageId"], "m-1");
    assert_eq!(ack["ack"]["originSeq"], "1");
    publ.send(r#"{"publish":{"requestId":8,"channel":"chat:lobby","binary":"AAEC"}}"#).await;
    assert_eq!(publ.recv().await["ack"]["requestId"], 8);

    let d = sub.recv().await;
    let m = &d["deliver"]["messages"][0];
    assert_eq!(m["channel"], "chat:lobby");
    assert_eq!(m["id"], "m-1");
    assert_eq!(m["name"], "greeting");
    assert_eq!(m["text"], "hi");
    assert_eq!(m["clientId"], "raw");
    assert_eq!(m["origin"], "local/edge-1");
    let m2 = sub.recv().await;
    let m2 = &m2["deliver"]["messages"][0];
    assert_eq!(m2["binary"], "AAEC");
    assert_eq!(m2["originSeq"], "2");

    // App-level heartbeat is echoed.
    sub.send(r#"{"heartbeat":{"nonce":"42"}}"#).await;
    assert_eq!(sub.recv().await, json!({"heartbeat":{"nonce":"42"}}));

    // Unsubscribe: confirmed, and no more deliveries.
    sub.send(r#"{"unsubscribe":{"requestId":2,"channel":"chat:lobby"}}"#).await;
    assert_eq!(sub.recv().await["unsubscribed"]["requestId"], 2);
    publ.send(r#"{"publish":{"requestId":9,"channel":"chat:lobby","text":"gone"}}"#).await;
    publ.recv().await;
    sub.send(r#"{"heartbeat":{"nonce":"1"}}"#).await;
    assert!(sub.recv().await.get("heartbeat").is_some(), "no delivery after unsubscribe");
    node.stop().await;
}

#[tokio::test]
async fn recoverable_errors_keep_the_connection_working() {
    for t in EVERY {
        recoverable_errors(t).await;
    }
}

async fn recoverable_errors((t, proto): (Transport, bool)) {
    let node = TestNode::start(|cfg| cfg.limits.max_channels_per_connection = 2).await;
    let (mut c, _) = Raw::connected_in(node.addr, t, proto).await;
    // Frames that do not decode, in JSON (protobuf's: protobuf_frames_over_every_binary_transport).
    let malformed = [
        (r#"{"subscribe":"#, 0, "ERROR_CODE_BAD_FRAME"),
        (r#"[1,2,3]"#, 0, "ERROR_CODE_BAD_FRAME"),
        (r#"{"subscribe":{"requestId":"x","channel":5}}"#, 0, "ERROR_CODE_BAD_FRAME"),
        (r#"{"frobnicate":{"requestId":1}}"#, 0, "ERROR_CODE_UNKNOWN_FRAME"),
        (r#"{}"#, 0, "ERROR_CODE_UNKNOWN_FRAME"),
    ];
    let cases = [
        (r#"{"subscribe":{"requestId":3,"channel":"chat room"}}"#, 3, "ERROR_CODE_INVALID_CHANNEL"),
        (r#"{"subscribe":{"requestId":4,"channel":"Chat:x"}}"#, 4, "ERROR_CODE_INVALID_CHANNEL"),
        (r#"{"subscribe":{"requestId":5,"channel":""}}"#, 5, "ERROR_CODE_INVALID_CHANNEL"),
        (r#"{"connect":{}}"#, 0, "ERROR_CODE_ALREADY_CONNECTED"),
    ];
    let malformed = if proto { &[][..] } else { &malformed[..] };
    for &(frame, request_id, code) in malformed.iter().chain(&cases) {
        c.send(frame).await;
        let e = c.recv().await;
        assert_eq!(e["error"]["code"], code, "{t:?}: frame {frame}: got {e}");
        assert_eq!(e["error"].get("requestId").and_then(|v| v.as_u64()).unwrap_or(0), request_id);
        assert!(!e["error"]["reason"].as_str().unwrap_or("").is_empty());
    }
    // Channel limit: two channels fit, the third is refused, re-subscribing is fine.
    for (i, ch) in ["a:1", "a:2", "a:1"].iter().enumerate() {
        c.send(&format!(r#"{{"subscribe":{{"requestId":{},"channel":"{ch}"}}}}"#, 10 + i)).await;
        assert!(c.recv().await.get("subscribed").is_some());
    }
    c.send(r#"{"subscribe":{"requestId":20,"channel":"a:3"}}"#).await;
    let e = c.recv().await;
    assert_eq!(e["error"]["code"], "ERROR_CODE_TOO_MANY_CHANNELS");
    assert_eq!(e["error"]["requestId"], 20);
    // Publish errors are nacks.
    let big = "x".repeat(65537);
    c.send(&format!(r#"{{"publish":{{"requestId":30,"channel":"a:1","text":"{big}"}}}}"#)).await;
    let n = c.recv().await;
    assert_eq!(n["nack"]["code"], "ERROR_CODE_MESSAGE_TOO_LARGE");
    assert_eq!(n["nack"]["requestId"], 30);
    c.send(r#"{"publish":{"requestId":31,"channel":"bad channel","text":"x"}}"#).await;
    assert_eq!(c.recv().await["nack"]["code"], "ERROR_CODE_INVALID_CHANNEL");
    let long_id = "i".repeat(200);
    c.send(&format!(
        r#"{{"publish":{{"requestId":32,"channel":"a:1","id":"{long_id}","text":"x"}}}}"#
    ))
    .await;
    assert_eq!(c.recv().await["nack"]["code"], "ERROR_CODE_INVALID_ARGUMENT");
    // After all that, the connection still publishes and delivers.
    c.send(r#"{"publish":{"requestId":40,"channel":"a:1","text":"still here"}}"#).await;
    let mut saw_ack = false;
    let mut saw_msg = false;
    while !(saw_ack && saw_msg) {
        let f = c.recv().await;
        saw_ack |= f["ack"]["requestId"] == 40;
        saw_msg |= f["deliver"]["messages"][0]["text"] == "still here";
    }
    node.stop().await;
}

#[tokio::test]
async fn protobuf_by_subprotocol_and_binary_frames() {
    use prost::Message as _;
    use tern_proto::client::*;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let node = TestNode::start(|_| {}).await;
    let mut req = format!("ws://{}/v1/ws", node.addr).into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "tern.v1.proto".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "tern.v1.proto");
    let frame = ClientFrame { kind: Some(client_frame::Kind::Connect(Connect::default())) };
    ws.send(WsMessage::Binary(frame.encode_to_vec().into())).await.unwrap();
    match ws.next().await {
        Some(Ok(WsMessage::Binary(b))) => {
            let f = ServerFrame::decode(b).unwrap();
            assert!(matches!(f.kind, Some(server_frame::Kind::Connected(_))));
        }
        other => panic!("expected a binary Connected frame, got {other:?}"),
    }
    node.stop().await;
}

#[tokio::test]
async fn oversize_frame_closes_with_1009() {
    let node = TestNode::start(|_| {}).await;
    let (mut c, _) = RawJson::connected(node.addr).await;
    // Above the default frame limit (`min_frame_bytes(max_message_bytes)`, 392 KiB).
    let huge = "y".repeat(tern_edge::config::min_frame_bytes(64 * 1024) + 1);
    let _ = c
        .ws
        .send(WsMessage::Text(format!(r#"{{"publish":{{"channel":"a","text":"{huge}"}}}}"#).into()))
        .await;
    assert_eq!(c.close_code().await, Some(1009));
    node.stop().await;
}

#[tokio::test]
async fn frames_before_connect_close_with_4002() {
    for (t, proto) in EVERY {
        let node = TestNode::start(|_| {}).await;
        let mut c = Raw::open(node.addr, t, proto).await;
        c.send(r#"{"subscribe":{"requestId":1,"channel":"a"}}"#).await;
        assert_eq!(c.close_code().await, Some(4002), "{t:?}");
        node.stop().await;
    }
}

/// Protobuf frames over every transport that carries them: connect, subscribe, publish,
/// deliver, and the close code at the end.
#[tokio::test]
async fn protobuf_frames_over_every_binary_transport() {
    use tern_proto::client::*;
    use tern_proto::codec::{Format, encode_client};
    for t in BINARY {
        let node = TestNode::start(|_| {}).await;
        let mut c = Raw::open(node.addr, t, true).await;
        c.send_binary(encode_client(
            client_frame::Kind::Connect(Connect::default()),
            Format::Protobuf,
        ))
        .await;
        assert!(matches!(c.recv_binary().await, server_frame::Kind::Connected(_)), "{t:?}");
        let sub = Subscribe { request_id: 1, channel: "p:1".into(), ..Default::default() };
        c.send_binary(encode_client(client_frame::Kind::Subscribe(sub), Format::Protobuf)).await;
        assert!(matches!(c.recv_binary().await, server_frame::Kind::Subscribed(_)), "{t:?}");
        let p = Publish {
            request_id: 2,
            channel: "p:1".into(),
            data: Some(publish::Data::Binary(vec![0, 1, 2].into())),
            ..Default::default()
        };
        c.send_binary(encode_client(client_frame::Kind::Publish(p), Format::Protobuf)).await;
        let (mut acked, mut delivered) = (false, false);
        while !(acked && delivered) {
            match c.recv_binary().await {
                server_frame::Kind::Ack(a) => acked = a.request_id == 2,
                server_frame::Kind::Deliver(d) => {
                    let data = &d.messages[0].data;
                    delivered = *data == Some(message::Data::Binary(vec![0, 1, 2].into()));
                }
                other => panic!("{t:?}: {other:?}"),
            }
        }
        // A second Connect is an error, not an end; bytes that are no frame are BAD_FRAME.
        c.send_binary(bytes::Bytes::from_static(&[0xff, 0xff, 0xff])).await;
        match c.recv_binary().await {
            server_frame::Kind::Error(e) => assert_eq!(e.code, ErrorCode::BadFrame as i32),
            other => panic!("{t:?}: {other:?}"),
        }
        node.stop().await;
        assert_eq!(c.close_code().await, Some(1001), "{t:?}: shutdown closes with 1001");
    }
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let node = TestNode::start(|_| {}).await;
    let (mut c, _) = RawJson::connected(node.addr).await;
    let frame = Frame::message(vec![0xff, 0xfe, 0x22], OpCode::Data(Data::Text), true);
    let _ = c.ws.send(WsMessage::Frame(frame)).await;
    assert_eq!(close_code(&mut c.ws).await, Some(1007));
    node.stop().await;
}

#[tokio::test]
async fn plain_http_gets_426_and_bad_format_400() {
    let node = TestNode::start(|_| {}).await;
    let (status, _) = http(node.addr, "GET", "/v1/ws", "text/plain", b"").await;
    assert_eq!(status, 426);
    let (status, body) = http(node.addr, "GET", "/healthz", "text/plain", b"").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (status, _) = http(node.addr, "GET", "/v1/ping", "text/plain", b"").await;
    assert_eq!(status, 204);
    let r = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws?format=xml", node.addr)).await;
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 400),
        other => panic!("expected HTTP 400, got {other:?}"),
    }
    node.stop().await;
}

/// A connection is not resumed as a whole: `connected` offers no session token, and one
/// sent by an older client is accepted and ignored.
#[tokio::test]
async fn a_session_resume_token_is_neither_offered_nor_refused() {
    for t in ALL {
        resume_token(t).await;
    }
}

async fn resume_token(t: Transport) {
    let n = TestNode::start(|_| {}).await;
    let mut c = Raw::open(n.addr, t, false).await;
    c.send(r#"{"connect":{"protocol":1,"clientId":"old","resumeToken":"f85f8b3ab8d5c.12"}}"#).await;
    let v = c.recv().await;
    let connected = v["connected"].as_object().unwrap_or_else(|| panic!("connected: {v}"));
    assert_eq!(connected["clientId"], "old");
    assert!(!connected.contains_key("resumeToken"), "{v}");
    n.stop().await;
}

const SECRET: &str = "a-test-secret-that-is-long-enough-0123456789";

/// A token for `sub` expiring in `secs` seconds: `chat:*` subscribe and publish, `news:*`
/// subscribe only.
fn token(sub: &str, secs: u64) -> String {
    use tern_edge::auth::{Claims, Operation, mint_hs256};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let mut capability = std::collections::BTreeMap::new();
    capability.insert("chat:*".to_owned(), vec![Operation::Subscribe, Operation::Publish]);
    capability.insert("news:*".to_owned(), vec![Operation::Subscribe]);
    let claims =
        Claims { sub: sub.into(), exp: now.as_secs() + secs, iat: Some(now.as_secs()), capability };
    mint_hs256(SECRET, &claims).unwrap()
}

/// Token mode: 4003 for a bad token at `connect` and at expiry, FORBIDDEN outside the
/// capabilities, UNAUTHORIZED and INVALID_ARGUMENT for refused renewals, `authRenewed` for a
/// good one — the same over every transport (run side by side: they share the waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_capabilities_and_renewal_over_every_transport() {
    let node = TestNode::start(|cfg| {
        cfg.auth.mode = tern_edge::auth::AuthMode::Token;
        cfg.auth.hs256_secret = Some(SECRET.into());
        cfg.auth.leeway = std::time::Duration::ZERO;
    })
    .await;
    futures_util::future::join_all(EVERY.map(|t| tokens(node.addr, t))).await;
    node.stop().await;
}

async fn tokens(addr: std::net::SocketAddr, (t, proto): (Transport, bool)) {
    let mut bad = Raw::open(addr, t, proto).await;
    bad.send(r#"{"connect":{"protocol":1,"token":"garbage"}}"#).await;
    assert_eq!(bad.close_code().await, Some(4003), "{t:?}: a bad token");

    // A token given when the session opens, expiring in 3 s and never renewed.
    let short = token("carol", 3);
    let mut a = Raw::open_with(addr, t, proto, &format!("&token={short}")).await;
    a.send(r#"{"connect":{"protocol":1}}"#).await;
    let v = a.recv().await;
    assert_eq!(v["connected"]["clientId"], "carol", "{t:?}: {v}");
    a.send(r#"{"subscribe":{"requestId":1,"channel":"other:x"}}"#).await;
    let e = a.recv().await;
    assert_eq!(e["error"]["code"], "ERROR_CODE_FORBIDDEN", "{t:?}: {e}");
    assert_eq!(e["error"]["requestId"], 1, "{t:?}: {e}");
    a.send(r#"{"publish":{"requestId":2,"channel":"news:x","text":"no"}}"#).await;
    let n = a.recv().await;
    assert_eq!(n["nack"]["code"], "ERROR_CODE_FORBIDDEN", "{t:?}: {n}");
    a.send(r#"{"auth":{"requestId":3,"token":"garbage"}}"#).await;
    let e = a.recv().await;
    assert_eq!(e["error"]["code"], "ERROR_CODE_UNAUTHORIZED", "{t:?}: {e}");
    let mallory = token("mallory", 3600);
    a.send(&json!({"auth": {"requestId": 4, "token": mallory}}).to_string()).await;
    let e = a.recv().await;
    assert_eq!(e["error"]["code"], "ERROR_CODE_INVALID_ARGUMENT", "{t:?}: {e}");

    // The same token in `connect`, renewed in band: it outlives the first expiry.
    let mut b = Raw::open(addr, t, proto).await;
    b.send(&json!({"connect": {"protocol": 1, "token": short}}).to_string()).await;
    assert_eq!(b.recv().await["connected"]["clientId"], "carol", "{t:?}");
    let fresh = token("carol", 3600);
    b.send(&json!({"auth": {"requestId": 5, "token": fresh}}).to_string()).await;
    let r = b.recv().await;
    assert_eq!(r["authRenewed"]["requestId"], 5, "{t:?}: {r}");
    assert_eq!(r["authRenewed"]["clientId"], "carol", "{t:?}: {r}");

    assert_eq!(a.close_code().await, Some(4003), "{t:?}: the unrenewed token expired");
    b.send(r#"{"heartbeat":{"nonce":"9"}}"#).await;
    assert_eq!(b.recv().await["heartbeat"]["nonce"], "9", "{t:?}: the renewed one lives on");
}

/// Publish rates (a `nack` with a retry hint, the session usable) and frame floods (4004),
/// over every transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_over_every_transport() {
    let node = TestNode::start(|cfg| {
        cfg.limits.publish_rate = 5;
        cfg.limits.publish_burst = 3;
        cfg.limits.frame_rate = 50;
        cfg.limits.frame_burst = 100;
    })
    .await;
    for (t, proto) in EVERY {
        let (mut c, _) = Raw::connected_in(node.addr, t, proto).await;
        for i in 1..=4 {
            c.send(&format!(r#"{{"publish":{{"requestId":{i},"channel":"chat:r","text":"x"}}}}"#))
                .await;
        }
        for i in 1..=3 {
            let v = c.recv().await;
            assert_eq!(v["ack"]["requestId"], i, "{t:?}: within the burst: {v}");
        }
        let v = c.recv().await;
        assert_eq!(v["nack"]["code"], "ERROR_CODE_RATE_LIMITED", "{t:?}: {v}");
        assert_eq!(v["nack"]["requestId"], 4, "{t:?}: {v}");
        assert!(v["nack"]["retryAfterMs"].as_u64().is_some_and(|ms| ms > 0), "{t:?}: {v}");

        // 1,000 heartbeats, far beyond the burst of 100 (over HTTP, 200 per POST).
        let (mut flood, _) = Raw::connected_in(node.addr, t, proto).await;
        let hb = |i: u32| format!(r#"{{"heartbeat":{{"nonce":"{i}"}}}}"#);
        let body = flood.body(&(0..200).map(hb).collect::<Vec<_>>());
        let frames: Vec<WsMessage> = (0..1000)
            .map(|i| match proto {
                true => WsMessage::Binary(flood.encode(&hb(i))),
                false => WsMessage::Text(hb(i).into()),
            })
            .collect();
        if let Some(ws) = flood.ws() {
            for frame in frames {
                if ws.send(frame).await.is_err() {
                    break;
                }
            }
        } else {
            let h = flood.http().unwrap();
            for _ in 0..5 {
                let (status, _, _) = h.post(body.clone()).await;
                if status != 202 {
                    break;
                }
            }
        }
        assert_eq!(flood.close_code().await, Some(4004), "{t:?}: a flood");
        // The rate-limited session still works.
        c.send(r#"{"heartbeat":{"nonce":"5"}}"#).await;
        assert_eq!(c.recv().await["heartbeat"]["nonce"], "5", "{t:?}");
    }
    node.stop().await;
}

/// The frames of a JSON `deliver`, flattened: the next `n` messages, skipping other frames
/// (acks) and collecting discontinuities.
async fn messages(
    c: &mut Raw,
    n: usize,
    gaps: &mut Vec<serde_json::Value>,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = c.recv().await;
        if let Some(d) = f.get("discontinuity") {
            gaps.push(d.clone());
        } else if let Some(ms) = f["deliver"]["messages"].as_array() {
            out.extend(ms.iter().cloned());
        }
    }
    out
}

fn texts(ms: &[serde_json::Value]) -> Vec<&str> {
    ms.iter().map(|m| m["text"].as_str().unwrap()).collect()
}

/// Where a client left off, as docs/protocol.md "Resume" says to keep it.
fn resume_from(node: &serde_json::Value, m: &serde_json::Value) -> serde_json::Value {
    json!({"node": node, "position": m["position"], "origins": [
        {"origin": m["origin"], "epoch": m["originEpoch"], "seq": m["originSeq"]}]})
}

/// Subscribes (with `resume` when given) and returns what came before `subscribed` too.
async fn subscribe(
    c: &mut Raw,
    channel: &str,
    extra: serde_json::Value,
    gaps: &mut Vec<serde_json::Value>,
) -> serde_json::Value {
    let mut sub = json!({"requestId": 1, "channel": channel});
    for (k, v) in extra.as_object().unwrap() {
        sub[k] = v.clone();
    }
    c.send(&json!({ "subscribe": sub }).to_string()).await;
    loop {
        let f = c.recv().await;
        match (f.get("subscribed"), f.get("discontinuity")) {
            (Some(s), _) => return s.clone(),
            (None, Some(d)) => gaps.push(d.clone()),
            _ => panic!("expected subscribed, got {f}"),
        }
    }
}

/// Rewind, the `history` frame, resume by position and by vector, and the discontinuity of
/// a channel without history, over every transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewind_history_resume_and_discontinuity_over_every_transport() {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("tern-protocol-{}-{nanos}", std::process::id()));
    let d = dir.clone();
    let node = TestNode::start(move |cfg| {
        cfg.history.data_dir = d;
        cfg.history.namespaces = vec![tern_edge::config::HistoryNamespace {
            name: "log".into(),
            max_messages: 10_000,
            max_age: std::time::Duration::from_secs(3600),
        }];
    })
    .await;
    for t in EVERY {
        replays(node.addr, t).await;
    }
    node.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

async fn publish_http(addr: std::net::SocketAddr, channel: &str, text: &str) {
    let path = format!("/v1/channels/{channel}/messages");
    let (status, body) = http(addr, "POST", &path, "text/plain", text.as_bytes()).await;
    assert_eq!(status, 201, "{body}");
}

async fn replays(addr: std::net::SocketAddr, (t, proto): (Transport, bool)) {
    let mut gaps = Vec::new();
    let ch = format!("log:{}-{proto}", t.name());
    for i in 1..=5 {
        publish_http(addr, &ch, &format!("m{i}")).await;
    }
    let (mut c, connected) = Raw::connected_in(addr, t, proto).await;
    let node = connected["connected"]["node"].clone();
    let s = subscribe(&mut c, &ch, json!({"rewind": {"count": 3}}), &mut gaps).await;
    assert!(s["position"]["offset"].is_string(), "{t:?}: {s}");
    let rewound = messages(&mut c, 3, &mut gaps).await;
    assert_eq!(texts(&rewound), ["m3", "m4", "m5"], "{t:?}");

    c.send(&json!({"history": {"requestId": 7, "channel": ch, "limit": 2}}).to_string()).await;
    let page = c.recv().await;
    let h = &page["history"];
    assert_eq!(h["requestId"], 7, "{t:?}: {page}");
    assert_eq!(texts(h["messages"].as_array().unwrap()), ["m5", "m4"], "{t:?}: newest first");
    assert!(h["nextFrom"].is_string(), "{t:?}: {page}");
    c.send(r#"{"history":{"requestId":8,"channel":"chat:none","limit":2}}"#).await;
    assert_eq!(c.recv().await["error"]["code"], "ERROR_CODE_UNSUPPORTED", "{t:?}");
    drop(c);

    // Away after m3: the same node replays m4 and m5, then the live stream, each once.
    let at = resume_from(&node, &rewound[0]);
    let (mut r, _) = Raw::connected_in(addr, t, proto).await;
    let s = subscribe(&mut r, &ch, json!({ "resume": at }), &mut gaps).await;
    assert_eq!(s["resumed"], true, "{t:?}: {s}");
    publish_http(addr, &ch, "m6").await;
    assert_eq!(texts(&messages(&mut r, 3, &mut gaps).await), ["m4", "m5", "m6"], "{t:?}");
    // By vector alone (as on another node): the same.
    let mut by_vector = resume_from(&node, &rewound[0]);
    by_vector["node"] = json!("elsewhere/edge-9");
    let (mut v, _) = Raw::connected_in(addr, t, proto).await;
    subscribe(&mut v, &ch, json!({ "resume": by_vector }), &mut gaps).await;
    assert_eq!(texts(&messages(&mut v, 3, &mut gaps).await), ["m4", "m5", "m6"], "{t:?}");
    assert!(gaps.is_empty(), "{t:?}: {gaps:?}");

    // A channel without history: what was published while away is announced, not hidden.
    let chat = format!("chat:{}-{proto}", t.name());
    let (mut c, _) = Raw::connected_in(addr, t, proto).await;
    subscribe(&mut c, &chat, json!({}), &mut gaps).await;
    publish_http(addr, &chat, "a").await;
    let a = messages(&mut c, 1, &mut gaps).await;
    drop(c);
    publish_http(addr, &chat, "lost").await;
    let (mut c, _) = Raw::connected_in(addr, t, proto).await;
    subscribe(&mut c, &chat, json!({ "resume": resume_from(&node, &a[0]) }), &mut gaps).await;
    publish_http(addr, &chat, "b").await;
    assert_eq!(texts(&messages(&mut c, 1, &mut gaps).await), ["b"], "{t:?}");
    assert_eq!(gaps.len(), 1, "{t:?}: {gaps:?}");
    assert_eq!(gaps[0]["channel"], chat.as_str(), "{t:?}");
}

/// A session whose client stops reading (or polling) while its channel is busy ends with
/// 4001, after what was queued, over every transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_end_with_4001_over_every_transport() {
    let node = TestNode::start(|cfg| {
        cfg.limits.send_queue_messages = 64;
        cfg.timeouts.close = std::time::Duration::from_secs(20);
    })
    .await;
    for (t, proto) in EVERY {
        let ch = format!("feed:{}-{proto}", t.name());
        let mut s = Raw::open_buffered(node.addr, t, proto, "", 4).await;
        s.send(r#"{"connect":{"protocol":1}}"#).await;
        assert!(s.recv().await.get("connected").is_some(), "{t:?}");
        s.send(&json!({"subscribe": {"requestId": 1, "channel": ch}}).to_string()).await;
        assert!(s.recv().await.get("subscribed").is_some(), "{t:?}");
        // 500 messages of 60 KB (30 MB: more than socket buffers hold) while `s` reads none.
        let (mut p, _) = Raw::connected(node.addr, Transport::WebSocket).await;
        let text = "x".repeat(60_000);
        for i in 1..=500 {
            let f = json!({"publish": {"requestId": i, "channel": ch, "text": text}});
            p.send(&f.to_string()).await;
        }
        let mut acks = 0;
        while acks < 500 {
            acks += usize::from(p.recv().await.get("ack").is_some());
        }
        assert_eq!(s.close_code().await, Some(4001), "{t:?}");
    }
    node.stop().await;
}

/// A client that shows no sign of life — a WebSocket that answers no ping, a long-polling
/// session nobody polls — ends with 4000; a stream or SSE session lives as long as it is
/// read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_end_with_4000_and_read_streams_live_on() {
    use common::transport::{connect, request};
    let node = TestNode::start(|cfg| {
        cfg.heartbeat.interval = std::time::Duration::from_millis(200);
        cfg.heartbeat.idle_timeout = std::time::Duration::from_millis(1500);
        cfg.timeouts.close = std::time::Duration::from_secs(20);
    })
    .await;
    let (mut ws, _) = Raw::connected(node.addr, Transport::WebSocket).await;
    let (mut stream, _) = Raw::connected(node.addr, Transport::Stream).await;
    let (mut sse, _) = Raw::connected(node.addr, Transport::Sse).await;
    // A long-polling session opened and connected by hand, then never polled.
    let mut conn = connect(node.addr).await;
    let (status, _, body) =
        request(&mut conn, "GET", "/v1/sessions?transport=poll", &[], bytes::Bytes::new()).await;
    assert_eq!(status, 200);
    let first: serde_json::Value =
        serde_json::from_slice(body.split(|&b| b == b'\n').next().unwrap()).unwrap();
    let id = first["session"]["id"].as_str().unwrap().to_owned();
    let secret = first["session"]["secret"].as_str().unwrap().to_owned();
    let auth = [("x-tern-session-secret", secret.as_str())];
    let connect_frame = bytes::Bytes::from_static(b"{\"connect\":{\"protocol\":1}}\n");
    let (status, _, _) =
        request(&mut conn, "POST", &format!("/v1/sessions/{id}"), &auth, connect_frame).await;
    assert_eq!(status, 202);

    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(ws.close_code().await, Some(4000), "a WebSocket that answers no ping");
    let path = format!("/v1/sessions/{id}/poll?ack=0");
    let (status, _, body) = request(&mut conn, "GET", &path, &auth, bytes::Bytes::new()).await;
    assert_eq!(status, 200);
    let frames: Vec<serde_json::Value> = body
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert!(frames[0].get("connected").is_some(), "{frames:?}");
    assert_eq!(frames.last().unwrap()["close"]["code"], 4000, "{frames:?}");
    for c in [&mut stream, &mut sse] {
        c.send(r#"{"heartbeat":{"nonce":"3"}}"#).await;
        assert_eq!(c.recv().await["heartbeat"]["nonce"], "3", "{:?}", c.transport);
    }
    node.stop().await;
}
