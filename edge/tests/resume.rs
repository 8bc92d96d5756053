//! Resume: a client that drops (no close frame) and subscribes again with where it left off
//! gets exactly what it missed, in order, once, then the live stream — on the same node by
//! log position, on another node by per-origin vector — or an explicit discontinuity when
//! the log no longer holds it or it is older than the resume window.

use crate::common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::{RawJson, TestNode, WAIT, http};
use serde_json::{Value, json};
use tern_edge::config::HistoryNamespace;

fn data_dir(tag: &str) -> PathBuf {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::env::temp_dir().join(format!("tern-resume-{tag}-{}-{nanos}", std::process::id()))
}

fn history(cfg: &mut tern_edge::Config, dir: &std::path::Path, max_messages: u64) {
    cfg.history.data_dir = dir.to_path_buf();
    cfg.history.namespaces = vec![HistoryNamespace {
        name: "log".into(),
        max_messages,
        max_age: Duration::from_secs(3600),
    }];
}

async fn publish(addr: std::net::SocketAddr, channel: &str, text: &str) {
    let path = format!("/v1/channels/{channel}/messages");
    let (status, body) = http(addr, "POST", &path, "text/plain", text.as_bytes()).await;
    assert_eq!(status, 201, "{body}");
}

fn num(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().unwrap(),
        Value::Number(n) => n.as_u64().unwrap(),
        Value::Null => 0,
        other => panic!("not a number: {other}"),
    }
}

/// What a client keeps to resume: the node, its last position there, the per-origin vector.
#[derive(Debug, Default, Clone)]
struct Where {
    node: String,
    position: Value,
    origins: BTreeMap<String, (u64, u64)>,
}

impl Where {
    fn resume(&self) -> Value {
        let origins: Vec<Value> = self
            .origins
            .iter()
            .map(|(o, (e, s))| json!({"origin": o, "epoch": e.to_string(), "seq": s.to_string()}))
            .collect();
        json!({"node": self.node, "position": self.position, "origins": origins})
    }

    fn note(&mut self, node: &str, m: &Value) {
        self.node = node.to_owned();
        self.position = m["position"].clone();
        let origin = m["origin"].as_str().unwrap().to_owned();
        self.origins.insert(origin, (num(&m["originEpoch"]), num(&m["originSeq"])));
    }
}

/// A raw JSON client subscribed to one channel.
struct Sub {
    c: RawJson,
    node: String,
    at: Where,
    discontinuities: Vec<Value>,
}

impl Sub {
    /// Connects and subscribes (with `resume` when given); returns once subscribed.
    async fn open(addr: std::net::SocketAddr, channel: &str, at: Option<Where>) -> (Self, Value) {
        let (mut c, connected) = RawJson::connected(addr).await;
        let node = connected["connected"]["node"].as_str().unwrap().to_owned();
        let mut sub = json!({"requestId": 1, "channel": channel});
        if let Some(at) = &at {
            sub["resume"] = at.resume();
        }
        c.send(&json!({ "subscribe": sub }).to_string()).await;
        let mut s = Self { c, node, at: at.unwrap_or_default(), discontinuities: Vec::new() };
        loop {
            let f = s.c.recv().await;
            if let Some(d) = f.get("discontinuity") {
                s.discontinuities.push(d.clone());
                continue;
            }
            let subscribed = f.get("subscribed").unwrap_or_else(|| panic!("got {f}")).clone();
            if subscribed.get("resumed").is_none() {
                // A fresh subscription: the vector starts at the node's.
                s.at.node.clone_from(&s.node);
                s.at.position = subscribed["position"].clone();
                for o in subscribed["origins"].as_array().unwrap() {
                    let origin = o["origin"].as_str().unwrap().to_owned();
                    s.at.origins.insert(origin, (num(&o["epoch"]), num(&o["seq"])));
                }
            }
            return (s, subscribed);
        }
    }

    /// The texts of the next `n` messages (discontinuities are collected on the side).
    async fn texts(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < n {
            let f = self.c.recv().await;
            if let Some(d) = f.get("discontinuity") {
                self.discontinuities.push(d.clone());
                continue;
            }
            let Some(d) = f.get("deliver") else { continue };
            for m in d["messages"].as_array().unwrap() {
                self.at.note(&self.node, m);
                out.push(m["text"].as_str().unwrap().to_owned());
            }
        }
        out
    }

