//! Per-connection rate limits over real connections: publishes beyond the bucket are
//! refused with `RATE_LIMITED` and a retry hint while the connection stays usable;
//! namespaces with limits of their own; a frame flood is closed with 4004 while a
//! subscriber on another connection keeps receiving.

use crate::common;

use std::time::Duration;

use common::{RawJson, TestNode, http};
use futures_util::SinkExt;
use tern_edge::config::NamespaceLimits;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const BACKEND_SECRET: &str = "rates-backend-secret-0123456789abcdefghij";

async fn node() -> TestNode {
    TestNode::start(|cfg| {
        cfg.limits.publish_rate = 5;
        cfg.limits.publish_burst = 3;
        cfg.limits.frame_rate = 50;
        cfg.limits.frame_burst = 100;
        cfg.limits.http_publish_rate = 1;
        cfg.limits.http_publish_burst = 2;
        cfg.auth.api_keys = vec![tern_edge::auth::ApiKeyConfig {
            id: "backend".into(),
            secret: BACKEND_SECRET.into(),
            capability: None,
        }];
        cfg.limits.namespaces = vec![
            NamespaceLimits {
                name: "slow".into(),
                publish_rate: Some(1),
                publish_burst: Some(2),
                max_message_bytes: None,
            },
            NamespaceLimits {
                name: "small".into(),
                publish_rate: None,
                publish_burst: None,
                max_message_bytes: Some(16),
            },
        ];
    })
    .await
}

