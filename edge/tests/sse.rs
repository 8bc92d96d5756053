//! Plain server-sent events (`GET /v1/sse`) read by a well-kept SSE client crate
//! (`eventsource-stream`), not Tern's SDK: a client that drops and reconnects with
//! `Last-Event-ID`, as `EventSource` does, ends with every message once, in order — on the
//! same node, across a restart of a node with a durable log, and on another region's node.

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::transport::{self};
use common::{TestNode, WAIT, http};
use eventsource_stream::{Event, Eventsource};
use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt;
use tern_edge::config::HistoryNamespace;

fn data_dir(tag: &str) -> PathBuf {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::env::temp_dir().join(format!("tern-sse-{tag}-{}-{nanos}", std::process::id()))
}

fn history(cfg: &mut tern_edge::Config, dir: &Path) {
    cfg.history.data_dir = dir.to_path_buf();
    cfg.history.namespaces = vec![HistoryNamespace {
        name: "log".into(),
        max_messages: 100_000,
        max_age: Duration::from_secs(3600),
    }];
}

async fn publish(addr: SocketAddr, channel: &str, text: &str) {
    let path = format!("/v1/channels/{channel}/messages");
    let (status, body) = http(addr, "POST", &path, "text/plain", text.as_bytes()).await;
    assert_eq!(status, 201, "{body}");
}

type Events = std::pin::Pin<Box<dyn Stream<Item = Event> + Send>>;

/// An SSE reader: `GET path` with `Last-Event-ID` if given.
struct Reader {
    events: Events,
    last_id: Option<String>,
}

impl Reader {
    async fn open(addr: SocketAddr, path: &str, last_id: Option<&str>) -> Self {
        let mut conn = transport::connect(addr).await;
        let mut req = hyper::Request::builder().uri(path).header("host", "test");
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let req = req.body(http_body_util::Full::new(Bytes::new())).unwrap();
        let res = tokio::time::timeout(WAIT, conn.send_request(req)).await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        let events = res.into_body().into_data_stream().eventsource().map(|e| e.unwrap());
        Self { events: Box::pin(events), last_id: last_id.map(str::to_owned) }
    }

    async fn next(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.events.next()).await.expect("event in time").expect("open")
    }

    /// The texts of the next `n` message events (other events noted and skipped; a
    /// discontinuity fails the test).
    async fn texts(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < n {
            let e = self.next().await;
            match e.event.as_str() {
                "message" => {
                    let m: serde_json::Value = serde_json::from_str(&e.data).unwrap();
                    assert!(!e.id.is_empty(), "every message event carries an id");
                    self.last_id = Some(e.id.clone());
                    out.push(m["text"].as_str().unwrap().to_owned());
                }
                "discontinuity" | "error" | "close" => panic!("{}: {}", e.event, e.data),
                _ => {}
            }
        }
        out
    }
}