    /// Drops the connection without a close frame.
    fn drop_abruptly(self) -> Where {
        let Self { c, at, .. } = self;
        drop(c);
        at
    }
}

fn range(prefix: &str, r: std::ops::RangeInclusive<u32>) -> Vec<String> {
    r.map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_resume_replays_from_the_tail_and_from_the_log() {
    let dir = data_dir("same");
    let n = TestNode::start(|cfg| history(cfg, &dir, 100_000)).await;
    let (mut s, _) = Sub::open(n.addr, "log:r", None).await;
    for i in 1..=10 {
        publish(n.addr, "log:r", &format!("m{i}")).await;
    }
    assert_eq!(s.texts(10).await, range("m", 1..=10));

    // A short gap: served from the in-memory tail.
    let at = s.drop_abruptly();
    for i in 11..=15 {
        publish(n.addr, "log:r", &format!("m{i}")).await;
    }
    let (mut s, subscribed) = Sub::open(n.addr, "log:r", Some(at)).await;
    assert_eq!(subscribed["resumed"], true, "{subscribed}");
    publish(n.addr, "log:r", "m16").await;
    assert_eq!(s.texts(6).await, range("m", 11..=16), "missed, then live");

    // A long gap (ten times the in-memory tail): replayed from the log in pages.
    let at = s.drop_abruptly();
    for i in 17..=1016 {
        publish(n.addr, "log:r", &format!("m{i}")).await;
    }
    let (mut s, _) = Sub::open(n.addr, "log:r", Some(at)).await;
    let live = tokio::spawn(async move {
        for i in 1017..=1030 {
            publish(n.addr, "log:r", &format!("m{i}")).await;
        }
        n
    });
    assert_eq!(s.texts(1014).await, range("m", 17..=1030), "every missed message once, in order");
    assert!(s.discontinuities.is_empty(), "{:?}", s.discontinuities);
    live.await.unwrap().stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_log_no_longer_holds_is_a_discontinuity() {
    let dir = data_dir("gap");
    let n = TestNode::start(|cfg| {
        history(cfg, &dir, 50);
        cfg.resume.window = Duration::from_secs(1);
    })
    .await;
    // Retention: 300 missed, the log keeps 50 (and the in-memory tail 100).
    let (mut s, _) = Sub::open(n.addr, "log:t", None).await;
    publish(n.addr, "log:t", "m1").await;
    assert_eq!(s.texts(1).await, ["m1"]);
    let at = s.drop_abruptly();
    for i in 2..=301 {
        publish(n.addr, "log:t", &format!("m{i}")).await;
    }
    // Wait until retention trimmed the log (once a second).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let path = "/v1/channels/log:t/messages?direction=forwards&limit=1";
        let (_, body) = http(n.addr, "GET", path, "text/plain", b"").await;
        let page: Value = serde_json::from_str(&body).unwrap();
        if page["messages"][0]["text"] != "m1" && page["messages"][0]["text"] != "m2" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never trimmed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut s, _) = Sub::open(n.addr, "log:t", Some(at)).await;
    publish(n.addr, "log:t", "m302").await;
    // What is replayed is contiguous and ends with the live message; the gap before it is
    // announced.
    let mut got = s.texts(1).await;
    while got.last().map(String::as_str) != Some("m302") {
        got.extend(s.texts(1).await);
    }
    let first: u32 = got[0][1..].parse().unwrap();
    assert!(first > 2, "the first messages were trimmed, got {first}");
    assert_eq!(got, range("m", first..=302));
    assert_eq!(s.discontinuities.len(), 1, "{:?}", s.discontinuities);
    assert_eq!(s.discontinuities[0]["channel"], "log:t");

    // The resume window: what was missed more than a second ago is not replayed.
    let at = s.drop_abruptly();
    publish(n.addr, "log:t", "old").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut s, _) = Sub::open(n.addr, "log:t", Some(at)).await;
    publish(n.addr, "log:t", "new").await;
    assert_eq!(s.texts(1).await, ["new"]);
    assert_eq!(s.discontinuities.len(), 1, "{:?}", s.discontinuities);
    assert!(
        s.discontinuities[0]["reason"].as_str().unwrap().contains("resume window"),
        "{:?}",
        s.discontinuities
    );
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_without_history_reports_a_gap_but_not_a_false_one() {
    let n = TestNode::start(|_| {}).await;
    let (mut s, _) = Sub::open(n.addr, "chat:x", None).await;
    publish(n.addr, "chat:x", "a").await;
    assert_eq!(s.texts(1).await, ["a"]);
    // Nothing published while away: no discontinuity.
    let at = s.drop_abruptly();
    let (mut s, subscribed) = Sub::open(n.addr, "chat:x", Some(at)).await;
    assert_eq!(subscribed["resumed"], true);
    publish(n.addr, "chat:x", "b").await;
    assert_eq!(s.texts(1).await, ["b"]);
    assert!(s.discontinuities.is_empty(), "{:?}", s.discontinuities);
    // Something published while away: it cannot be replayed, and the client is told.
    let at = s.drop_abruptly();
    publish(n.addr, "chat:x", "lost").await;
    let (mut s, _) = Sub::open(n.addr, "chat:x", Some(at)).await;
    publish(n.addr, "chat:x", "c").await;
    assert_eq!(s.texts(1).await, ["c"]);
    assert_eq!(s.discontinuities.len(), 1, "{:?}", s.discontinuities);
    n.stop().await;
}

/// Splits texts like "a17" by publisher and checks each publisher's run.
fn per_publisher(texts: &[String]) -> BTreeMap<char, Vec<u32>> {
    let mut per: BTreeMap<char, Vec<u32>> = BTreeMap::new();
    for t in texts {
        let (who, i) = t.split_at(1);
        per.entry(who.chars().next().unwrap()).or_default().push(i.parse().unwrap());
    }
    per
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_another_region_resumes_by_origin_vector() {
    let dirs = [data_dir("x0"), data_dir("x1")];
    let c =
        common::cluster(&["eu-west", "us-east"], |i, cfg| history(cfg, &dirs[i], 100_000)).await;
    let (a, b) = (c.nodes[0].addr, c.nodes[1].addr);
    let (mut s, _) = Sub::open(a, "log:x", None).await;
    for i in 1..=5 {
        publish(a, "log:x", &format!("a{i}")).await;
        publish(b, "log:x", &format!("b{i}")).await;
    }
    let got = per_publisher(&s.texts(10).await);
    assert_eq!(got[&'a'], (1..=5).collect::<Vec<_>>());
    assert_eq!(got[&'b'], (1..=5).collect::<Vec<_>>());

    // Away while both regions publish 300 each (more than the in-memory tail), then back on
    // the other region.
    let at = s.drop_abruptly();
    for i in 6..=305 {
        publish(a, "log:x", &format!("a{i}")).await;
        publish(b, "log:x", &format!("b{i}")).await;
    }
    let (mut s, subscribed) = Sub::open(b, "log:x", Some(at)).await;
    assert_eq!(subscribed["resumed"], true);
    publish(a, "log:x", "a306").await;
    publish(b, "log:x", "b306").await;
    let got = per_publisher(&s.texts(602).await);
    assert_eq!(got[&'a'], (6..=306).collect::<Vec<_>>(), "region a: each missed message once");
    assert_eq!(got[&'b'], (6..=306).collect::<Vec<_>>(), "region b: each missed message once");
    assert!(s.discontinuities.is_empty(), "{:?}", s.discontinuities);

    // And back again: the position is the other node's, so the vector decides.
    let at = s.drop_abruptly();
    for i in 307..=310 {
        publish(a, "log:x", &format!("a{i}")).await;
        publish(b, "log:x", &format!("b{i}")).await;
    }
    let (mut s, _) = Sub::open(a, "log:x", Some(at)).await;
    let got = per_publisher(&s.texts(8).await);
    assert_eq!(got[&'a'], (307..=310).collect::<Vec<_>>());
    assert_eq!(got[&'b'], (307..=310).collect::<Vec<_>>());
    for n in c.nodes {
        n.stop().await;
    }
    let _ = std::fs::remove_dir_all(&c.dir);
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}
