//! Durable history: `GET /v1/channels/{channel}/messages` pages in both directions, time
//! filters, retention, and a restart that keeps the log, its epoch and its offsets.

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use common::{TestNode, WAIT, http};
use serde_json::Value;
use tern_edge::config::HistoryNamespace;

fn data_dir(tag: &str) -> PathBuf {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::env::temp_dir().join(format!("tern-history-{tag}-{}-{nanos}", std::process::id()))
}

async fn node(dir: &std::path::Path, max_messages: u64) -> TestNode {
    node_with(dir, max_messages, |_| {}).await
}

/// [`node`], with `edit` applied to its settings.
async fn node_with(
    dir: &std::path::Path,
    max_messages: u64,
    edit: impl FnOnce(&mut tern_edge::Config),
) -> TestNode {
    let dir = dir.to_path_buf();
    TestNode::start(move |cfg| {
        cfg.history.data_dir = dir;
        cfg.history.namespaces = vec![HistoryNamespace {
            name: "log".into(),
            max_messages,
            max_age: Duration::from_secs(3600),
        }];
        edit(cfg);
    })
    .await
}

async fn publish(n: &TestNode, channel: &str, text: &str) -> Value {
    let (status, body) = http(
        n.addr,
        "POST",
        &format!("/v1/channels/{channel}/messages"),
        "text/plain",
        text.as_bytes(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn get(n: &TestNode, path: &str) -> (u16, Value) {
    let (status, body) = http(n.addr, "GET", path, "text/plain", b"").await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn texts(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls until the log holds `n` messages of `channel` (writes are grouped, asynchronously).
async fn until_logged(node: &TestNode, channel: &str, n: usize) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, page) =
            get(node, &format!("/v1/channels/{channel}/messages?direction=forwards&limit=1000"))
                .await;
        assert_eq!(status, 200, "{page}");
        if page["messages"].as_array().unwrap().len() == n {
            return page;
        }
        assert!(tokio::time::Instant::now() < deadline, "log never reached {n}: {page}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn history_pages_forwards_and_backwards() {
    let dir = data_dir("pages");
    let n = node(&dir, 1000).await;
    for i in 1..=25 {
        publish(&n, "log:a", &format!("m{i}")).await;
    }
    publish(&n, "log:other", "elsewhere").await;
    until_logged(&n, "log:a", 25).await;

    // Forwards, 10 at a time, following `next`.
    let mut got = Vec::new();
    let mut path = "/v1/channels/log:a/messages?direction=forwards&limit=10".to_owned();
    loop {
        let (status, page) = get(&n, &path).await;
        assert_eq!(status, 200);
        got.extend(texts(&page));
        match page["next"]["from"].as_str() {
            Some(from) => {
                path =
                    format!("/v1/channels/log:a/messages?direction=forwards&limit=10&from={from}")
            }
            None => break,
        }
    }
    assert_eq!(got, (1..=25).map(|i| format!("m{i}")).collect::<Vec<_>>());

    // Backwards (the default): newest first, then older pages.
    let (_, page) = get(&n, "/v1/channels/log:a/messages?limit=10").await;
    assert_eq!(texts(&page), (16..=25).rev().map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert_eq!(page["next"]["from"], "15", "a 64-bit offset, as a string");
    let (_, page) = get(&n, "/v1/channels/log:a/messages?limit=10&from=15&to=11").await;
    assert_eq!(texts(&page), (11..=15).rev().map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert_eq!(page["messages"][0]["position"]["offset"], "15");

    // Time filter: nothing logged in the future.
    let future =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            + 60_000;
    let (_, page) = get(&n, &format!("/v1/channels/log:a/messages?since={future}")).await;
    assert_eq!(texts(&page), Vec::<String>::new());

    // Errors: a namespace without history, bad parameters, a bad channel.
    let (status, body) = get(&n, "/v1/channels/chat:x/messages").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("ERROR_CODE_UNSUPPORTED")));
    // `limit=0` is the default (100), as an absent `limit` is over the WebSocket.
    let (status, zero) = get(&n, "/v1/channels/log:a/messages?limit=0").await;
    let (_, default) = get(&n, "/v1/channels/log:a/messages").await;
    assert_eq!((status, texts(&zero)), (200, texts(&default)));
    assert_eq!(get(&n, "/v1/channels/log:a/messages?limit=5000").await.0, 400);
    assert_eq!(get(&n, "/v1/channels/log:a/messages?direction=sideways").await.0, 400);
    assert_eq!(get(&n, "/v1/channels/log:a/messages?from=abc").await.0, 400);
    assert_eq!(get(&n, "/v1/channels/bad%20name/messages").await.0, 400);
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The ack comes once the message is in the log: a history read right after it sees it.
#[tokio::test]
async fn acks_wait_for_the_log() {
    let dir = data_dir("acks");
    let n = node(&dir, 1000).await;
    let client = tern_client::Client::connect(&n.url(), tern_client::ClientOptions::default())
        .await
        .unwrap();
    for i in 1..=20 {
        client.publish("log:acked", format!("ws{i}")).await.unwrap();
        let (_, page) = get(&n, "/v1/channels/log:acked/messages?limit=1").await;
        assert_eq!(texts(&page), vec![format!("ws{i}")], "acked, so logged");
    }
    for i in 1..=5 {
        publish(&n, "log:acked", &format!("http{i}")).await;
        let (_, page) = get(&n, "/v1/channels/log:acked/messages?limit=1").await;
        assert_eq!(texts(&page), vec![format!("http{i}")], "answered, so logged");
    }
    client.close().await;
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn retention_keeps_the_newest_messages() {
    let dir = data_dir("retention");
    let n = node(&dir, 5).await;
    for i in 1..=12 {
        publish(&n, "log:r", &format!("m{i}")).await;
    }
    // The writer trims once a second.
    let page = until_logged(&n, "log:r", 5).await;
    assert_eq!(texts(&page), (8..=12).map(|i| format!("m{i}")).collect::<Vec<_>>());
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_restart_keeps_history_its_epoch_and_offsets() {
    let dir = data_dir("restart");
    let n = node(&dir, 1000).await;
    let first = publish(&n, "log:k", "before").await;
    until_logged(&n, "log:k", 1).await;
    n.stop().await;

    let n = node(&dir, 1000).await;
    let page = until_logged(&n, "log:k", 1).await;
    assert_eq!(texts(&page), vec!["before"]);
    let second = publish(&n, "log:k", "after").await;
    assert_eq!(second["position"]["epoch"], first["position"]["epoch"], "the log epoch is kept");
    assert_eq!(second["position"]["offset"], "2", "offsets continue: {second}");
    let page = until_logged(&n, "log:k", 2).await;
    assert_eq!(texts(&page), vec!["before", "after"]);
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn text_of(ev: Option<tern_client::Event>) -> String {
    match ev {
        Some(tern_client::Event::Message(m)) => match m.data {
            Some(tern_proto::client::message::Data::Text(t)) => t,
            other => panic!("expected text, got {other:?}"),
        },
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Rewind while a publisher is busy: the recent messages, then live, with no gap and no
/// duplicate at the seam.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewind_joins_the_live_stream_without_gap_or_duplicate() {
    use futures_util::StreamExt;
    let dir = data_dir("rewind");
    let n = node(&dir, 1000).await;
    let opts = tern_client::ClientOptions::default;
    let publisher = tern_client::Client::connect(&n.url(), opts()).await.unwrap();
    const TOTAL: usize = 400;
    let pubs = tokio::spawn(async move {
        for i in 1..=TOTAL {
            publisher.publish("log:seam", format!("{i}")).await.unwrap();
        }
    });
    // Subscribers join at different moments of the stream.
    let mut readers = Vec::new();
    for k in 0..4 {
        tokio::time::sleep(Duration::from_millis(15 * k)).await;
        let client = tern_client::Client::connect(&n.url(), opts()).await.unwrap();
        let mut sub = client.subscribe_rewind("log:seam", 50).await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut got: Vec<usize> = Vec::new();
            while got.last() != Some(&TOTAL) {
                let t = text_of(tokio::time::timeout(WAIT, sub.next()).await.unwrap());
                got.push(t.parse().unwrap());
            }
            drop(client);
            got
        }));
    }
    pubs.await.unwrap();
    for r in readers {
        let got = r.await.unwrap();
        let first = got[0];
        assert_eq!(got, (first..=TOTAL).collect::<Vec<_>>(), "contiguous, once each");
        assert!(got.len() >= 50 || first == 1, "rewound 50 (or everything there was)");
    }
    n.stop().await;

    // After a restart the recent messages come from the log.
    let n = node(&dir, 1000).await;
    let client = tern_client::Client::connect(&n.url(), opts()).await.unwrap();
    let mut sub = client.subscribe_rewind("log:seam", 3).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(text_of(tokio::time::timeout(WAIT, sub.next()).await.unwrap()));
    }
    assert_eq!(got, vec!["398", "399", "400"]);
    client.close().await;
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A history channel left idle (no subscriber, no message) for the dedupe window gives its
/// in-memory tail back at the sweep; a later rewind reads it from the log and joins the
/// live stream as before. A channel with a subscriber keeps its tail.
#[tokio::test]
async fn an_idle_channel_gives_back_its_tail_and_a_rewind_still_joins_live() {
    use futures_util::StreamExt;
    let dir = data_dir("idle-tail");
    let n = node(&dir, 1000).await;
    let opts = tern_client::ClientOptions::default;
    let client = tern_client::Client::connect(&n.url(), opts()).await.unwrap();
    let mut held = client.subscribe("log:held").await.unwrap();
    for i in 1..=30 {
        client.publish("log:idle", format!("{i}")).await.unwrap();
    }
    client.publish("log:held", "kept").await.unwrap();
    assert_eq!(text_of(tokio::time::timeout(WAIT, held.next()).await.unwrap()), "kept");
    let hub = n.node.hub();
    assert_eq!(hub.sweep(std::time::Instant::now()).tails, 0, "nothing is idle yet");
    let window = n.node.settings().config.limits.dedupe_window;
    let later = std::time::Instant::now() + window + Duration::from_secs(1);
    assert_eq!(hub.sweep(later).tails, 1, "only the channel nobody holds");
    let reader = tern_client::Client::connect(&n.url(), opts()).await.unwrap();
    let mut sub = reader.subscribe_rewind("log:idle", 5).await.unwrap();
    client.publish("log:idle", "31").await.unwrap();
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(text_of(tokio::time::timeout(WAIT, sub.next()).await.unwrap()));
    }
    assert_eq!(got, ["26", "27", "28", "29", "30", "31"], "the log's tail, then live");
    client.close().await;
    reader.close().await;
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A publish whose log write fails (a full or broken disk) is never confirmed as logged:
/// the WebSocket publisher gets a nack `INTERNAL`, the HTTP publisher a 503, even when a
/// later write succeeds; the log holds only what was confirmed.
#[tokio::test]
async fn a_failed_log_write_is_reported_not_acknowledged() {
    let dir = data_dir("failed-write");
    let n = node(&dir, 1000).await;
    let store = n.node.hub().store().unwrap().clone();
    let client = tern_client::Client::connect(&n.url(), tern_client::ClientOptions::default())
        .await
        .unwrap();
    client.publish("log:disk", "before").await.unwrap();
    store.fail_next_write();
    match client.publish("log:disk", "lost").await {
        Err(tern_client::ClientError::Refused { code, .. }) => {
            assert_eq!(code, tern_proto::client::ErrorCode::Internal)
        }
        other => panic!("expected INTERNAL, got {other:?}"),
    }
    client.publish("log:disk", "after").await.unwrap();
    store.fail_next_write();
    let (status, body) =
        http(n.addr, "POST", "/v1/channels/log:disk/messages", "text/plain", b"lost over HTTP")
            .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("ERROR_CODE_INTERNAL"), "{body}");
    publish(&n, "log:disk", "last").await;
    let page = until_logged(&n, "log:disk", 3).await;
    assert_eq!(texts(&page), ["before", "after", "last"]);
    client.close().await;
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// On a history channel a message is delivered only once it is in the log: while the disk
/// stalls, a message published after it on a channel without history overtakes it; it
/// follows (with its ack) once written. So a crash never takes back a message a subscriber
/// received: the log holds everything anyone saw.
#[tokio::test]
async fn history_is_delivered_once_it_is_in_the_log() {
    let dir = data_dir("release");
    let n = node(&dir, 1000).await;
    let store = n.node.hub().store().unwrap().clone();
    let (mut sub, _) = common::RawJson::connected(n.addr).await;
    for (k, ch) in ["log:held", "chat:free"].iter().enumerate() {
        sub.send(&format!(r#"{{"subscribe":{{"requestId":{},"channel":"{ch}"}}}}"#, k + 1)).await;
        assert!(sub.recv().await.get("subscribed").is_some());
    }
    let (mut publisher, _) = common::RawJson::connected(n.addr).await;
    store.pause_writes(true);
    publisher.send(r#"{"publish":{"requestId":1,"channel":"log:held","text":"logged"}}"#).await;
    publisher.send(r#"{"publish":{"requestId":2,"channel":"chat:free","text":"free"}}"#).await;
    let first = sub.recv().await;
    assert_eq!(first["deliver"]["messages"][0]["text"], "free", "{first}");
    // The history message waits for its log write, and so does its ack: the publisher's
    // acks keep publish order.
    store.pause_writes(false);
    let next = sub.recv().await;
    assert_eq!(next["deliver"]["messages"][0]["text"], "logged", "{next}");
    assert_eq!(publisher.recv().await["ack"]["requestId"], 1);
    assert_eq!(publisher.recv().await["ack"]["requestId"], 2);
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A page holds at most `limits.history_page_bytes` of messages (at least one): it ends
/// early with `next`, and following `next` gets every message once.
#[tokio::test]
async fn history_pages_are_bounded_in_bytes_too() {
    let dir = data_dir("page-bytes");
    let n = node_with(&dir, 100, |cfg| cfg.limits.history_page_bytes = 10_000).await;
    for i in 1..=10 {
        publish(&n, "log:pb", &format!("{i:02}{}", "x".repeat(3000))).await;
    }
    until_logged(&n, "log:pb", 3).await;
    let (mut got, mut pages, mut path) =
        (Vec::new(), 0, "/v1/channels/log:pb/messages?limit=10".to_owned());
    loop {
        let (status, page) = get(&n, &path).await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        let texts = texts(&page);
        assert!(texts.len() <= 3, "three 3 KB messages fill 10,000 bytes: {}", texts.len());
        got.extend(texts.iter().map(|t| t[..2].parse::<u32>().unwrap()));
        match page["next"]["from"].as_str() {
            Some(from) => path = format!("/v1/channels/log:pb/messages?limit=10&from={from}"),
            None => break,
        }
    }
    assert_eq!(got, (1..=10).rev().collect::<Vec<_>>());
    assert!(pages >= 4, "{pages} pages");
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A publish whose log write is never confirmed still gets its one answer: `INTERNAL`
/// once the node gave up waiting (10 s, checked with the heartbeat), as over HTTP (503);
/// the publishes after it are answered after it.
#[tokio::test]
async fn a_log_write_never_confirmed_is_still_answered() {
    let dir = data_dir("stuck");
    let n = node_with(&dir, 100, |cfg| cfg.heartbeat.interval = Duration::from_millis(500)).await;
    let store = n.node.hub().store().unwrap().clone();
    let (mut publisher, _) = common::RawJson::connected(n.addr).await;
    store.pause_writes(true);
    publisher.send(r#"{"publish":{"requestId":1,"channel":"log:stuck","text":"a"}}"#).await;
    publisher.send(r#"{"publish":{"requestId":2,"channel":"chat:free","text":"b"}}"#).await;
    let first = publisher.recv().await;
    assert_eq!(first["nack"]["requestId"], 1, "{first}");
    assert_eq!(first["nack"]["code"], "ERROR_CODE_INTERNAL", "{first}");
    assert_eq!(publisher.recv().await["ack"]["requestId"], 2);
    store.pause_writes(false);
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// History over the WebSocket protocol (JSON frames): pages, and the documented errors.
#[tokio::test]
async fn history_over_websocket() {
    let dir = data_dir("ws");
    let n = node(&dir, 1000).await;
    for i in 1..=5 {
        publish(&n, "log:w", &format!("m{i}")).await;
    }
    let (mut c, _) = common::RawJson::connected(n.addr).await;
    c.send(r#"{"history":{"requestId":7,"channel":"log:w","limit":3}}"#).await;
    let page = c.recv().await;
    let h = &page["history"];
    assert_eq!(h["requestId"], 7, "{page}");
    let got: Vec<&str> =
        h["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(got, vec!["m5", "m4", "m3"]);
    assert_eq!(h["nextFrom"], "2");
    c.send(
        r#"{"history":{"requestId":8,"channel":"log:w","forwards":true,"from":"2","limit":10}}"#,
    )
    .await;
    let page = c.recv().await;
    let got: Vec<&str> = page["history"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec!["m2", "m3", "m4", "m5"]);
    assert!(page["history"].get("nextFrom").is_none(), "last page: {page}");

    for (req, code) in [
        (r#"{"history":{"requestId":9,"channel":"chat:x"}}"#, "ERROR_CODE_UNSUPPORTED"),
        (
            r#"{"history":{"requestId":9,"channel":"log:w","limit":5000}}"#,
            "ERROR_CODE_INVALID_ARGUMENT",
        ),
        (r#"{"history":{"requestId":9,"channel":"bad name"}}"#, "ERROR_CODE_INVALID_CHANNEL"),
    ] {
        c.send(req).await;
        let e = c.recv().await;
        assert_eq!(e["error"]["code"], code, "{req}: {e}");
    }
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The SDK's history call: pages both ways, and the node's refusal as an error.
#[tokio::test]
async fn history_through_the_sdk() {
    use tern_client::{ClientError, HistoryRequest};
    let dir = data_dir("sdk");
    let n = node(&dir, 1000).await;
    for i in 1..=5 {
        publish(&n, "log:s", &format!("m{i}")).await;
    }
    let client = tern_client::Client::connect(&n.url(), tern_client::ClientOptions::default())
        .await
        .unwrap();
    let text = |m: &tern_client::Message| match &m.data {
        Some(tern_proto::client::message::Data::Text(t)) => t.clone(),
        other => panic!("{other:?}"),
    };
    let page = client.history("log:s", HistoryRequest { limit: 3, ..Default::default() }).await;
    let page = page.unwrap();
    assert_eq!(page.messages.iter().map(text).collect::<Vec<_>>(), ["m5", "m4", "m3"]);
    assert_eq!(page.next_from, Some(2));
    let back = HistoryRequest { forwards: true, from: page.next_from, ..Default::default() };
    let page = client.history("log:s", back).await.unwrap();
    assert_eq!(page.messages.iter().map(text).collect::<Vec<_>>(), ["m2", "m3", "m4", "m5"]);
    assert_eq!(page.next_from, None);
    match client.history("chat:none", HistoryRequest::default()).await {
        Err(ClientError::Refused { code: tern_proto::client::ErrorCode::Unsupported, .. }) => {}
        other => panic!("expected UNSUPPORTED, got {other:?}"),
    }
    client.close().await;
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
