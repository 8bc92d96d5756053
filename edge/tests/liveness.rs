//! Liveness and resource limits: idle clients are closed, slow consumers are cut off while
//! everyone else carries on, shutdown says 1001, the connection limit holds.

use crate::common;

use std::time::Duration;

use common::{RawJson, TestNode, WAIT, close_code, eventually, http};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tern_client::{Client, ClientOptions, Event};
use tern_proto::client::{ClientFrame, Connect, Publish, Subscribe, client_frame, publish};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Short, but with room for a loaded CI machine: a responsive client answers a ping within
/// a second even while the other tests of this file run.
fn short_heartbeats(cfg: &mut tern_edge::Config) {
    cfg.heartbeat.interval = Duration::from_millis(200);
    cfg.heartbeat.idle_timeout = Duration::from_millis(1500);
}

#[tokio::test]
async fn a_silent_client_is_closed_with_4000_and_cleaned_up() {
    let node = TestNode::start(|cfg| {
        short_heartbeats(cfg);
        cfg.timeouts.close = Duration::from_secs(20);
    })
    .await;
    let (mut silent, _) = RawJson::connected(node.addr).await;
    silent.send(r#"{"subscribe":{"requestId":1,"channel":"chat:z"}}"#).await;
    assert!(silent.recv().await.get("subscribed").is_some());
    // The client now stops reading, so it never answers the node's pings: the node drops
    // its subscription, then closes it with 4000.
    let n = node.node.clone();
    assert!(
        eventually(|| n.hub().channel_count() == 0).await,
        "the silent connection was not reaped"
    );
    assert_eq!(silent.close_code().await, Some(4000));
    assert!(eventually(|| n.connection_count() == 0).await, "the connection slot was not freed");
    node.stop().await;
}

#[tokio::test]
async fn a_responsive_client_outlives_the_idle_timeout() {
    let node = TestNode::start(short_heartbeats).await;
    // The SDK answers pings as it reads; it stays connected across many idle timeouts.
    let c = Client::connect(&node.url(), ClientOptions::default()).await.unwrap();
    let mut sub = c.subscribe("chat:alive").await.unwrap();
    let first = c.connected().unwrap().connection_id;
    tokio::time::sleep(Duration::from_millis(4000)).await;
    c.publish("chat:alive", "still").await.unwrap();
    assert!(matches!(
        tokio::time::timeout(WAIT, sub.next()).await.unwrap(),
        Some(Event::Message(_))
    ));
    assert_eq!(c.connected().unwrap().connection_id, first, "the connection was never replaced");
    // A JSON client that sends app-level heartbeats is kept too.
    let (mut raw, _) = RawJson::connected(node.addr).await;
    for nonce in 0..10 {
        raw.send(&format!(r#"{{"heartbeat":{{"nonce":"{nonce}"}}}}"#)).await;
        assert!(raw.recv().await.get("heartbeat").is_some());
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    node.stop().await;
}

fn pb(kind: client_frame::Kind) -> WsMessage {
    WsMessage::Binary(ClientFrame { kind: Some(kind) }.encode_to_vec().into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_is_cut_off_with_4001_while_others_get_everything() {
    // Room for the healthy subscribers to fall briefly behind on a busy machine (the test
    // runs beside others), far below what the stalled one is sent.
    let node = TestNode::start(|cfg| {
        cfg.limits.send_queue_messages = 2048;
        cfg.timeouts.close = Duration::from_secs(20);
    })
    .await;
    const MSGS: usize = 20_000;
    // The stalled subscriber: a small receive buffer, and it stops reading after subscribing.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(node.addr).await.unwrap();
    let (mut stalled, _) =
        tokio_tungstenite::client_async(format!("ws://{}/v1/ws?format=proto", node.addr), stream)
            .await
            .unwrap();
    stalled.send(pb(client_frame::Kind::Connect(Connect::default()))).await.unwrap();
    stalled
        .send(pb(client_frame::Kind::Subscribe(Subscribe {
            request_id: 1,
            channel: "feed:x".into(),
            rewind: None,
            resume: None,
            presence: false,
        })))
        .await
        .unwrap();
    // Wait for Connected + Subscribed.
    let mut seen = 0;
    while seen < 2 {
        if let Some(Ok(WsMessage::Binary(_))) = stalled.next().await {
            seen += 1;
        }
    }
    // Healthy subscribers.
    let mut healthy = Vec::new();
    for _ in 0..3 {
        let c = Client::connect(&node.url(), ClientOptions::default()).await.unwrap();
        let mut sub = c.subscribe("feed:x").await.unwrap();
        healthy.push(tokio::spawn(async move {
            let mut n = 0usize;
            while n < MSGS {
                match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
                    Some(Event::Message(m)) => {
                        assert_eq!(m.origin_seq, n as u64 + 1, "in order, no gaps");
                        n += 1;
                    }
                    other => panic!("healthy subscriber got {other:?}"),
                }
            }
            drop(c);
            n
        }));
    }
    // A raw publisher that pipelines 1 KiB publishes.
    let (mut publ, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/ws?format=proto", node.addr))
            .await
            .unwrap();
    publ.send(pb(client_frame::Kind::Connect(Connect::default()))).await.unwrap();
    let payload = bytes::Bytes::from(vec![7u8; 1024]);
    for i in 0..MSGS {
        let p = Publish {
            request_id: i as u32 + 1,
            channel: "feed:x".into(),
            data: Some(publish::Data::Binary(payload.clone())),
            ..Default::default()
        };
        publ.feed(pb(client_frame::Kind::Publish(p))).await.unwrap();
        // Bursts of 50: a busy publisher, not one 20 MB write.
        if i % 50 == 49 {
            publ.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    publ.flush().await.unwrap();
    let acks = tokio::spawn(async move {
        let mut acks = 0;
        while acks < MSGS + 1 {
            match publ.next().await {
                Some(Ok(WsMessage::Binary(_))) => acks += 1,
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        acks
    });
    for h in healthy {
        assert_eq!(h.await.unwrap(), MSGS);
    }
    assert_eq!(acks.await.unwrap(), MSGS + 1, "Connected plus one ack per publish");
    // The stalled subscriber reads again: after its backlog comes the 4001 close.
    assert_eq!(close_code(&mut stalled).await, Some(4001));
    node.stop().await;
}

#[tokio::test]
async fn shutdown_closes_clients_with_1001() {
    let node = TestNode::start(|_| {}).await;
    let (mut a, _) = RawJson::connected(node.addr).await;
    let (mut b, _) = RawJson::connected(node.addr).await;
    node.shutdown.cancel();
    assert_eq!(a.close_code().await, Some(1001));
    assert_eq!(b.close_code().await, Some(1001));
    tokio::time::timeout(WAIT, node.task).await.unwrap().unwrap();
}

/// While a node drains (a client still inside its grace), what arrives is answered as the
/// docs say — `/readyz` and a WebSocket upgrade get 503 with `Retry-After` — not refused
/// by a closed port; the node stops once the drain is over.
#[tokio::test]
async fn a_draining_node_answers_503_with_retry_after() {
    let node = TestNode::start(|cfg| {
        // The client below never answers its close: the drain lasts this long.
        cfg.timeouts.close = Duration::from_secs(3);
        cfg.timeouts.shutdown_grace = Duration::from_secs(10);
    })
    .await;
    let (lingering, _) = RawJson::connected(node.addr).await;
    node.shutdown.cancel();
    let n = node.node.clone();
    let (status, body) = http(node.addr, "GET", "/readyz", "text/plain", b"").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("shutting down"), "{body}");
    assert!(n.connection_count() > 0, "still draining");
    match tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", node.addr)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            assert_eq!(resp.headers()["retry-after"], "1");
        }
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    let (status, _) = http(node.addr, "GET", "/v1/ping", "text/plain", b"").await;
    assert_eq!(status, 503, "ping ranks a draining node last");
    tokio::time::timeout(WAIT, node.task).await.unwrap().unwrap();
    drop(lingering);
}

#[tokio::test]
async fn the_connection_limit_answers_503() {
    let node = TestNode::start(|cfg| cfg.limits.max_connections = 2).await;
    let (_a, _) = RawJson::connected(node.addr).await;
    let (b, _) = RawJson::connected(node.addr).await;
    match tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", node.addr)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            assert_eq!(resp.headers()["retry-after"], "5");
        }
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    // A slot frees when a client leaves.
    drop(b);
    let n = node.node.clone();
    assert!(eventually(|| n.connection_count() == 1).await);
    let (_c, _) = RawJson::connected(node.addr).await;
    node.stop().await;
}

#[tokio::test]
async fn http_publish_reaches_websocket_subscribers() {
    let node = TestNode::start(|_| {}).await;
    let c = Client::connect(&node.url(), ClientOptions::default()).await.unwrap();
    let mut sub = c.subscribe("scores:match-1").await.unwrap();
    let path = "/v1/channels/scores:match-1/messages";
    let (status, body) = http(
        node.addr,
        "POST",
        path,
        "application/json",
        br#"{"id":"goal-1","name":"goal","text":"1-0"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let ack: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ack["messageId"], "goal-1");
    // Retried with the same id: acknowledged as a duplicate, not delivered again.
    let (status, body) = http(
        node.addr,
        "POST",
        path,
        "application/json",
        br#"{"id":"goal-1","name":"goal","text":"1-0"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains(r#""duplicate":true"#));
    let (status, _) = http(node.addr, "POST", path, "text/plain", b"plain text").await;
    assert_eq!(status, 201);
    let (status, _) = http(node.addr, "POST", path, "application/octet-stream", &[1, 2, 3]).await;
    assert_eq!(status, 201);
    let mut got = Vec::new();
    while got.len() < 3 {
        match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
            Some(Event::Message(m)) => got.push((m.name.clone(), m.data.clone())),
            other => panic!("unexpected {other:?}"),
        }
    }
    use tern_proto::client::message::Data;
    assert_eq!(got[0], ("goal".into(), Some(Data::Text("1-0".into()))));
    assert_eq!(got[1], ("".into(), Some(Data::Text("plain text".into()))));
    assert_eq!(got[2], ("".into(), Some(Data::Binary(vec![1, 2, 3].into()))));

    // Errors: bad channel 400, bad JSON 400, too large 413, wrong type 415.
    let (status, body) =
        http(node.addr, "POST", "/v1/channels/bad%20name/messages", "text/plain", b"x").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("ERROR_CODE_INVALID_CHANNEL"));
    let (status, body) = http(node.addr, "POST", path, "application/json", b"{nope").await;
    assert_eq!(status, 400);
    assert!(body.contains("ERROR_CODE_BAD_FRAME"));
    let big = vec![b'x'; 70 * 1024];
    let (status, body) = http(node.addr, "POST", path, "text/plain", &big).await;
    assert_eq!(status, 413);
    assert!(body.contains("ERROR_CODE_MESSAGE_TOO_LARGE"));
    let (status, _) = http(node.addr, "POST", path, "image/png", b"x").await;
    assert_eq!(status, 415);
    node.stop().await;
}