fn publish(request_id: u32, channel: &str, text: &str) -> String {
    format!(r#"{{"publish":{{"requestId":{request_id},"channel":"{channel}","text":"{text}"}}}}"#)
}

#[tokio::test]
async fn connected_tells_the_limits() {
    let n = node().await;
    let (_c, v) = RawJson::connected(n.addr).await;
    let l = &v["connected"]["limits"];
    assert_eq!(l["publishRate"], 5);
    assert_eq!(l["publishBurst"], 3);
    assert_eq!(l["frameRate"], 50);
    assert_eq!(l["frameBurst"], 100);
    assert_eq!(l["namespaces"][0]["namespace"], "slow");
    assert_eq!(l["namespaces"][0]["publishRate"], 1);
    assert_eq!(l["namespaces"][1]["maxMessageBytes"], 16);
    n.stop().await;
}

#[tokio::test]
async fn publishes_beyond_the_burst_are_refused_with_a_retry_hint_and_the_connection_stays() {
    let n = node().await;
    let (mut c, _) = RawJson::connected(n.addr).await;
    for i in 1..=4 {
        c.send(&publish(i, "chat:r", "x")).await;
    }
    for i in 1..=3 {
        let v = c.recv().await;
        assert_eq!(v["ack"]["requestId"], i, "within the burst: {v}");
    }
    let v = c.recv().await;
    assert_eq!(v["nack"]["requestId"], 4, "{v}");
    assert_eq!(v["nack"]["code"], "ERROR_CODE_RATE_LIMITED", "{v}");
    let retry = v["nack"]["retryAfterMs"].as_u64().expect("a retry hint");
    assert!(retry > 0 && retry <= 200, "one token at 5/s comes within 200 ms: {retry}");
    // After the hint the same publish goes through, on the same connection.
    tokio::time::sleep(Duration::from_millis(retry + 20)).await;
    c.send(&publish(5, "chat:r", "x")).await;
    let v = c.recv().await;
    assert_eq!(v["ack"]["requestId"], 5, "{v}");
    n.stop().await;
}

#[tokio::test]
async fn a_namespace_with_its_own_rate_has_its_own_bucket() {
    let n = node().await;
    let (mut c, _) = RawJson::connected(n.addr).await;
    // `slow` allows two at once, then refuses...
    for i in 1..=3 {
        c.send(&publish(i, "slow:r", "x")).await;
    }
    assert_eq!(c.recv().await["ack"]["requestId"], 1);
    assert_eq!(c.recv().await["ack"]["requestId"], 2);
    let v = c.recv().await;
    assert_eq!(v["nack"]["code"], "ERROR_CODE_RATE_LIMITED", "{v}");
    assert!(v["nack"]["reason"].as_str().unwrap().contains("1 publishes/s"), "{v}");
    // ...while the connection's own bucket (other namespaces) is untouched: 3 more.
    for i in 10..13 {
        c.send(&publish(i, "chat:r", "x")).await;
        assert_eq!(c.recv().await["ack"]["requestId"], i);
    }
    n.stop().await;
}

#[tokio::test]
async fn a_namespace_with_a_smaller_message_limit_refuses_larger_payloads() {
    let n = node().await;
    let (mut c, _) = RawJson::connected(n.addr).await;
    let big = "y".repeat(17);
    c.send(&publish(1, "small:r", &big)).await;
    let v = c.recv().await;
    assert_eq!(v["nack"]["code"], "ERROR_CODE_MESSAGE_TOO_LARGE", "{v}");
    c.send(&publish(2, "small:r", &big[..16])).await;
    assert_eq!(c.recv().await["ack"]["requestId"], 2);
    // Other namespaces keep the node's limit.
    c.send(&publish(3, "chat:r", &big)).await;
    assert_eq!(c.recv().await["ack"]["requestId"], 3);
    // The HTTP API applies the same limit.
    let body = format!(r#"{{"text":"{big}"}}"#);
    let (status, _) =
        http(n.addr, "POST", "/v1/channels/small:r/messages", "application/json", body.as_bytes())
            .await;
    assert_eq!(status, 413);
    n.stop().await;
}

#[tokio::test]
async fn a_frame_flood_is_closed_with_4004_and_other_subscribers_keep_receiving() {
    let n = node().await;
    let (mut sub, _) = RawJson::connected(n.addr).await;
    sub.send(r#"{"subscribe":{"requestId":1,"channel":"chat:flood"}}"#).await;
    assert!(sub.recv().await.get("subscribed").is_some());

    let (mut flood, _) = RawJson::connected(n.addr).await;
    // Heartbeat frames and pings, far beyond the burst of 100 (sends may fail once the
    // node has closed: that is the point).
    for i in 0..1000u32 {
        let frame = if i % 2 == 0 {
            WsMessage::Text(format!(r#"{{"heartbeat":{{"nonce":"{i}"}}}}"#).into())
        } else {
            WsMessage::Ping(Vec::new().into())
        };
        if flood.ws.send(frame).await.is_err() {
            break;
        }
    }
    assert_eq!(flood.close_code().await, Some(tern_proto::close::RATE_LIMITED));

    // The subscriber was not disturbed.
    let (mut publisher, _) = RawJson::connected(n.addr).await;
    publisher.send(&publish(1, "chat:flood", "still here")).await;
    assert!(publisher.recv().await.get("ack").is_some());
    let v = sub.recv().await;
    assert_eq!(v["deliver"]["messages"][0]["text"], "still here", "{v}");
    n.stop().await;
}

#[tokio::test]
async fn the_sdk_paces_a_burst_so_nothing_is_refused_and_order_holds() {
    use tern_client::{Client, ClientOptions, Event};
    let n = node().await;
    let url = n.url();
    let watcher = Client::connect(&url, ClientOptions::default()).await.unwrap();
    let mut sub = watcher.subscribe("chat:paced").await.unwrap();
    let client = Client::connect(&url, ClientOptions::default()).await.unwrap();
    // Far more than the burst of 3, all at once: the SDK holds them back to the rate.
    const N: usize = 12;
    let acks = futures_util::future::join_all(
        (0..N).map(|k| client.publish("chat:paced", format!("m{k}"))),
    )
    .await;
    for (k, a) in acks.iter().enumerate() {
        assert!(a.is_ok(), "publish {k} refused: {a:?}");
    }
    for k in 0..N {
        let ev = tokio::time::timeout(common::WAIT, futures_util::StreamExt::next(&mut sub))
            .await
            .unwrap()
            .unwrap();
        let Event::Message(m) = ev else { panic!("{ev:?}") };
        let Some(tern_proto::client::message::Data::Text(t)) = m.data else { panic!() };
        assert_eq!(t, format!("m{k}"), "in publish order");
    }
    n.stop().await;
}

/// A raw HTTP publish; returns the response head and body.
async fn http_publish(addr: std::net::SocketAddr, auth: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /v1/channels/chat:http/messages HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: text/plain\r\n\
         Content-Length: 1\r\nConnection: close\r\n\r\nx"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(common::WAIT, s.read_to_end(&mut out)).await.unwrap().unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn http_publishes_are_limited_per_caller_with_429_and_retry_after() {
    let n = node().await;
    // Anonymous callers (dev mode) share a bucket of 2.
    for _ in 0..2 {
        let r = http_publish(n.addr, "").await;
        assert!(r.starts_with("HTTP/1.1 201"), "{r}");
    }
    let r = http_publish(n.addr, "").await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    assert!(r.to_ascii_lowercase().contains("retry-after: 1"), "{r}");
    assert!(r.contains("ERROR_CODE_RATE_LIMITED"), "{r}");
    // An API key has a bucket of its own.
    use base64::Engine;
    let creds =
        base64::engine::general_purpose::STANDARD.encode(format!("backend:{BACKEND_SECRET}"));
    let r = http_publish(n.addr, &format!("Authorization: Basic {creds}\r\n")).await;
    assert!(r.starts_with("HTTP/1.1 201"), "{r}");
    n.stop().await;
}

#[tokio::test]
async fn the_sdk_refuses_at_once_what_it_could_not_send_in_time_and_sends_nothing_behind_it() {
    use tern_client::{Client, ClientError, ClientOptions, Event};
    let n = node().await;
    let url = n.url();
    let watcher = Client::connect(&url, ClientOptions::default()).await.unwrap();
    let mut sub = watcher.subscribe("chat:flooded").await.unwrap();
    let options =
        ClientOptions { request_timeout: Duration::from_secs(2), ..ClientOptions::default() };
    let client = Client::connect(&url, options).await.unwrap();
    // 5/s at the node, 4/s paced: a second of queue is all a 2 s timeout allows.
    let results = futures_util::future::join_all(
        (0..20).map(|k| client.publish("chat:flooded", format!("f{k}"))),
    )
    .await;
    let acked = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(ClientError::Refused { code: tern_proto::client::ErrorCode::RateLimited, .. })
            )
        })
        .count();
    assert_eq!(acked + refused, 20, "no timeouts, no other errors: {results:?}");
    assert!(acked >= 2 && refused >= 10, "acked {acked}, refused {refused}");
    // Exactly the acknowledged ones reach subscribers: a marker published after them all
    // comes right after them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.publish("chat:flooded", "marker").await.unwrap();
    let mut got = 0;
    loop {
        let ev = tokio::time::timeout(common::WAIT, futures_util::StreamExt::next(&mut sub))
            .await
            .unwrap()
            .unwrap();
        let Event::Message(m) = ev else { panic!("{ev:?}") };
        if m.data == Some(tern_proto::client::message::Data::Text("marker".into())) {
            break;
        }
        got += 1;
    }
    assert_eq!(got, acked, "delivered exactly what was acknowledged");
    n.stop().await;
}

#[tokio::test]
async fn history_reads_are_bounded_and_every_request_gets_one_answer() {
    let dir = common::temp_dir("history-reads");
    let n = TestNode::start(|cfg| {
        cfg.history.data_dir = dir.clone();
        cfg.history.namespaces = vec![tern_edge::config::HistoryNamespace {
            name: "log".into(),
            max_messages: 1000,
            max_age: Duration::from_secs(3600),
        }];
        cfg.limits.history_reads = 2;
        cfg.limits.history_reads_per_connection = 1;
    })
    .await;
    let (mut c, _) = RawJson::connected(n.addr).await;
    for i in 1..=20 {
        c.send(&publish(i, "log:a", "x")).await;
        assert!(c.recv().await.get("ack").is_some());
    }
    const N: u32 = 50;
    for i in 100..100 + N {
        c.send(&format!(r#"{{"history":{{"requestId":{i},"channel":"log:a","limit":1000}}}}"#))
            .await;
    }
    let mut answered = std::collections::BTreeSet::new();
    let (mut pages, mut limited) = (0, 0);
    while answered.len() < N as usize {
        let v = c.recv().await;
        if let Some(p) = v.get("history") {
            assert_eq!(p["messages"].as_array().unwrap().len(), 20, "{v}");
            pages += 1;
            assert!(answered.insert(p["requestId"].as_u64().unwrap()), "answered twice: {v}");
        } else if let Some(e) = v.get("error") {
            assert_eq!(e["code"], "ERROR_CODE_RATE_LIMITED", "{v}");
            limited += 1;
            assert!(answered.insert(e["requestId"].as_u64().unwrap()), "answered twice: {v}");
        } else {
            panic!("unexpected {v}");
        }
    }
    assert!(pages >= 1 && limited >= 1, "pages {pages}, refused {limited}");
    // Still usable.
    c.send(r#"{"heartbeat":{"nonce":"1"}}"#).await;
    assert_eq!(c.recv().await["heartbeat"]["nonce"], "1");
    n.stop().await;
}

#[tokio::test]
async fn new_channels_are_refused_at_the_node_limit_and_existing_ones_keep_working() {
    let n = TestNode::start(|cfg| cfg.limits.max_channels = 2).await;
    let (mut c, _) = RawJson::connected(n.addr).await;
    c.send(r#"{"subscribe":{"requestId":1,"channel":"chat:a"}}"#).await;
    assert!(c.recv().await.get("subscribed").is_some());
    c.send(&publish(2, "chat:b", "x")).await;
    assert!(c.recv().await.get("ack").is_some());
    // A third channel: refused for publish (nack), subscribe (error) and HTTP (503).
    c.send(&publish(3, "chat:c", "x")).await;
    let v = c.recv().await;
    assert_eq!(v["nack"]["code"], "ERROR_CODE_TOO_MANY_CHANNELS", "{v}");
    c.send(r#"{"subscribe":{"requestId":4,"channel":"chat:d"}}"#).await;
    let v = c.recv().await;
    assert_eq!(v["error"]["code"], "ERROR_CODE_TOO_MANY_CHANNELS", "{v}");
    let (status, _) =
        http(n.addr, "POST", "/v1/channels/chat:e/messages", "text/plain", b"x").await;
    assert_eq!(status, 503);
    // The existing ones work on.
    c.send(&publish(5, "chat:a", "to a")).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(c.recv().await);
    }
    assert!(got.iter().any(|v| v.get("ack").is_some()), "{got:?}");
    assert!(got.iter().any(|v| v["deliver"]["messages"][0]["text"] == "to a"), "{got:?}");
    n.stop().await;
}
