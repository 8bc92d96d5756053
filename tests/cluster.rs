//! A three-region cluster of real `tern edge` processes joined by the QUIC backbone: one node
//! is SIGKILLed mid-stream and restarted.

use crate::common;

use common::ProcessCluster;

use std::collections::HashMap;
use std::time::Duration;

use crate::common::text;
use futures_util::StreamExt;
use tern_client::{Client, ClientOptions, Event};

const WAIT: Duration = Duration::from_secs(60);

/// Publishes probes from every node until every node has seen one from each other node:
/// then all backbone links are up.
async fn wait_for_mesh(urls: &[String]) {
    let mut clients = Vec::new();
    let mut subs = Vec::new();
    for u in urls {
        let c = Client::connect(u, ClientOptions::default()).await.unwrap();
        subs.push(c.subscribe("probe:mesh").await.unwrap());
        clients.push(c);
    }
    let mut seen = vec![std::collections::HashSet::new(); urls.len()];
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.iter().any(|s| s.len() < urls.len()) {
        assert!(tokio::time::Instant::now() < deadline, "the backbone mesh never came up");
        for (i, c) in clients.iter().enumerate() {
            c.publish("probe:mesh", format!("{i}")).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (i, sub) in subs.iter_mut().enumerate() {
            while let Ok(Some(Event::Message(m))) =
                tokio::time::timeout(Duration::from_millis(1), sub.next()).await
            {
                seen[i].insert(text(&m));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_restarts_with_a_new_epoch_and_nothing_is_lost_or_repeated() {
    let dir = std::env::temp_dir().join(format!("tern-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = ProcessCluster::write(&dir, |_| String::new());
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(cluster.start(i, WAIT).await);
    }
    let url = |i: usize| cluster.url(i);
    wait_for_mesh(&(0..3).map(url).collect::<Vec<_>>()).await;

    // Subscribers on the two nodes that survive.
    const EACH: usize = 1_500;
    const PRE: usize = 600;
    const POST: usize = 100;
    let mut readers = Vec::new();
    for i in [1, 2] {
        let c = Client::connect(&url(i), ClientOptions::default()).await.unwrap();
        let mut sub = c.subscribe("chat:k").await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut per: HashMap<String, Vec<usize>> = HashMap::new();
            let done = |per: &HashMap<String, Vec<usize>>| {
                per.get("B").map_or(0, Vec::len) == EACH
                    && per.get("C").map_or(0, Vec::len) == EACH
                    && per.get("Apost").map_or(0, Vec::len) == POST
            };
            while !done(&per) {
                match tokio::time::timeout(WAIT, sub.next()).await.expect("message in time") {
                    Some(Event::Message(m)) => {
                        let t = text(&m);
                        let (who, k) = t.split_once(':').unwrap();
                        per.entry(who.to_owned()).or_default().push(k.parse().unwrap());
                    }
                    // The killed node's restart: its messages in flight at the kill may be
                    // lost (this namespace keeps no history), and subscribers are told.
                    Some(Event::Discontinuity { .. }) => {
                        per.entry("discontinuity".into()).or_default().push(0);
                    }
                    other => panic!("subscriber on node {i} was interrupted: {other:?}"),
                }
            }
            drop(c);
            per
        }));
    }
    // B and C publish throughout; A publishes, then is killed mid-stream.
    let mut pubs = Vec::new();
    for (i, who) in [(1, "B"), (2, "C")] {
        let u = url(i);
        pubs.push(tokio::spawn(async move {
            let c = Client::connect(&u, ClientOptions::default()).await.unwrap();
            for k in 0..EACH {
                c.publish("chat:k", format!("{who}:{k}")).await.unwrap();
                if k % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    let a = Client::connect(&url(0), ClientOptions::default()).await.unwrap();
    for k in 0..PRE {
        a.publish("chat:k", format!("Apre:{k}")).await.unwrap();
    }
    nodes[0].kill().await.unwrap(); // SIGKILL: no shutdown, no goodbye
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes[0] = cluster.start(0, WAIT).await;
    let a = Client::connect(&url(0), ClientOptions::default()).await.unwrap();
    for k in 0..POST {
        a.publish("chat:k", format!("Apost:{k}")).await.unwrap();
    }
    for p in pubs {
        p.await.unwrap();
    }
    for r in readers {
        let per = r.await.unwrap();
        assert_eq!(per["B"], (0..EACH).collect::<Vec<_>>());
        assert_eq!(per["C"], (0..EACH).collect::<Vec<_>>());
        // What the killed node replicated before it died arrives once, in order, no holes.
        let pre = per.get("Apre").cloned().unwrap_or_default();
        println!("{} of {PRE} messages of the killed node had been replicated", pre.len());
        assert_eq!(pre, (0..pre.len()).collect::<Vec<_>>());
        assert!(!pre.is_empty(), "the mesh was up: the killed node's messages were replicated");
        // After the restart: a new epoch whose sequences start again at 1 — all delivered,
        // none mistaken for an old message.
        assert_eq!(per["Apost"], (0..POST).collect::<Vec<_>>());
        // The restart is announced once (a new epoch of a stream that had started).
        assert_eq!(per.get("discontinuity").map_or(0, Vec::len), 1, "one discontinuity");
    }
    for mut n in nodes {
        let _ = n.kill().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
