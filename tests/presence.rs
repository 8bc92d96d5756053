//! Presence over real processes: three `tern edge` nodes (one per region) joined by the QUIC
//! backbone, 1,000 members spread over them, entered by plain WebSocket clients written from
//! docs/protocol.md. One node is SIGKILLed: its members leave on the others, each once, and
//! no ghost remains; restarted, its new members appear. A Rust SDK client whose connection
//! is cut reconnects to its node within `presence.grace` and keeps its member: nobody sees
//! it leave or enter.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::proxy::{Gate, Proxy};
use common::{ProcessCluster, REGIONS};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(60);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(url: &str, client_id: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}/v1/ws")).await.unwrap();
    let hello = json!({"connect": {"protocol": 1, "clientId": client_id}});
    ws.send(WsMessage::Text(hello.to_string().into())).await.unwrap();
    let f = next(&mut ws).await.expect("connected");
    assert!(f.get("connected").is_some(), "{f}");
    ws
}

async fn next(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time")? {
            Ok(WsMessage::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(WsMessage::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// A member: connects, enters `room:big`, then keeps reading (answering pings) until its
/// connection ends.
async fn member(url: String, id: String) {
    let mut ws = open(&url, &id).await;
    let enter = json!({"presence": {"requestId": 1, "channel": "room:big",
                                    "action": "PRESENCE_ACTION_ENTER", "text": id}});
    ws.send(WsMessage::Text(enter.to_string().into())).await.unwrap();
    let f = next(&mut ws).await.expect("an answer");
    assert!(f.get("presenceReply").is_some(), "{id}: {f}");
    tokio::spawn(async move { while next(&mut ws).await.is_some() {} });
}

/// What one watcher saw: the members now (client id → node), and per client id how often it
/// entered and left.
#[derive(Default)]
struct Seen {
    members: BTreeMap<String, String>,
    enters: BTreeMap<String, u32>,
    leaves: BTreeMap<String, u32>,
}

/// A watcher on `url`: subscribes with presence and applies the snapshot and every event.
async fn watcher(url: String) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut ws = open(&url, "watcher").await;
    let sub = json!({"subscribe": {"requestId": 1, "channel": "room:big", "presence": true}});
    ws.send(WsMessage::Text(sub.to_string().into())).await.unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(f) = next(&mut ws).await {
            let mut s = s.lock().unwrap();
            if let Some(r) = f.get("presenceReply") {
                for m in r["members"].as_array().into_iter().flatten() {
                    let id = m["clientId"].as_str().unwrap().to_owned();
                    s.members.insert(id, m["node"].as_str().unwrap().to_owned());
                }
            }
            for e in f["presence"]["events"].as_array().into_iter().flatten() {
                let id = e["member"]["clientId"].as_str().unwrap().to_owned();
                match e["action"].as_str().unwrap() {
                    "PRESENCE_ACTION_LEAVE" => {
                        s.members.remove(&id);
                        *s.leaves.entry(id).or_default() += 1;
                    }
                    "PRESENCE_ACTION_ENTER" => {
                        s.members.insert(id.clone(), e["member"]["node"].as_str().unwrap().into());
                        *s.enters.entry(id).or_default() += 1;
                    }
                    _ => {}
                }
            }
        }
    });
    seen
}