fn texts(prefix: &str, range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test]
async fn an_sse_client_resumes_with_last_event_id_on_the_node_and_across_its_restart() {
    let dir = data_dir("restart");
    let node = TestNode::start(|cfg| history(cfg, &dir)).await;
    let path = "/v1/sse?channel=log:a&channel=log:b";
    let mut r = Reader::open(node.addr, path, None).await;
    for i in 1..=5 {
        publish(node.addr, "log:a", &format!("m{i}")).await;
    }
    assert_eq!(r.texts(5).await, texts("m", 1..=5));
    // Dropped; messages go on; back with Last-Event-ID: exactly what was missed, in order.
    let at = r.last_id.clone();
    drop(r);
    for i in 6..=10 {
        publish(node.addr, "log:a", &format!("m{i}")).await;
    }
    publish(node.addr, "log:b", "b1").await;
    let mut r = Reader::open(node.addr, path, at.as_deref()).await;
    publish(node.addr, "log:a", "m11").await;
    let mut got = r.texts(7).await;
    let b: Vec<_> = got.iter().filter(|t| t.starts_with('b')).cloned().collect();
    got.retain(|t| t.starts_with('m'));
    assert_eq!(got, texts("m", 6..=11));
    assert_eq!(b, ["b1"]);

    // The node restarts (its log is durable); messages published after; back again.
    let at = r.last_id.clone();
    drop(r);
    node.stop().await;
    let node = TestNode::start(|cfg| history(cfg, &dir)).await;
    for i in 12..=14 {
        publish(node.addr, "log:a", &format!("m{i}")).await;
    }
    let mut r = Reader::open(node.addr, path, at.as_deref()).await;
    publish(node.addr, "log:a", "m15").await;
    assert_eq!(r.texts(4).await, texts("m", 12..=15), "after the restart: once, in order");
    node.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_client_fails_over_to_another_region_with_last_event_id() {
    let dirs = [data_dir("x0"), data_dir("x1")];
    let c = common::cluster(&["eu-west", "us-east"], |i, cfg| history(cfg, &dirs[i])).await;
    let (a, b) = (c.nodes[0].addr, c.nodes[1].addr);
    let path = "/v1/sse?channel=log:x";
    let mut r = Reader::open(a, path, None).await;
    for i in 1..=3 {
        publish(a, "log:x", &format!("a{i}")).await;
        publish(b, "log:x", &format!("b{i}")).await;
    }
    let got = r.texts(6).await;
    let at = r.last_id.clone();
    drop(r);
    for i in 4..=103 {
        publish(a, "log:x", &format!("a{i}")).await;
        publish(b, "log:x", &format!("b{i}")).await;
    }
    // Back on the other region.
    let mut r = Reader::open(b, path, at.as_deref()).await;
    publish(a, "log:x", "a104").await;
    publish(b, "log:x", "b104").await;
    let mut all = got;
    all.extend(r.texts(202).await);
    for p in ['a', 'b'] {
        let mine: Vec<_> = all.iter().filter(|t| t.starts_with(p)).cloned().collect();
        assert_eq!(
            mine,
            texts(&p.to_string(), 1..=104),
            "region {p}: every message once, in order"
        );
    }
    for n in c.nodes {
        n.stop().await;
    }
    let _ = std::fs::remove_dir_all(&c.dir);
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[tokio::test]
async fn a_bad_sse_request_is_refused_before_the_stream_starts() {
    let node = TestNode::start(|_| {}).await;
    let cases = [
        ("/v1/sse", 400, "ERROR_CODE_INVALID_ARGUMENT"),
        ("/v1/sse?channel=bad%20channel", 400, "ERROR_CODE_INVALID_CHANNEL"),
        ("/v1/sse?channel=a&rewind=1000", 400, "ERROR_CODE_INVALID_ARGUMENT"),
        ("/v1/sse?channel=a&rewind=x", 400, "ERROR_CODE_INVALID_ARGUMENT"),
        ("/v1/sse?channel=a&lastEventId=not-a-cursor!", 400, "ERROR_CODE_INVALID_ARGUMENT"),
    ];
    for (path, status, code) in cases {
        let (got, body) = http(node.addr, "GET", path, "text/plain", b"").await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(body.contains(code), "{path}: {body}");
    }
    node.stop().await;
}

#[tokio::test]
async fn sse_in_token_mode_needs_a_token_that_allows_the_channels() {
    use tern_edge::auth::{AuthMode, Claims, Operation, mint_hs256};
    let secret = "a-test-secret-that-is-long-enough-0123456789";
    let node = TestNode::start(|cfg| {
        cfg.auth.mode = AuthMode::Token;
        cfg.auth.hs256_secret = Some(secret.into());
    })
    .await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut capability = std::collections::BTreeMap::new();
    capability.insert("chat:*".to_owned(), vec![Operation::Subscribe]);
    let claims = Claims { sub: "alice".into(), exp: now + 3600, iat: Some(now), capability };
    let token = mint_hs256(secret, &claims).unwrap();
    let (status, body) = http(node.addr, "GET", "/v1/sse?channel=chat:1", "text/plain", b"").await;
    assert_eq!(status, 401, "{body}");
    let path = format!("/v1/sse?channel=secret:1&token={token}");
    let (status, body) = http(node.addr, "GET", &path, "text/plain", b"").await;
    assert_eq!(status, 403, "{body}");
    let mut r =
        Reader::open(node.addr, &format!("/v1/sse?channel=chat:1&token={token}"), None).await;
    let e = r.next().await;
    assert_eq!(e.event, "connected");
    assert!(e.data.contains("\"clientId\":\"alice\""), "{}", e.data);
    node.stop().await;
}
