//! Presence over the client protocol, with hand-written frames (no SDK): enter, update,
//! leave and get, the snapshot and events of `subscribe { presence: true }`, paging, every
//! presence error, members that outlive a dropped connection for `presence.grace` and are
//! recovered by a reconnect — over every transport in both encodings where it applies.
//! The bad-input cases: oversize data, one connection entering 100,000 channels, another
//! client's member, presence without the capability.

use crate::common;

use std::time::Duration;

use common::TestNode;
use common::transport::{EVERY, Raw, Transport};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const ENTER: &str = "PRESENCE_ACTION_ENTER";
const UPDATE: &str = "PRESENCE_ACTION_UPDATE";
const LEAVE: &str = "PRESENCE_ACTION_LEAVE";
const GET: &str = "PRESENCE_ACTION_GET";

async fn connect(
    addr: std::net::SocketAddr,
    (t, proto): (Transport, bool),
    id: &str,
) -> (Raw, Value) {
    let mut c = Raw::open(addr, t, proto).await;
    c.send(&json!({"connect": {"protocol": 1, "clientId": id}}).to_string()).await;
    let v = c.recv().await;
    assert!(v.get("connected").is_some(), "{t:?}: {v}");
    (c, v["connected"].clone())
}

/// Sends a presence request and returns its answer (a `presenceReply` or an `error`),
/// skipping the presence events that come before it.
async fn request(c: &mut Raw, body: Value) -> Value {
    let id = body["requestId"].clone();
    c.send(&json!({ "presence": body }).to_string()).await;
    loop {
        let f = c.recv().await;
        if f.get("presence").is_some() {
            continue;
        }
        let answer = f.get("presenceReply").or_else(|| f.get("error"));
        assert_eq!(answer.map(|a| &a["requestId"]), Some(&id), "{f}");
        return f;
    }
}

/// The next presence events frame.
async fn events(c: &mut Raw) -> Value {
    let f = c.recv().await;
    assert!(f.get("presence").is_some(), "expected presence events, got {f}");
    f["presence"].clone()
}

/// Subscribes with presence and returns the snapshot's members (every page).
async fn watch(c: &mut Raw, request_id: u32, channel: &str) -> Vec<Value> {
    let sub = json!({"subscribe": {"requestId": request_id, "channel": channel, "presence": true}});
    c.send(&sub.to_string()).await;
    let (mut subscribed, mut done, mut members) = (false, false, Vec::new());
    while !(subscribed && done) {
        let f = c.recv().await;
        if let Some(s) = f.get("subscribed") {
            assert_eq!(s["requestId"], request_id, "{f}");
            subscribed = true;
        } else if let Some(r) = f.get("presenceReply") {
            assert_eq!(r["requestId"], request_id, "{f}");
            assert!(!done, "a page after the last: {f}");
            members.extend(r["members"].as_array().cloned().unwrap_or_default());
            done = r["next"].as_str().unwrap_or_default().is_empty();
        } else {
            panic!("expected subscribed or presenceReply, got {f}");
        }
    }
    members
}

fn code(f: &Value) -> &str {
    f["error"]["code"].as_str().unwrap_or("(no error)")
}

/// Enter, update, get, the snapshot and events of watchers, leave, and every error, over
/// every transport in both encodings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_frames_and_errors_over_every_transport() {
    let node = TestNode::start(|cfg| {
        cfg.presence.max_data_bytes = 64;
        cfg.presence.max_channels_per_connection = 3;
        cfg.presence.max_members = 4;
        cfg.presence.page_size = 2;
        cfg.limits.frame_rate = 10_000;
        cfg.limits.frame_burst = 10_000;
    })
    .await;
    futures_util::future::join_all(EVERY.map(|t| frames(node.addr, t))).await;
    node.stop().await;
}

