//! Fan-out through the Rust SDK over real loopback sockets: nothing lost, nothing
//! duplicated, per-publisher order kept.

use crate::common;

use std::collections::HashMap;

use common::{TestNode, WAIT};
use futures_util::StreamExt;
use tern_client::{Client, ClientOptions, Event, Format, Message};
use tern_proto::client::message::Data;

fn text(m: &Message) -> &str {
    match &m.data {
        Some(Data::Text(t)) => t,
        other => panic!("expected text, got {other:?}"),
    }
}

async fn collect(mut sub: tern_client::Subscription, n: usize) -> Vec<Message> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout(WAIT, sub.next()).await.expect("message in time") {
            Some(Event::Message(m)) => got.push(m),
            other => panic!("unexpected {other:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_reach_a_hundred_subscribers_in_order_once() {
    let node = TestNode::start(|_| {}).await;
    const SUBS: usize = 100;
    const MSGS: usize = 10_000;
    let mut readers = Vec::new();
    for i in 0..SUBS {
        // Half the subscribers speak JSON, half protobuf: both formats see the same stream.
        let format = if i % 2 == 0 { Format::Json } else { Format::Protobuf };
        let c = Client::connect(&node.url(), ClientOptions { format, ..Default::default() })
            .await
            .unwrap();
        let sub = c.subscribe("chat:big").await.unwrap();
        readers.push(tokio::spawn(async move {
            let got = collect(sub, MSGS).await;
            drop(c);
            got
        }));
    }
    let publisher = Client::connect(&node.url(), ClientOptions::default()).await.unwrap();
    for i in 0..MSGS {
        publisher.publish("chat:big", format!("m{i}")).await.unwrap();
    }
    for r in readers {
        let got = r.await.unwrap();
        let texts: Vec<&str> = got.iter().map(text).collect();
        let want: Vec<String> = (0..MSGS).map(|i| format!("m{i}")).collect();
        assert_eq!(texts, want, "every message once, in publish order");
        // Origin sequences are gap-free 1..=N.
        assert!(got.iter().enumerate().all(|(i, m)| m.origin_seq == i as u64 + 1));
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_publishers_keep_their_own_orders() {
    let node = TestNode::start(|_| {}).await;
    const EACH: usize = 2_000;
    let mut readers = Vec::new();
    for _ in 0..5 {
        let c = Client::connect(&node.url(), ClientOptions::default()).await.unwrap();
        let sub = c.subscribe("room:two").await.unwrap();
        readers.push(tokio::spawn(async move {
            let got = collect(sub, 2 * EACH).await;
            drop(c);
            got
        }));
    }
    let mut pubs = Vec::new();
    for p in ["a", "b"] {
        let url = node.url();
        pubs.push(tokio::spawn(async move {
            let c = Client::connect(&url, ClientOptions::default()).await.unwrap();
            for i in 0..EACH {
                c.publish("room:two", format!("{p}{i}")).await.unwrap();
            }
        }));
    }
    for p in pubs {
        p.await.unwrap();
    }
    let mut orders = Vec::new();
    for r in readers {
        let got = r.await.unwrap();
        let mut per: HashMap<char, Vec<usize>> = HashMap::new();
        for m in &got {
            let t = text(m);
            per.entry(t.chars().next().unwrap()).or_default().push(t[1..].parse().unwrap());
        }
        for p in ['a', 'b'] {
            assert_eq!(
                per[&p],
                (0..EACH).collect::<Vec<_>>(),
                "publisher {p}: all, once, in order"
            );
        }
        orders.push(got.iter().map(|m| m.id.clone()).collect::<Vec<_>>());
    }
    // Every subscriber sees the same interleaving (one channel order).
    assert!(orders.windows(2).all(|w| w[0] == w[1]));
    node.stop().await;
}

#[tokio::test]
async fn a_retried_publish_id_is_delivered_once() {
    let node = TestNode::start(|_| {}).await;
    let c = Client::connect(&node.url(), ClientOptions::default()).await.unwrap();
    let mut sub = c.subscribe("chat:dedupe").await.unwrap();
    let first = c.publish_with("chat:dedupe", "msg", Some("order-17"), "paid").await.unwrap();
    let again = c.publish_with("chat:dedupe", "msg", Some("order-17"), "paid").await.unwrap();
    assert!(!first.duplicate && again.duplicate);
    assert_eq!(first.origin_seq, again.origin_seq);
    c.publish("chat:dedupe", "after").await.unwrap();
    let got = collect_texts(&mut sub, 2).await;
    assert_eq!(got, ["paid", "after"]);
    node.stop().await;
}

async fn collect_texts(sub: &mut tern_client::Subscription, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
            Some(Event::Message(m)) => out.push(text(&m).to_owned()),
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

#[tokio::test]
async fn the_sdk_reconnects_resubscribes_and_reports_the_gap() {
    let node = TestNode::start(|_| {}).await;
    let addr = node.addr;
    let c = Client::connect(&node.url(), ClientOptions::default()).await.unwrap();
    let mut sub = c.subscribe("chat:re").await.unwrap();
    c.publish("chat:re", "before").await.unwrap();
    assert_eq!(collect_texts(&mut sub, 1).await, ["before"]);

    node.stop().await;
    // A new node on the same address: the client reconnects and subscribes again,
    // presenting where it left off. The channel keeps no history and the node lost its
    // state: the subscription learns that messages may have been missed.
    let node = TestNode::start(|cfg| cfg.listen.client = addr).await;
    match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
        Some(Event::Discontinuity { reason }) => assert!(reason.contains("no history"), "{reason}"),
        other => panic!("expected a discontinuity, got {other:?}"),
    }
    let mut state = c.state();
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| matches!(s, tern_client::ConnectionState::Connected(_))),
    )
    .await
    .unwrap()
    .unwrap();
    // Publish until the re-subscription is live (it races the first publish).
    let other = Client::connect(&node.url(), ClientOptions::default()).await.unwrap();
    let mut i = 0;
    let got = loop {
        other.publish("chat:re", format!("after{i}")).await.unwrap();
        i += 1;
        if let Ok(Some(Event::Message(m))) =
            tokio::time::timeout(std::time::Duration::from_millis(200), sub.next()).await
        {
            break text(&m).to_owned();
        }
        assert!(i < 100, "re-subscription never became live");
    };
    assert!(got.starts_with("after"));
    node.stop().await;
}
