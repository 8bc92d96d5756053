//! The delivery contract across restarts and failovers, for a client that follows
//! docs/protocol.md and drops nothing itself (`common::plain`): three real `tern edge`
//! processes with durable history, nodes SIGKILLed or SIGTERMed and restarted, backbone links
//! held down through UDP relays so a restarted node is still catching up when clients come.
//!
//! - A: a restart does not re-append (or deliver again) a peer's messages it had logged,
//!   even when they are far older than its newest messages;
//! - B: a publisher that moves to a restarted node which has not yet received its earlier
//!   messages keeps its order there;
//! - C: a client that resumes on a node still catching up with messages it already had
//!   does not get them again;
//! - D: a third region that gets a moved publisher's new messages before its earlier ones
//!   holds the new ones until the earlier arrive.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::plain::{Got, Plain, PlainError, PlainState, log_of};
use common::{ProcessCluster, ready, sigterm};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const X: usize = 0; // eu-west
const Y: usize = 1; // us-east

fn history(dir: &std::path::Path) -> impl Fn(&str) -> String + '_ {
    move |r| {
        format!(
            "[history]\ndata_dir = \"{}/{r}-data\"\n\
             [[history.namespaces]]\nname = \"log\"\nmax_messages = 100000\n",
            dir.display()
        )
    }
}