async fn frames(addr: std::net::SocketAddr, t: (Transport, bool)) {
    let room = format!("room:{}-{}", t.0.name(), t.1);
    let (mut alice, connected) = connect(addr, t, "alice").await;
    let alice_conn = connected["connectionId"].as_str().unwrap().to_owned();
    let node = connected["node"].clone();
    let (mut bob, _) = connect(addr, t, "bob").await;
    assert!(watch(&mut bob, 1, &room).await.is_empty(), "{t:?}: nobody yet");

    // Enter: answered with an empty reply; the watcher sees who, from which node.
    let r = request(
        &mut alice,
        json!({"requestId": 2, "channel": room, "action": ENTER, "text": "hi"}),
    )
    .await;
    assert_eq!(r["presenceReply"]["channel"], room, "{t:?}: {r}");
    let e = events(&mut bob).await;
    assert_eq!(e["channel"], room, "{t:?}: {e}");
    let ev = &e["events"][0];
    assert_eq!(ev["action"], ENTER, "{t:?}: {e}");
    assert_eq!(ev["member"]["clientId"], "alice", "{t:?}: {e}");
    assert_eq!(ev["member"]["connectionId"], alice_conn.as_str(), "{t:?}: {e}");
    assert_eq!(ev["member"]["node"], node, "{t:?}: {e}");
    assert_eq!(ev["member"]["text"], "hi", "{t:?}: {e}");

    // Update with binary data; the same data again changes nothing (no event).
    let upd = json!({"requestId": 3, "channel": room, "action": UPDATE, "binary": "AAEC"});
    request(&mut alice, upd.clone()).await;
    let e = events(&mut bob).await;
    assert_eq!(e["events"][0]["action"], UPDATE, "{t:?}: {e}");
    assert_eq!(e["events"][0]["member"]["binary"], "AAEC", "{t:?}: {e}");
    request(&mut alice, upd).await;

    // Two more members; a get pages by two (`page_size`).
    let (mut carol, _) = connect(addr, t, "carol").await;
    let (mut dave, _) = connect(addr, t, "dave").await;
    for (c, id) in [(&mut carol, 4), (&mut dave, 5)] {
        let r = request(c, json!({"requestId": id, "channel": room, "action": ENTER})).await;
        assert!(r.get("presenceReply").is_some(), "{t:?}: {r}");
    }
    for who in ["carol", "dave"] {
        let e = events(&mut bob).await;
        assert_eq!(e["events"][0]["member"]["clientId"], who, "{t:?}: {e}");
        assert!(e["events"][0]["member"].get("text").is_none(), "{t:?}: no data: {e}");
    }
    let p1 = request(&mut bob, json!({"requestId": 6, "channel": room, "action": GET, "limit": 5}))
        .await;
    let page = &p1["presenceReply"];
    assert_eq!(page["members"].as_array().unwrap().len(), 2, "{t:?}: {p1}");
    let next = page["next"].as_str().unwrap().to_owned();
    assert!(!next.is_empty(), "{t:?}: {p1}");
    let p2 =
        request(&mut bob, json!({"requestId": 7, "channel": room, "action": GET, "after": next}))
            .await;
    let ids: Vec<&str> = [&p1, &p2]
        .iter()
        .flat_map(|p| p["presenceReply"]["members"].as_array().unwrap())
        .map(|m| m["clientId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alice", "carol", "dave"], "{t:?}: {p2}");
    assert!(p2["presenceReply"].get("next").is_none_or(|n| n == ""), "{t:?}: {p2}");

    // A late watcher gets the same set as a snapshot, in pages.
    let (mut erin, _) = connect(addr, t, "erin").await;
    let snapshot = watch(&mut erin, 1, &room).await;
    assert_eq!(snapshot.len(), 3, "{t:?}: {snapshot:?}");
    assert_eq!(snapshot[0]["binary"], "AAEC", "{t:?}: {snapshot:?}");

    // Errors, each naming its request and leaving the connection working.
    let cases = [
        (json!({"requestId": 10, "channel": room}), "ERROR_CODE_INVALID_ARGUMENT"),
        (
            json!({"requestId": 11, "channel": "bad name", "action": ENTER}),
            "ERROR_CODE_INVALID_CHANNEL",
        ),
        (
            json!({"requestId": 12, "channel": room, "action": ENTER, "text": "x".repeat(65)}),
            "ERROR_CODE_MESSAGE_TOO_LARGE",
        ),
    ];
    for (body, expected) in cases {
        let e = request(&mut erin, body.clone()).await;
        assert_eq!(code(&e), expected, "{t:?}: {body} -> {e}");
    }
    // An action this node does not know: INVALID_ARGUMENT in protobuf (an open enum), a
    // frame that does not decode (BAD_FRAME) in JSON (enums by name).
    let e = if t.1 {
        use prost::Message as _;
        use tern_proto::client::{ClientFrame, PresenceRequest, client_frame};
        let request = PresenceRequest {
            request_id: 13,
            channel: "room:x".into(),
            action: 9,
            ..Default::default()
        };
        let f = ClientFrame { kind: Some(client_frame::Kind::Presence(request)) };
        erin.send_binary(f.encode_to_vec().into()).await;
        (erin.recv().await, "ERROR_CODE_INVALID_ARGUMENT")
    } else {
        erin.send(
            r#"{"presence":{"requestId":13,"channel":"room:x","action":"PRESENCE_ACTION_FLY"}}"#,
        )
        .await;
        (erin.recv().await, "ERROR_CODE_BAD_FRAME")
    };
    assert_eq!(code(&e.0), e.1, "{t:?}: an unknown action: {}", e.0);
    assert_eq!(e.0["error"]["requestId"], 13, "{t:?}: {}", e.0);
    // The fifth member: the channel is full (max_members = 4).
    let r = request(&mut erin, json!({"requestId": 14, "channel": room, "action": ENTER})).await;
    assert!(r.get("presenceReply").is_some(), "{t:?}: {r}");
    let (mut frank, _) = connect(addr, t, "frank").await;
    let e = request(&mut frank, json!({"requestId": 15, "channel": room, "action": ENTER})).await;
    assert_eq!(code(&e), "ERROR_CODE_CHANNEL_FULL", "{t:?}: {e}");
    // A member of three channels may not enter a fourth (max_channels_per_connection = 3).
    for (i, n) in [16, 17].into_iter().enumerate() {
        let other = format!("{room}-{i}");
        let r =
            request(&mut frank, json!({"requestId": n, "channel": other, "action": ENTER})).await;
        assert!(r.get("presenceReply").is_some(), "{t:?}: {r}");
    }
    let r = request(
        &mut frank,
        json!({"requestId": 18, "channel": format!("{room}-2"), "action": ENTER}),
    )
    .await;
    assert!(r.get("presenceReply").is_some(), "{t:?}: {r}");
    let e = request(
        &mut frank,
        json!({"requestId": 19, "channel": format!("{room}-3"), "action": ENTER}),
    )
    .await;
    assert_eq!(code(&e), "ERROR_CODE_TOO_MANY_CHANNELS", "{t:?}: {e}");

    // Leave: the watchers see it with the member's last data; leaving again is a no-op.
    let mut seen = Vec::new();
    request(&mut alice, json!({"requestId": 20, "channel": room, "action": LEAVE})).await;
    request(&mut alice, json!({"requestId": 21, "channel": room, "action": LEAVE})).await;
    while seen.len() < 2 {
        let e = events(&mut bob).await;
        seen.extend(e["events"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(seen[0]["action"], ENTER, "{t:?}: erin entered: {seen:?}");
    assert_eq!(seen[1]["action"], LEAVE, "{t:?}: {seen:?}");
    assert_eq!(seen[1]["member"]["clientId"], "alice", "{t:?}: {seen:?}");
    assert_eq!(seen[1]["member"]["binary"], "AAEC", "{t:?}: {seen:?}");
    // Unsubscribed: no more events for bob.
    bob.send(&json!({"unsubscribe": {"requestId": 30, "channel": room}}).to_string()).await;
    assert!(bob.recv().await.get("unsubscribed").is_some(), "{t:?}");
    request(&mut carol, json!({"requestId": 31, "channel": room, "action": LEAVE})).await;
    bob.send(r#"{"heartbeat":{"nonce":"1"}}"#).await;
    let f = bob.recv().await;
    assert_eq!(f["heartbeat"]["nonce"], "1", "{t:?}: nothing after unsubscribed: {f}");
}

/// Presence requests beyond `presence.rate` are refused with RATE_LIMITED, over every
/// transport in both encodings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_rate_limit_over_every_transport() {
    let node = TestNode::start(|cfg| {
        cfg.presence.rate = 1;
        cfg.presence.burst = 2;
        cfg.presence.max_channels_per_connection = 2;
    })
    .await;
    for t in EVERY {
        let (mut c, _) = connect(node.addr, t, "eve").await;
        for id in 1..=2 {
            let body = json!({"requestId": id, "channel": "room:r", "action": GET});
            assert!(request(&mut c, body).await.get("presenceReply").is_some(), "{t:?}");
        }
        let e = request(&mut c, json!({"requestId": 3, "channel": "room:r", "action": GET})).await;
        assert_eq!(code(&e), "ERROR_CODE_RATE_LIMITED", "{t:?}: {e}");
    }
    node.stop().await;
}

const SECRET: &str = "a-test-secret-that-is-long-enough-0123456789";

fn token(sub: &str, caps: &[(&str, &[tern_edge::auth::Operation])]) -> String {
    use tern_edge::auth::{Claims, mint_hs256};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let capability = caps.iter().map(|(c, ops)| (c.to_string(), ops.to_vec())).collect();
    let claims =
        Claims { sub: sub.into(), exp: now.as_secs() + 3600, iat: Some(now.as_secs()), capability };
    mint_hs256(SECRET, &claims).unwrap()
}

/// Capabilities: `presence` enters and reads; `subscribe` alone reads only the namespaces
/// listed in `presence.subscribe_reads`; neither enters. Over every transport and encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_needs_its_capability() {
    use tern_edge::auth::Operation::{Presence, Subscribe};
    let node = TestNode::start(|cfg| {
        cfg.auth.mode = tern_edge::auth::AuthMode::Token;
        cfg.auth.hs256_secret = Some(SECRET.into());
        cfg.presence.subscribe_reads = vec!["lobby".into()];
    })
    .await;
    for t in EVERY {
        let member = token("m", &[("chat:*", &[Subscribe, Presence]), ("lobby:*", &[Presence])]);
        let reader = token("r", &[("chat:*", &[Subscribe]), ("lobby:*", &[Subscribe])]);
        let mut m = Raw::open(node.addr, t.0, t.1).await;
        m.send(&json!({"connect": {"protocol": 1, "token": member}}).to_string()).await;
        assert!(m.recv().await.get("connected").is_some(), "{t:?}");
        let mut r = Raw::open(node.addr, t.0, t.1).await;
        r.send(&json!({"connect": {"protocol": 1, "token": reader}}).to_string()).await;
        assert!(r.recv().await.get("connected").is_some(), "{t:?}");
        for channel in ["chat:a", "lobby:a"] {
            let ok =
                request(&mut m, json!({"requestId": 1, "channel": channel, "action": ENTER})).await;
            assert!(ok.get("presenceReply").is_some(), "{t:?}: {ok}");
            let e =
                request(&mut r, json!({"requestId": 2, "channel": channel, "action": ENTER})).await;
            assert_eq!(code(&e), "ERROR_CODE_FORBIDDEN", "{t:?}: {channel}: {e}");
        }
        // Reading: chat needs `presence`, lobby is readable with `subscribe`.
        let e = request(&mut r, json!({"requestId": 3, "channel": "chat:a", "action": GET})).await;
        assert_eq!(code(&e), "ERROR_CODE_FORBIDDEN", "{t:?}: {e}");
        r.send(r#"{"subscribe":{"requestId":4,"channel":"chat:a","presence":true}}"#).await;
        let e = r.recv().await;
        assert_eq!(code(&e), "ERROR_CODE_FORBIDDEN", "{t:?}: {e}");
        assert_eq!(e["error"]["requestId"], 4, "{t:?}: {e}");
        let page =
            request(&mut r, json!({"requestId": 5, "channel": "lobby:a", "action": GET})).await;
        let members = page["presenceReply"]["members"].as_array().cloned().unwrap_or_default();
        assert!(members.iter().any(|x| x["clientId"] == "m"), "{t:?}: {page}");
        assert!(!watch(&mut r, 6, "lobby:a").await.is_empty(), "{t:?}");
        if t == EVERY[0] {
            http_presence(node.addr, &member, &reader).await;
        }
        // The member leaves (the next transport starts clean).
        for channel in ["chat:a", "lobby:a"] {
            request(&mut m, json!({"requestId": 7, "channel": channel, "action": LEAVE})).await;
        }
    }
    node.stop().await;
}

/// A connection that drops keeps its members for `presence.grace`: a reconnect with
/// `recover` keeps them with no leave and enter seen; without, they leave once the grace
/// is over. Another client cannot recover or leave them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_outlive_a_dropped_connection_for_the_grace() {
    let node = TestNode::start(|cfg| {
        cfg.presence.grace = Duration::from_millis(1500);
    })
    .await;
    let ws = (Transport::WebSocket, false);
    let (mut watcher, _) = connect(node.addr, ws, "watcher").await;
    assert!(watch(&mut watcher, 1, "room:g").await.is_empty());

    let (mut alice, c) = connect(node.addr, ws, "alice").await;
    let first = c["connectionId"].as_str().unwrap().to_owned();
    request(&mut alice, json!({"requestId": 1, "channel": "room:g", "action": ENTER, "text": "a"}))
        .await;
    assert_eq!(events(&mut watcher).await["events"][0]["action"], ENTER);
    drop(alice);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Mallory names alice's connection: she recovers nothing, and cannot make alice leave.
    let mut mallory = Raw::open(node.addr, ws.0, ws.1).await;
    let hello = json!({"connect": {"protocol": 1, "clientId": "mallory", "recover": first}});
    mallory.send(&hello.to_string()).await;
    assert!(mallory.recv().await.get("connected").is_some());
    let r =
        request(&mut mallory, json!({"requestId": 2, "channel": "room:g", "action": LEAVE})).await;
    assert!(r.get("presenceReply").is_some(), "{r}");

    // Alice reconnects within the grace and recovers her member: no leave, no enter.
    let mut alice = Raw::open(node.addr, ws.0, ws.1).await;
    let hello = json!({"connect": {"protocol": 1, "clientId": "alice", "recover": first}});
    alice.send(&hello.to_string()).await;
    let second = alice.recv().await["connected"]["connectionId"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    // Re-entering with the same data (as an SDK does after any reconnect) changes nothing.
    request(&mut alice, json!({"requestId": 3, "channel": "room:g", "action": ENTER, "text": "a"}))
        .await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let page =
        request(&mut watcher, json!({"requestId": 4, "channel": "room:g", "action": GET})).await;
    let members = page["presenceReply"]["members"].as_array().cloned().unwrap();
    assert_eq!(members.len(), 1, "{page}");
    assert_eq!(members[0]["connectionId"], first.as_str(), "the member kept its id: {page}");

    // Dropped again, and not recovered: the member leaves once the grace is over.
    drop(alice);
    let e = events(&mut watcher).await;
    assert_eq!(e["events"][0]["action"], LEAVE, "{e}");
    assert_eq!(e["events"][0]["member"]["clientId"], "alice", "{e}");
    assert_eq!(e["events"][0]["member"]["text"], "a", "{e}");
    node.stop().await;
}

/// One connection entering 100,000 channels: `presence.max_channels_per_connection` of
/// them are entered, the rest refused one by one, the node holds no more, and the
/// connection still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_entering_100k_channels_is_bounded() {
    const N: u32 = 100_000;
    let node = TestNode::start(|cfg| {
        cfg.presence.rate = 1_000_000;
        cfg.presence.burst = 1_000_000;
        cfg.limits.frame_rate = 1_000_000;
        cfg.limits.frame_burst = 1_000_000;
    })
    .await;
    let max = tern_edge::config::Config::default().presence.max_channels_per_connection;
    let (mut c, _) = connect(node.addr, (Transport::WebSocket, false), "flood").await;
    let (mut entered, mut refused) = (0, 0);
    // Pipelined a thousand at a time (the answers of a batch fit the socket buffers).
    for batch in 0..N / 1000 {
        let ids = batch * 1000 + 1..=(batch + 1) * 1000;
        let ws = c.ws().unwrap();
        for i in ids.clone() {
            let f = json!({"presence": {"requestId": i, "channel": format!("flood:{i}"), "action": ENTER}});
            ws.feed(Message::Text(f.to_string().into())).await.unwrap();
        }
        ws.flush().await.unwrap();
        for i in ids {
            let f = c.recv().await;
            if let Some(r) = f.get("presenceReply") {
                assert_eq!(r["requestId"], i, "{f}");
                entered += 1;
            } else {
                assert_eq!(code(&f), "ERROR_CODE_TOO_MANY_CHANNELS", "{f}");
                assert_eq!(f["error"]["requestId"], i, "{f}");
                refused += 1;
            }
        }
    }
    assert_eq!((entered, refused), (max, N as usize - max));
    let held: usize = node.node.presence().counts(None).values().sum();
    assert_eq!(held, max);
    c.send(r#"{"heartbeat":{"nonce":"2"}}"#).await;
    assert_eq!(c.recv().await["heartbeat"]["nonce"], "2");
    node.stop().await;
}

/// `GET /v1/channels/{channel}/presence`: the same members, paging and capability rule as
/// the `presence` request's `GET`.
async fn http_presence(addr: std::net::SocketAddr, member: &str, reader: &str) {
    let get = |path: String, token: &str| {
        let auth = if token.is_empty() {
            String::new()
        } else {
            format!("Authorization: Bearer {token}\r\n")
        };
        async move {
            let (status, _, body) =
                common::http_request(addr, "GET", &path, &format!("Host: t\r\n{auth}"), b"").await;
            (status, serde_json::from_str::<Value>(&body).unwrap_or(Value::Null))
        }
    };
    let (status, body) = get("/v1/channels/chat:a/presence".into(), member).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["channel"], "chat:a", "{body}");
    assert_eq!(body["members"][0]["clientId"], "m", "{body}");
    assert!(body["next"].is_null(), "{body}");
    let (status, body) = get("/v1/channels/lobby:a/presence?limit=1".into(), reader).await;
    assert_eq!(status, 200, "subscribe reads lobby: {body}");
    assert_eq!(body["members"].as_array().map(Vec::len), Some(1), "{body}");
    for (path, token, expected, code) in [
        ("/v1/channels/chat:a/presence", reader, 403, "ERROR_CODE_FORBIDDEN"),
        ("/v1/channels/chat:a/presence", "", 401, "ERROR_CODE_UNAUTHORIZED"),
        ("/v1/channels/chat:a/presence?limit=many", member, 400, "ERROR_CODE_BAD_FRAME"),
        ("/v1/channels/bad%20name/presence", member, 400, "ERROR_CODE_INVALID_CHANNEL"),
    ] {
        let (status, body) = get(path.into(), token).await;
        assert_eq!(status, expected, "{path}: {body}");
        assert_eq!(body["code"], code, "{path}: {body}");
    }
}

/// On a channel of more than `presence.batch_over` members, events come in batches: one
/// frame of up to `page_size` events (or what waited `batch_interval`); a watcher that
/// joins meanwhile gets a snapshot that the earlier watchers' events add up to, with
/// nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_large_channels_come_in_batches() {
    let node = TestNode::start(|cfg| {
        cfg.presence.batch_over = 5;
        cfg.presence.page_size = 10;
        // Only full batches and new watchers send them, in this first part.
        cfg.presence.batch_interval = Duration::from_secs(3600);
    })
    .await;
    let ws = (Transport::WebSocket, false);
    let (mut early, _) = connect(node.addr, ws, "early").await;
    assert!(watch(&mut early, 1, "room:big").await.is_empty());
    let mut members = Vec::new();
    for i in 0..30 {
        let (mut m, _) = connect(node.addr, ws, &format!("m{i:02}")).await;
        request(&mut m, json!({"requestId": 1, "channel": "room:big", "action": ENTER})).await;
        members.push(m);
    }
    // 5 events one by one (up to batch_over members), then two full batches of 10.
    let mut sizes = Vec::new();
    while sizes.iter().sum::<usize>() < 25 {
        sizes.push(events(&mut early).await["events"].as_array().unwrap().len());
    }
    assert_eq!(sizes, [1, 1, 1, 1, 1, 10, 10]);
    // 5 more wait for their batch; a new watcher sends them on first, then gets all 30.
    let (mut late, _) = connect(node.addr, ws, "late").await;
    assert_eq!(watch(&mut late, 1, "room:big").await.len(), 30);
    assert_eq!(events(&mut early).await["events"].as_array().unwrap().len(), 5);
    // Leaves are batched too; both watchers see the same.
    for m in members.iter_mut().take(10) {
        request(m, json!({"requestId": 2, "channel": "room:big", "action": LEAVE})).await;
    }
    for w in [&mut early, &mut late] {
        let e = events(w).await;
        let leaves = e["events"].as_array().unwrap();
        assert_eq!(leaves.len(), 10, "{e}");
        assert!(leaves.iter().all(|l| l["action"] == LEAVE), "{e}");
    }
    node.stop().await;

    // With a short interval, a batch goes out on its own.
    let node = TestNode::start(|cfg| {
        cfg.presence.batch_over = 0;
        cfg.presence.batch_interval = Duration::from_millis(50);
    })
    .await;
    let (mut w, _) = connect(node.addr, ws, "w").await;
    assert!(watch(&mut w, 1, "room:b").await.is_empty());
    let (mut m, _) = connect(node.addr, ws, "m").await;
    request(&mut m, json!({"requestId": 1, "channel": "room:b", "action": ENTER})).await;
    assert_eq!(events(&mut w).await["events"][0]["action"], ENTER);
    node.stop().await;
}

/// A renewed token without `presence` ends the connection's presence: its member leaves and
/// its watch ends, each with a FORBIDDEN error naming the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_without_presence_ends_it() {
    use tern_edge::auth::Operation::{Presence, Subscribe};
    let node = TestNode::start(|cfg| {
        cfg.auth.mode = tern_edge::auth::AuthMode::Token;
        cfg.auth.hs256_secret = Some(SECRET.into());
    })
    .await;
    let ws = (Transport::WebSocket, false);
    let open = |token: String| async move {
        let mut c = Raw::open(node.addr, ws.0, ws.1).await;
        c.send(&json!({"connect": {"protocol": 1, "token": token}}).to_string()).await;
        assert!(c.recv().await.get("connected").is_some());
        c
    };
    let full = token("u", &[("chat:*", &[Subscribe, Presence])]);
    let mut other = open(token("o", &[("chat:*", &[Subscribe, Presence])])).await;
    assert!(watch(&mut other, 1, "chat:a").await.is_empty());
    let mut u = open(full).await;
    request(&mut u, json!({"requestId": 1, "channel": "chat:a", "action": ENTER})).await;
    assert_eq!(events(&mut other).await["events"][0]["action"], ENTER);
    assert_eq!(watch(&mut u, 2, "chat:a").await.len(), 1);
    let reduced = token("u", &[("chat:*", &[Subscribe])]);
    u.send(&json!({"auth": {"requestId": 3, "token": reduced}}).to_string()).await;
    let mut errors = Vec::new();
    while errors.len() < 2 {
        let f = u.recv().await;
        if f.get("error").is_some() {
            assert_eq!(code(&f), "ERROR_CODE_FORBIDDEN", "{f}");
            assert_eq!(f["error"]["channel"], "chat:a", "{f}");
            errors.push(f);
        } else {
            assert!(f.get("authRenewed").is_some() || f.get("presence").is_some(), "{f}");
        }
    }
    let e = events(&mut other).await;
    assert_eq!(e["events"][0]["action"], LEAVE, "{e}");
    assert_eq!(e["events"][0]["member"]["clientId"], "u", "{e}");
    node.stop().await;
}