/// Waits until `f` holds for what every watcher saw.
async fn until(watchers: &[&Arc<Mutex<Seen>>], what: &str, f: impl Fn(&Seen) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !watchers.iter().all(|w| f(&w.lock().unwrap())) {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn node_of(i: usize) -> String {
    format!("{}/edge-1", REGIONS[i])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_leave_with_a_killed_node_and_a_reconnect_within_the_grace_keeps_them() {
    let dir = std::env::temp_dir().join(format!("tern-presence-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = ProcessCluster::write(&dir, |_| {
        "[presence]\ndown_after = \"3s\"\ngrace = \"2s\"\n".to_owned()
    });
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(cluster.start(i, WAIT).await);
    }
    for i in 0..3 {
        common::ready(&cluster.http(i), WAIT).await;
    }
    let watchers = [
        watcher(cluster.url(0)).await,
        watcher(cluster.url(1)).await,
        watcher(cluster.url(2)).await,
    ];

    // 1,000 members, a third on each node, entered 100 at a time.
    let ids: Vec<(usize, String)> = (0..1000).map(|i| (i % 3, format!("m{i:04}"))).collect();
    for chunk in ids.chunks(100) {
        let joins = chunk.iter().map(|(n, id)| member(cluster.url(*n), id.clone()));
        futures_util::future::join_all(joins).await;
    }
    until(&[&watchers[0], &watchers[1], &watchers[2]], "1,000 members everywhere", |s| {
        s.members.len() == 1000
    })
    .await;
    for w in &watchers {
        let s = w.lock().unwrap();
        for (n, id) in &ids {
            assert_eq!(s.members.get(id), Some(&node_of(*n)), "{id}");
        }
    }

    // A Rust SDK member on eu-west through a proxy that will cut its connection.
    let proxy = Proxy::start(vec![cluster.client[0]], 1, Gate::Open).await;
    let options =
        tern_client::ClientOptions { client_id: Some("sdk".into()), ..Default::default() };
    let sdk = tern_client::Client::connect(&proxy.url(), options).await.unwrap();
    sdk.presence_enter("room:big", Some("here".into())).await.unwrap();
    until(&[&watchers[1], &watchers[2]], "the SDK's member everywhere", |s| {
        s.members.contains_key("sdk")
    })
    .await;

    // SIGKILL ap-south: its members leave on the others, each once; nothing else leaves.
    let killed = std::time::Instant::now();
    nodes[2].start_kill().unwrap();
    let _ = nodes[2].wait().await;
    let theirs: BTreeSet<&String> = ids.iter().filter(|(n, _)| *n == 2).map(|(_, id)| id).collect();
    until(&[&watchers[0], &watchers[1]], "ap-south's members gone", |s| s.members.len() == 668)
        .await;
    println!("ap-south's 333 members left the others {:?} after its SIGKILL", killed.elapsed());
    for w in &watchers[..2] {
        let s = w.lock().unwrap();
        for (id, node) in &s.members {
            assert_ne!(node, &node_of(2), "a ghost: {id}");
        }
        for id in &theirs {
            assert_eq!(s.leaves.get(*id), Some(&1), "{id} left once");
        }
        assert_eq!(s.leaves.len(), theirs.len(), "only ap-south's members left");
    }
    // The HTTP API agrees.
    for i in 0..2 {
        let mut count = 0;
        let mut after = String::new();
        loop {
            let cursor: String = after.bytes().map(|b| format!("%{b:02X}")).collect();
            let url = format!("{}/v1/channels/room:big/presence?after={cursor}", cluster.http(i));
            let page: Value = serde_json::from_str(&common::plain::http_get(&url).await).unwrap();
            count += page["members"].as_array().unwrap().len();
            match page["next"].as_str() {
                Some(n) => after = n.to_owned(),
                None => break,
            }
        }
        assert_eq!(count, 668, "node {i} by HTTP");
    }

    // The SDK's connection is cut; it reconnects to eu-west within the grace: its member
    // stays, with nobody seeing it leave or enter again.
    let enters_before = watchers[1].lock().unwrap().enters.get("sdk").copied();
    let mut state = sdk.state();
    proxy.cut();
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| !matches!(s, tern_client::ConnectionState::Connected(_))),
    )
    .await
    .unwrap()
    .unwrap();
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| matches!(s, tern_client::ConnectionState::Connected(_))),
    )
    .await
    .unwrap()
    .unwrap();
    // Past the grace, and a round trip through the node.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let members = sdk.presence_members("room:big").await.unwrap();
    assert!(members.iter().any(|m| m.client_id == "sdk"), "the SDK's member is there");
    for w in &watchers[..2] {
        let s = w.lock().unwrap();
        assert_eq!(s.leaves.get("sdk"), None, "the SDK's member did not leave");
        assert_eq!(s.enters.get("sdk").copied(), enters_before, "nor entered again");
    }

    // ap-south restarts (a new epoch, no members); its new members appear everywhere.
    nodes[2] = cluster.start(2, WAIT).await;
    common::ready(&cluster.http(2), WAIT).await;
    for i in 0..50 {
        member(cluster.url(2), format!("new{i:02}")).await;
    }
    until(&[&watchers[0], &watchers[1]], "ap-south's new members", |s| {
        (0..50).all(|i| s.members.get(&format!("new{i:02}")) == Some(&node_of(2)))
    })
    .await;
    assert!(theirs.iter().all(|id| !watchers[0].lock().unwrap().members.contains_key(*id)));
    sdk.close().await;
    for mut n in nodes {
        let _ = n.start_kill();
        let _ = n.wait().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