fn temp(name: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let dir = std::env::temp_dir().join(format!(
        "tern-restart-{name}-{}-{}",
        std::process::id(),
        nanos.as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Publishes `texts` in order on `channel` (id = text), each acknowledged before the next.
async fn publish_all(c: &mut Plain, st: &mut PlainState, channel: &str, texts: &[String]) {
    for t in texts {
        let f = c.publish(st, channel, t, t).await.unwrap();
        assert!(f.get("ack").is_some(), "{t}: {f}");
    }
}

/// Waits until node `http`'s log of `channel` holds at least `n` messages; returns it.
async fn log_reaches(http: &str, channel: &str, n: usize) -> Vec<Got> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let log = log_of(http, channel).await;
        if log.len() >= n {
            return log;
        }
        assert!(tokio::time::Instant::now() < deadline, "{http}: {} of {n} logged", log.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until a message with `text` arrives; returns every message read on the way
/// (the marker last).
async fn until(c: &mut Plain, st: &mut PlainState, text: &str) -> Vec<Got> {
    let from = st.got.len();
    loop {
        match c.frame(st, WAIT).await {
            Ok(_) => {}
            Err(e) => panic!("waiting for {text:?}: {e:?}"),
        }
        if st.got[from..].iter().any(|g| g.text == text) {
            return st.got[from..].to_vec();
        }
    }
}

fn texts(got: &[Got]) -> Vec<String> {
    got.iter().map(|g| g.text.clone()).collect()
}

fn numbered(prefix: &str, range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|k| format!("{prefix}:{k}")).collect()
}

/// Every text of `got` exactly once.
fn once(got: &[Got]) -> bool {
    let mut seen = HashSet::new();
    got.iter().all(|g| seen.insert(g.text.clone()))
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Kill,
    Term,
}

/// A: Y holds 150 of X's messages and then 150 of its own (so X's are not among its newest
/// hundred), and restarts. Its log must still hold 300 messages, not 450; a fresh
/// subscriber on Y must receive no old message, and one resuming on Y nothing twice.
async fn restart_does_not_repeat_a_peers_messages(stop: Stop) {
    let dir = temp("a");
    let cluster = ProcessCluster::write(&dir, history(&dir));
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(cluster.start(i, WAIT).await);
    }
    for i in 0..3 {
        ready(&cluster.http(i), WAIT).await;
    }
    let ch = "log:a";
    let mut s1_state = PlainState::default();
    let mut s1 = Plain::connect(&cluster.url(Y)).await.unwrap();
    s1.subscribe(&mut s1_state, ch).await.unwrap();

    let mut px_state = PlainState::default();
    let mut px = Plain::connect(&cluster.url(X)).await.unwrap();
    publish_all(&mut px, &mut px_state, ch, &numbered("X", 1..=150)).await;
    log_reaches(&cluster.http(Y), ch, 150).await;
    let mut py_state = PlainState::default();
    let mut py = Plain::connect(&cluster.url(Y)).await.unwrap();
    publish_all(&mut py, &mut py_state, ch, &numbered("Y", 1..=150)).await;
    let before = until(&mut s1, &mut s1_state, "Y:150").await;
    assert_eq!(before.len(), 300, "S1 had everything before the restart");

    match stop {
        Stop::Kill => nodes[Y].kill().await.unwrap(),
        Stop::Term => sigterm(&mut nodes[Y]).await,
    }
    drop((s1, py));
    nodes[Y] = cluster.start(Y, WAIT).await;
    ready(&cluster.http(Y), WAIT).await;

    let mut s2_state = PlainState::default();
    let mut s2 = Plain::connect(&cluster.url(Y)).await.unwrap();
    s2.subscribe(&mut s2_state, ch).await.unwrap();
    let mut s1 = Plain::connect(&cluster.url(Y)).await.unwrap();
    let resumed = s1.subscribe(&mut s1_state, ch).await.unwrap();
    assert_eq!(resumed["subscribed"]["resumed"], Value::Bool(true), "{resumed}");
    // (The publisher's connection sat idle through the restart: a new one.)
    drop(px);
    let mut px = Plain::connect(&cluster.url(X)).await.unwrap();
    publish_all(&mut px, &mut px_state, ch, &["X:end".to_owned()]).await;
    assert_eq!(
        texts(&until(&mut s2, &mut s2_state, "X:end").await),
        ["X:end"],
        "fresh on Y ({stop:?})"
    );
    assert_eq!(
        texts(&until(&mut s1, &mut s1_state, "X:end").await),
        ["X:end"],
        "resumed on Y ({stop:?})"
    );
    assert!(s1_state.discontinuities.is_empty() && s2_state.discontinuities.is_empty());
    for i in 0..3 {
        let log = log_reaches(&cluster.http(i), ch, 301).await;
        assert_eq!(log.len(), 301, "node {i}'s log holds each message once ({stop:?})");
        assert!(once(&log), "node {i}: {:?}", texts(&log));
    }
    for mut n in nodes {
        let _ = n.kill().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_node_does_not_repeat_a_peers_messages() {
    restart_does_not_repeat_a_peers_messages(Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigtermed_node_does_not_repeat_a_peers_messages() {
    restart_does_not_repeat_a_peers_messages(Stop::Term).await;
}

/// B: while Y is down, a publisher sends 1–150 on X; Y restarts, cut off from X; the
/// publisher moves to Y and sends 151–160 (with `after`, as documented). Y must sequence
/// them after 1–150: its log, and a subscriber resuming on Y, have 1–160 in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_moves_to_a_restarted_node_keeps_its_order() {
    let dir = temp("b");
    let (cluster, relays) = ProcessCluster::write_relayed(&dir, history(&dir)).await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(cluster.start(i, WAIT).await);
    }
    for i in 0..3 {
        ready(&cluster.http(i), WAIT).await;
    }
    let ch = "log:b";
    let mut s_state = PlainState::default();
    let mut s = Plain::connect(&cluster.url(Y)).await.unwrap();
    s.subscribe(&mut s_state, ch).await.unwrap();

    nodes[Y].kill().await.unwrap();
    drop(s);
    let mut p_state = PlainState::default();
    let mut p = Plain::connect(&cluster.url(X)).await.unwrap();
    publish_all(&mut p, &mut p_state, ch, &numbered("P", 1..=150)).await;
    relays[&(X, Y)].block(true);
    nodes[Y] = cluster.start(Y, WAIT).await;

    // The publisher moves to Y, which cannot reach X yet.
    let mut p = Plain::connect(&cluster.url(Y)).await.unwrap();
    let (first, ()) = tokio::join!(p.publish(&mut p_state, ch, "P:151", "P:151"), async {
        // The link returns a moment later; the publish waits for it.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        relays[&(X, Y)].block(false);
    });
    let first = first.unwrap();
    assert!(first.get("ack").is_some(), "P:151 is sequenced once Y caught up: {first}");
    publish_all(&mut p, &mut p_state, ch, &numbered("P", 152..=160)).await;

    let all = numbered("P", 1..=160);
    for i in 0..3 {
        let log = log_reaches(&cluster.http(i), ch, 160).await;
        assert_eq!(texts(&log), all, "node {i}'s log keeps the publisher's order");
    }
    let mut s = Plain::connect(&cluster.url(Y)).await.unwrap();
    let resumed = s.subscribe(&mut s_state, ch).await.unwrap();
    assert_eq!(resumed["subscribed"]["resumed"], Value::Bool(true), "{resumed}");
    assert_eq!(texts(&until(&mut s, &mut s_state, "P:160").await), all, "resumed on Y");
    for mut n in nodes {
        let _ = n.kill().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// C: a client that received 1–150 of X's messages on X resumes on Y just after Y
/// restarted, before Y received them: it must not get them again when Y catches up, only
/// what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_a_node_still_catching_up_repeats_nothing() {
    let dir = temp("c");
    let (cluster, relays) = ProcessCluster::write_relayed(&dir, history(&dir)).await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(cluster.start(i, WAIT).await);
    }
    for i in 0..3 {
        ready(&cluster.http(i), WAIT).await;
    }
    let ch = "log:c";
    let mut s_state = PlainState::default();
    let mut s = Plain::connect(&cluster.url(X)).await.unwrap();
    s.subscribe(&mut s_state, ch).await.unwrap();

    nodes[Y].kill().await.unwrap();
    relays[&(X, Y)].block(true);
    let mut p_state = PlainState::default();
    let mut p = Plain::connect(&cluster.url(X)).await.unwrap();
    publish_all(&mut p, &mut p_state, ch, &numbered("X", 1..=150)).await;
    assert_eq!(texts(&until(&mut s, &mut s_state, "X:150").await), numbered("X", 1..=150));

    nodes[Y] = cluster.start(Y, WAIT).await;
    drop(s);
    let mut s = Plain::connect(&cluster.url(Y)).await.unwrap();
    let resumed = s.subscribe(&mut s_state, ch).await.unwrap();
    assert_eq!(resumed["subscribed"]["resumed"], Value::Bool(true), "{resumed}");
    // Y catches up with X's 150, which this client already has.
    relays[&(X, Y)].block(false);
    log_reaches(&cluster.http(Y), ch, 150).await;
    publish_all(&mut p, &mut p_state, ch, &["X:151".to_owned()]).await;
    let after = until(&mut s, &mut s_state, "X:151").await;
    assert_eq!(texts(&after), ["X:151"], "only what the client did not have");
    assert!(s_state.discontinuities.is_empty(), "{:?}", s_state.discontinuities);
    // Nothing more arrives (a repeat would come before the next heartbeat answer).
    s.heartbeat().await.unwrap();
    loop {
        match s.frame(&mut s_state, WAIT).await {
            Ok(f) if f.get("heartbeat").is_some() => break,
            Ok(_) => {}
            Err(PlainError::Timeout) => panic!("no heartbeat answer"),
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(s_state.got.len(), 151, "each message once");
    for mut n in nodes {
        let _ = n.kill().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// D: a publisher sends 1–100 on X while a third region Z cannot hear X; it moves to Y
/// (which has them) and sends 101–110. Z gets 101–110 from Y before X's messages: it must
/// hold them until X's arrive, so its log, and its subscribers, keep the publisher's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_region_keeps_a_moved_publishers_order() {
    const Z: usize = 2; // ap-south
    let dir = temp("d");
    let (cluster, relays) = ProcessCluster::write_relayed(&dir, history(&dir)).await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(cluster.start(i, WAIT).await);
    }
    for i in 0..3 {
        ready(&cluster.http(i), WAIT).await;
    }
    let ch = "log:d";
    let mut s_state = PlainState::default();
    let mut s = Plain::connect(&cluster.url(Z)).await.unwrap();
    s.subscribe(&mut s_state, ch).await.unwrap();
    relays[&(X, Z)].block(true);
    let mut p_state = PlainState::default();
    let mut p = Plain::connect(&cluster.url(X)).await.unwrap();
    publish_all(&mut p, &mut p_state, ch, &numbered("P", 1..=100)).await;
    log_reaches(&cluster.http(Y), ch, 100).await;
    let mut p = Plain::connect(&cluster.url(Y)).await.unwrap();
    publish_all(&mut p, &mut p_state, ch, &numbered("P", 101..=110)).await;
    // Y's messages reach Z (a moment) before X's can: Z must hold them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = log_of(&cluster.http(Z), ch).await;
    assert!(held.is_empty(), "Z logged before X's messages: {:?}", texts(&held));
    relays[&(X, Z)].block(false);
    let all = numbered("P", 1..=110);
    let log = log_reaches(&cluster.http(Z), ch, 110).await;
    assert_eq!(texts(&log), all, "Z's log keeps the publisher's order");
    assert_eq!(
        texts(&until(&mut s, &mut s_state, "P:110").await),
        all,
        "and so does its subscriber"
    );
    for mut n in nodes {
        let _ = n.kill().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
