//! Drain: a node told to stop (SIGTERM) first sends its clients a `draining` frame — go
//! elsewhere now — and closes them with 1001 only `timeouts.drain` later. SDK clients move
//! to the next region at once and resume there: the subscriber ends with every message
//! once, in order, and every publish is acknowledged, none lost or doubled.

use std::time::Duration;

use crate::common::text;
use futures_util::StreamExt;
use tern_client::{Client, ClientOptions, Event};

use crate::common::{self, ProcessCluster, plain::Plain, plain::PlainState};

const WAIT: Duration = Duration::from_secs(30);

/// Publishes `PREFIX0`…`PREFIX{n-1}` on `channel`, 5 ms apart, each acknowledged; hands back
/// the client and the acks.
fn publish_paced(
    publisher: Client,
    channel: &'static str,
    prefix: &'static str,
    n: usize,
) -> tokio::task::JoinHandle<(Client, Vec<tern_proto::client::Ack>)> {
    tokio::spawn(async move {
        let mut acks = Vec::new();
        for i in 0..n {
            let ack = publisher.publish(channel, format!("{prefix}{i}")).await;
            acks.push(ack.unwrap_or_else(|e| panic!("publish {prefix}{i}: {e}")));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (publisher, acks)
    })
}

/// Reads `sub` until `got` holds `n` messages; anything else is a failure.
async fn receive(sub: &mut tern_client::Subscription, got: &mut Vec<String>, n: usize) {
    while got.len() < n {
        match tokio::time::timeout(WAIT, sub.next()).await.expect("every message in time") {
            Some(Event::Message(m)) => got.push(text(&m)),
            Some(Event::Discontinuity { reason }) => panic!("discontinuity: {reason}"),
            None => panic!("subscription ended"),
        }
    }
}

/// The plain client's next `draining` frame (other frames skipped).
async fn draining_frame(plain: &mut Plain, state: &mut PlainState) -> serde_json::Value {
    loop {
        let f = plain.frame(state, WAIT).await.expect("a frame before the close");
        if let Some(d) = f.get("draining") {
            return d.clone();
        }
    }
}

/// Every message `PREFIX0`…`PREFIX{n-1}` received once, in order, and every publish
/// acknowledged as its own message.
fn assert_all_once(got: &[String], acks: &[tern_proto::client::Ack], prefix: &str, n: usize) {
    let want: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    assert_eq!(got, want, "once each, in order");
    let ids: std::collections::HashSet<_> = acks.iter().map(|a| a.message_id.clone()).collect();
    assert_eq!(ids.len(), n, "every publish acknowledged, each its own message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_draining_node_move_to_another_region_and_lose_nothing() {
    let dir = std::env::temp_dir().join(format!("tern-drain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = ProcessCluster::write_with_history(&dir);
    let mut nodes = cluster.start_all(WAIT).await;
    // eu-west first, us-east next: where the SDKs go when eu-west drains.
    let urls = vec![cluster.url(0), cluster.url(1)];
    let sub_client = Client::connect_any(&urls, ClientOptions::default()).await.unwrap();
    let mut sub = sub_client.subscribe("chat:drain").await.unwrap();
    let publisher = Client::connect_any(&urls, ClientOptions::default()).await.unwrap();
    // A plain protocol client on eu-west, to see the frame itself.
    let mut plain = Plain::connect(&cluster.url(0)).await.unwrap();
    let mut plain_state = PlainState::default();

    const N: usize = 400;
    let pub_task = publish_paced(publisher, "chat:drain", "d", N);
    // Let some go through eu-west, then drain it.
    let mut got = Vec::new();
    receive(&mut sub, &mut got, 100).await;
    let mut eu = nodes.remove(0);
    let stopping = tokio::spawn(async move { common::sigterm(&mut eu).await });
    // The plain client is told first, with the drain time, before its 1001.
    let draining = draining_frame(&mut plain, &mut plain_state).await;
    assert_eq!(draining["closeInMs"], 3000, "{draining}");
    assert_eq!(draining["reason"], "node shutting down", "{draining}");

    receive(&mut sub, &mut got, N).await;
    let (publisher, acks) = pub_task.await.unwrap();
    assert_all_once(&got, &acks, "d", N);
    // Nothing more arrives (no repeat after the move).
    assert!(tokio::time::timeout(Duration::from_millis(500), sub.next()).await.is_err());
    for c in [&sub_client, &publisher] {
        assert_eq!(c.connected().map(|c| c.node), Some("us-east/edge-1".to_owned()));
    }
    stopping.await.unwrap();
    sub_client.close().await;
    publisher.close().await;
    for mut n in nodes {
        common::sigterm(&mut n).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads a plain SSE stream (`GET /v1/sse`) until an event named `name`; its data.
async fn sse_event(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>,
    name: &str,
) -> serde_json::Value {
    let mut event = String::new();
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("an SSE line in time")
            .unwrap()
            .unwrap_or_else(|| panic!("the stream ended before a {name} event"));
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ") {
            if event == name {
                return serde_json::from_str(data).unwrap();
            }
        } else if line.is_empty() {
            event.clear();
        }
    }
}

/// `POST /admin/drain` on the admin listener drains a node without stopping it: WebSocket
/// and SSE clients are told (`draining`, "node draining"), the SDKs move to another region
/// and lose nothing, new connections and `/readyz` answer 503; `DELETE /admin/drain` takes
/// clients again. `/metrics` moves to the admin listener, which answers no browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_drain_moves_clients_without_stopping_the_node_and_ends_on_request() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = std::env::temp_dir().join(format!("tern-admin-drain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = ProcessCluster::write_with_history(&dir);
    // eu-west gets an admin listener.
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = std::fs::read_to_string(&cluster.configs[0]).unwrap();
    let client_line = format!("client = \"{}\"\n", cluster.client[0]);
    assert!(config.contains(&client_line));
    let config = config.replace(&client_line, &format!("{client_line}admin = \"{admin}\"\n"));
    std::fs::write(&cluster.configs[0], config).unwrap();
    let nodes = cluster.start_all(WAIT).await;
    let admin = admin.to_string();
    let eu = cluster.client[0].to_string();

    // Metrics are on the admin listener only; it refuses a browser's request.
    assert_eq!(common::http(&eu, "GET", "/metrics", &[], "").await.0, 404);
    let (status, metrics) = common::http(&admin, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("tern_connections"), "{metrics}");
    let page = [("Origin", "http://evil.example")];
    assert_eq!(common::http(&admin, "POST", "/admin/drain", &page, "").await.0, 403);
    let (status, body) = common::http(&admin, "GET", "/admin/drain", &[], "").await;
    assert_eq!(status, 200);
    assert!(body.contains(r#""draining":false"#), "{body}");

    let urls = vec![cluster.url(0), cluster.url(1)];
    let sub_client = Client::connect_any(&urls, ClientOptions::default()).await.unwrap();
    let mut sub = sub_client.subscribe("chat:admin-drain").await.unwrap();
    let publisher = Client::connect_any(&urls, ClientOptions::default()).await.unwrap();
    // Both start on eu-west, the node that drains.
    for c in [&sub_client, &publisher] {
        assert_eq!(c.connected().map(|c| c.node), Some("eu-west/edge-1".to_owned()));
    }
    let mut plain = Plain::connect(&cluster.url(0)).await.unwrap();
    let mut plain_state = PlainState::default();
    // A plain SSE client (what an EventSource sees).
    let mut sse = tokio::net::TcpStream::connect(&eu).await.unwrap();
    let req = format!(
        "GET /v1/sse?channel=chat:admin-drain HTTP/1.1\r\nHost: {eu}\r\nAccept: text/event-stream\r\n\r\n"
    );
    sse.write_all(req.as_bytes()).await.unwrap();
    let mut sse = tokio::io::BufReader::new(sse).lines();
    sse_event(&mut sse, "subscribed").await;

    const N: usize = 300;
    let pub_task = publish_paced(publisher, "chat:admin-drain", "a", N);
    let mut got = Vec::new();
    receive(&mut sub, &mut got, 80).await;
    let (status, body) = common::http(&admin, "POST", "/admin/drain", &[], "").await;
    assert_eq!(status, 202, "{body}");
    assert!(body.contains(r#""draining":true"#), "{body}");
    assert_eq!(common::http(&admin, "POST", "/admin/drain", &[], "").await.0, 200, "once");

    let draining = draining_frame(&mut plain, &mut plain_state).await;
    assert_eq!(draining["reason"], "node draining", "{draining}");
    let sse_draining = sse_event(&mut sse, "draining").await;
    assert_eq!(sse_draining["reason"], "node draining", "{sse_draining}");
    let closed = sse_event(&mut sse, "close").await;
    assert_eq!(closed["code"], 1001, "{closed}");
    // No newcomer while it drains; the load balancer's probe says why.
    let (status, body) = common::http(&eu, "GET", "/readyz", &[], "").await;
    assert_eq!(status, 503);
    assert!(body.contains(r#""reason":"draining""#), "{body}");
    assert!(Plain::connect(&cluster.url(0)).await.is_err(), "a WebSocket upgrade is refused");

    receive(&mut sub, &mut got, N).await;
    let (publisher, acks) = pub_task.await.unwrap();
    assert_all_once(&got, &acks, "a", N);
    assert!(tokio::time::timeout(Duration::from_millis(500), sub.next()).await.is_err());
    for c in [&sub_client, &publisher] {
        assert_eq!(c.connected().map(|c| c.node), Some("us-east/edge-1".to_owned()));
    }

    // The drain ends on request: the node takes clients again.
    let (status, body) = common::http(&admin, "DELETE", "/admin/drain", &[], "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""draining":false"#), "{body}");
    common::ready(&cluster.http(0), WAIT).await;
    let mut again = Plain::connect(&cluster.url(0)).await.expect("eu-west takes clients again");
    let mut again_state = PlainState::default();
    again.subscribe(&mut again_state, "chat:admin-drain").await.unwrap();
    sub_client.close().await;
    publisher.close().await;
    for mut n in nodes {
        common::sigterm(&mut n).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
