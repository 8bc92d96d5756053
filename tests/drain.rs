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
    let pub_task = tokio::spawn(async move {
        let mut acks = Vec::new();
        for i in 0..N {
            let ack = publisher.publish("chat:drain", format!("d{i}")).await;
            acks.push(ack.unwrap_or_else(|e| panic!("publish d{i}: {e}")));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (publisher, acks)
    });
    // Let some go through eu-west, then drain it.
    let mut got = Vec::new();
    while got.len() < 100 {
        match tokio::time::timeout(WAIT, sub.next()).await.expect("in time") {
            Some(Event::Message(m)) => got.push(text(&m)),
            other => panic!("{other:?}"),
        }
    }
    let mut eu = nodes.remove(0);
    let stopping = tokio::spawn(async move { common::sigterm(&mut eu).await });
    // The plain client is told first, with the drain time, before its 1001.
    let draining = loop {
        let f = plain.frame(&mut plain_state, WAIT).await.expect("a frame before the close");
        if let Some(d) = f.get("draining") {
            break d.clone();
        }
    };
    assert_eq!(draining["closeInMs"], 3000, "{draining}");
    assert_eq!(draining["reason"], "node shutting down", "{draining}");

    while got.len() < N {
        match tokio::time::timeout(WAIT, sub.next()).await.expect("every message in time") {
            Some(Event::Message(m)) => got.push(text(&m)),
            Some(Event::Discontinuity { reason }) => panic!("discontinuity: {reason}"),
            None => panic!("subscription ended"),
        }
    }
    let (publisher, acks) = pub_task.await.unwrap();
    assert_eq!(got, (0..N).map(|i| format!("d{i}")).collect::<Vec<_>>(), "once each, in order");
    let ids: std::collections::HashSet<_> = acks.iter().map(|a| a.message_id.clone()).collect();
    assert_eq!(ids.len(), N, "every publish acknowledged, each its own message");
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
