//! Three real nodes joined by the QUIC backbone (mutual TLS with a cluster CA) on loopback.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::{TestNode, WAIT, cluster, eventually, free_udp_port, section, temp_dir};
use futures_util::StreamExt;
use tern_backbone::certs;
use tern_client::{Client, ClientOptions, Event};
use tern_proto::client::message::Data;
use tern_proto::types::NodeId;

fn text(d: &Option<Data>) -> String {
    match d {
        Some(Data::Text(t)) => t.clone(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_every_message_once_in_publisher_order() {
    let c = cluster(&["eu-west", "us-east", "ap-south"], |_, _| {}).await;
    const EACH: usize = 3_400; // 10,200 in total
    let mut readers = Vec::new();
    for n in &c.nodes {
        for _ in 0..2 {
            let client = Client::connect(&n.url(), ClientOptions::default()).await.unwrap();
            let mut sub = client.subscribe("chat:global").await.unwrap();
            readers.push(tokio::spawn(async move {
                let mut per: HashMap<String, Vec<usize>> = HashMap::new();
                for _ in 0..3 * EACH {
                    match tokio::time::timeout(WAIT, sub.next()).await.expect("message in time") {
                        Some(Event::Message(m)) => {
                            let t = text(&m.data);
                            let (who, i) = t.split_once(':').unwrap();
                            per.entry(who.to_owned()).or_default().push(i.parse().unwrap());
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                drop(client);
                per
            }));
        }
    }
    let mut pubs = Vec::new();
    for (i, n) in c.nodes.iter().enumerate() {
        let url = n.url();
        pubs.push(tokio::spawn(async move {
            let client = Client::connect(&url, ClientOptions::default()).await.unwrap();
            for k in 0..EACH {
                client.publish("chat:global", format!("p{i}:{k}")).await.unwrap();
            }
        }));
    }
    for p in pubs {
        p.await.unwrap();
    }
    for r in readers {
        let per = r.await.unwrap();
        for i in 0..3 {
            assert_eq!(
                per[&format!("p{i}")],
                (0..EACH).collect::<Vec<_>>(),
                "publisher {i}: every message once, in order"
            );
        }
    }
    for n in c.nodes {
        n.stop().await;
    }
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[tokio::test]
async fn nodes_with_a_foreign_certificate_or_an_unexpected_id_are_refused() {
    let c = cluster(&["eu-west", "us-east"], |_, _| {}).await;
    // An impostor: a certificate for a peer's name, but from another CA.
    let other = temp_dir("impostor");
    certs::init_ca(&other).unwrap();
    let ids = [NodeId::parse("eu-west/edge-1").unwrap(), NodeId::parse("us-east/edge-1").unwrap()];
    certs::issue_node(&other, &ids[0]).unwrap();
    let addrs = [free_udp_port(), c.nodes[1].node.hub().backbone_addr().unwrap()];
    let mut b = section(&other, 0, &ids, &addrs);
    b.peers.retain(|p| p.id == ids[1].to_string());
    let impostor = TestNode::start(move |cfg| {
        cfg.node.region = "eu-west".into();
        cfg.backbone = Some(b);
    })
    .await;
    // A node with a genuine certificate, but for a node id the real node does not expect.
    let stranger_id = NodeId::parse("ap-south/edge-1").unwrap();
    certs::issue_node(&c.dir, &stranger_id).unwrap();
    let ids2 = [stranger_id, ids[1].clone()];
    let addrs2 = [free_udp_port(), addrs[1]];
    let mut b2 = section(&c.dir, 0, &ids2, &addrs2);
    b2.peers.retain(|p| p.id == ids2[1].to_string());
    let stranger = TestNode::start(move |cfg| {
        cfg.node.region = "ap-south".into();
        cfg.backbone = Some(b2);
    })
    .await;
    let strange = Client::connect(&stranger.url(), ClientOptions::default()).await.unwrap();
    // Messages published on the impostor never reach the real node.
    let real = Client::connect(&c.nodes[1].url(), ClientOptions::default()).await.unwrap();
    let mut sub = real.subscribe("chat:x").await.unwrap();
    let fake = Client::connect(&impostor.url(), ClientOptions::default()).await.unwrap();
    // And the genuine peer does get through, so the silence is the refusal, not a dead link.
    let genuine = Client::connect(&c.nodes[0].url(), ClientOptions::default()).await.unwrap();
    for _ in 0..20 {
        fake.publish("chat:x", "from the impostor").await.unwrap();
        strange.publish("chat:x", "from the stranger").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    genuine.publish("chat:x", "genuine").await.unwrap();
    match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
        Some(Event::Message(m)) => assert_eq!(text(&m.data), "genuine"),
        other => panic!("unexpected {other:?}"),
    }
    impostor.stop().await;
    stranger.stop().await;
    for n in c.nodes {
        n.stop().await;
    }
    let _ = std::fs::remove_dir_all(&c.dir);
    let _ = std::fs::remove_dir_all(&other);
}

/// Three regions where eu-west and us-east hold the CA's revocation list (`tern certs
/// revoke`), written by `revoke` before the nodes start; ap-south holds none, so any
/// refusal is the others' doing.
async fn cluster_with_crl(revoke: impl Fn(&std::path::Path)) -> common::Cluster {
    cluster(&["eu-west", "us-east", "ap-south"], |i, cfg| {
        let b = cfg.backbone.as_mut().unwrap();
        let dir = b.ca.parent().unwrap().to_path_buf();
        if i == 0 {
            revoke(&dir);
        }
        if i < 2 {
            b.crl = Some(dir.join("crl.pem"));
        }
    })
    .await
}

/// ap-south publishes for `span` (several of its redials, back-off ≤ 2 s), then eu-west
/// and us-east once each: subscribers on those two get exactly their two messages.
async fn only_the_genuine_nodes_replicate(c: common::Cluster, span: Duration) {
    let mut subs = Vec::new();
    let mut clients = Vec::new();
    for n in &c.nodes[..2] {
        let client = Client::connect(&n.url(), ClientOptions::default()).await.unwrap();
        subs.push(client.subscribe("chat:x").await.unwrap());
        clients.push(client);
    }
    let ap = Client::connect(&c.nodes[2].url(), ClientOptions::default()).await.unwrap();
    let until = tokio::time::Instant::now() + span;
    while tokio::time::Instant::now() < until {
        ap.publish("chat:x", "from the revoked node").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    clients[0].publish("chat:x", "eu").await.unwrap();
    clients[1].publish("chat:x", "us").await.unwrap();
    for sub in &mut subs {
        let mut got = Vec::new();
        for _ in 0..2 {
            match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
                Some(Event::Message(m)) => got.push(text(&m.data)),
                other => panic!("unexpected {other:?}"),
            }
        }
        got.sort();
        assert_eq!(got, ["eu", "us"], "the genuine nodes replicate; the revoked one is cut off");
    }
    for n in c.nodes {
        n.stop().await;
    }
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// A node whose certificate the cluster CA revoked is refused by the peers given the
/// revocation list, whichever side dials, while they keep replicating with each other.
#[tokio::test]
async fn a_node_with_a_revoked_certificate_is_refused() {
    let revoked = NodeId::parse("ap-south/edge-1").unwrap();
    let c = cluster_with_crl(|dir| {
        certs::revoke_node(dir, &revoked).unwrap();
    })
    .await;
    only_the_genuine_nodes_replicate(c, Duration::from_secs(1)).await;
}

/// Revoking a node while the cluster runs: within the reload interval the others close
/// their links to it and refuse its redials, and keep replicating with each other.
#[tokio::test]
async fn revoking_a_running_node_cuts_its_links() {
    let c = cluster_with_crl(|dir| {
        // A list to start from: it names a node that never runs.
        let unused = NodeId::parse("sa-east/edge-1").unwrap();
        certs::issue_node(dir, &unused).unwrap();
        certs::revoke_node(dir, &unused).unwrap();
    })
    .await;
    let revoked = NodeId::parse("ap-south/edge-1").unwrap();
    let linked = |i: usize| c.nodes[i].node.hub().linked_peers();
    assert!(eventually(|| linked(0).len() == 2 && linked(1).len() == 2).await, "a full mesh");
    certs::revoke_node(&c.dir, &revoked).unwrap();
    let cut = || !linked(0).contains(&revoked) && !linked(1).contains(&revoked);
    assert!(eventually(cut).await, "links to the revoked node close");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(cut(), "and its redials are refused");
    only_the_genuine_nodes_replicate(c, Duration::from_secs(1)).await;
}

/// A graceful shutdown (SIGTERM, a rolling restart) keeps the backbone up until the peers
/// acknowledged every message the node accepted: a subscriber in another region gets all of
/// them, though the publisher's node stopped right after its last ack with most of them
/// still waiting in its log (a small send window holds them back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_hands_the_peers_everything_it_accepted() {
    const N: usize = 20_000;
    let c = cluster(&["eu-west", "us-east"], |_, cfg| {
        cfg.timeouts.shutdown_grace = Duration::from_secs(20);
        cfg.backbone.as_mut().unwrap().send_window = 16;
        // The burst arrives at once when the node hands it over: on a busy machine the
        // test's reader may lag behind it, and this test is not about slow consumers
        // (a cut would end the channel, which keeps no history, with a discontinuity).
        cfg.limits.send_queue_messages = 2 * N;
    })
    .await;
    let mut nodes = c.nodes.into_iter();
    let (eu, us) = (nodes.next().unwrap(), nodes.next().unwrap());
    let reader = Client::connect(&us.url(), ClientOptions::default()).await.unwrap();
    let mut sub = reader.subscribe("chat:drain").await.unwrap();
    let publisher = Client::connect(&eu.url(), ClientOptions::default()).await.unwrap();
    // Pipelined: thousands of acks come back while the backbone is still sending.
    let acks = futures_util::future::join_all(
        (0..N).map(|i| publisher.publish("chat:drain", format!("{i}"))),
    )
    .await;
    assert!(acks.iter().all(Result::is_ok));
    let waiting = eu.node.hub().backbone_unacknowledged();
    eu.stop().await;
    // (Concurrent publishes leave in no set order: the test counts them.)
    let mut got = Vec::with_capacity(N);
    while got.len() < N {
        match tokio::time::timeout(WAIT, sub.next()).await.expect("every accepted message") {
            Some(Event::Message(m)) => got.push(text(&m.data).parse::<usize>().unwrap()),
            other => panic!("after {} messages: unexpected {other:?}", got.len()),
        }
    }
    got.sort_unstable();
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "each accepted message once");
    eprintln!("{waiting} messages were waiting for the peer at the shutdown");
    us.stop().await;
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// A publish retried on another region (the client failed over before its ack) is
/// delivered once everywhere: after it was replicated (the retry is acknowledged as a
/// duplicate), and when both copies race (each node delivers whichever came first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_retried_on_another_region_is_delivered_once() {
    let c = cluster(&["eu-west", "us-east"], |_, _| {}).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let on_a = Client::connect(&a.url(), ClientOptions::default()).await.unwrap();
    let on_b = Client::connect(&b.url(), ClientOptions::default()).await.unwrap();
    let mut sub_a = on_a.subscribe("chat:pay").await.unwrap();
    let mut sub_b = on_b.subscribe("chat:pay").await.unwrap();
    let first = on_a.publish_with("chat:pay", "", Some("order-1"), "paid").await.unwrap();
    assert!(!first.duplicate);
    assert_eq!(next_text(&mut sub_b).await, "paid", "replicated before the retry");
    let retry = on_b.publish_with("chat:pay", "", Some("order-1"), "paid").await.unwrap();
    assert!(retry.duplicate, "the other region knows the id");
    // Both copies at once.
    let (x, y) = tokio::join!(
        on_a.publish_with("chat:pay", "", Some("order-2"), "paid2"),
        on_b.publish_with("chat:pay", "", Some("order-2"), "paid2"),
    );
    x.unwrap();
    y.unwrap();
    on_a.publish("chat:pay", "end-a").await.unwrap();
    on_b.publish("chat:pay", "end-b").await.unwrap();
    // Per-origin order puts any second copy before the end markers of its origin.
    for (name, sub) in [("a", &mut sub_a), ("b", &mut sub_b)] {
        let mut got = Vec::new();
        while !(got.contains(&"end-a".to_owned()) && got.contains(&"end-b".to_owned())) {
            got.push(next_text(sub).await);
        }
        got.retain(|t| !t.starts_with("end"));
        let expect: &[&str] = if name == "a" { &["paid", "paid2"] } else { &["paid2"] };
        assert_eq!(got, expect, "subscriber on {name}");
    }
    for n in c.nodes {
        n.stop().await;
    }
    let _ = std::fs::remove_dir_all(&c.dir);
}

async fn next_text(sub: &mut tern_client::Subscription) -> String {
    match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
        Some(Event::Message(m)) => text(&m.data),
        other => panic!("unexpected {other:?}"),
    }
}

/// `DURABILITY_REPLICATED`: the ack comes once a node of another region has the message;
/// with no other region reachable the publisher gets `NOT_REPLICATED` (while a local-only
/// publish is acknowledged at once), and a node without a backbone refuses the level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_durability_waits_for_another_region() {
    use tern_client::{ClientError, Durability};
    use tern_proto::client::ErrorCode;
    let mut c = cluster(&["eu-west", "us-east"], |_, _| {}).await;
    // Longer than the node's 10 s replication wait, so the node's answer is what arrives.
    let patient = ClientOptions { request_timeout: Duration::from_secs(30), ..Default::default() };
    let on_a = Client::connect(&c.nodes[0].url(), patient).await.unwrap();
    let on_b = Client::connect(&c.nodes[1].url(), ClientOptions::default()).await.unwrap();
    let mut sub_b = on_b.subscribe("chat:safe").await.unwrap();
    let ack = on_a
        .publish_durable("chat:safe", "", None, "kept twice", Durability::Replicated)
        .await
        .unwrap();
    assert!(!ack.duplicate);
    assert_eq!(next_text(&mut sub_b).await, "kept twice");

    // The other region goes away.
    drop(sub_b);
    on_b.close().await;
    c.nodes.remove(1).stop().await;
    on_a.publish("chat:safe", "local only").await.unwrap();
    match on_a.publish_durable("chat:safe", "", None, "lonely", Durability::Replicated).await {
        Err(ClientError::Refused { code: ErrorCode::NotReplicated, .. }) => {}
        other => panic!("expected NOT_REPLICATED, got {other:?}"),
    }

    // A node without a backbone cannot offer it.
    let single = TestNode::start(|_| {}).await;
    let alone = Client::connect(&single.url(), ClientOptions::default()).await.unwrap();
    match alone.publish_durable("chat:x", "", None, "x", Durability::Replicated).await {
        Err(ClientError::Refused { code: ErrorCode::Unsupported, .. }) => {}
        other => panic!("expected UNSUPPORTED, got {other:?}"),
    }
    single.stop().await;
    for n in c.nodes {
        n.stop().await;
    }
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// Readiness after a start: a node whose peer is not up answers `/readyz` and `/v1/ping`
/// with 503 (the body lists the peer), so load balancers and SDKs choosing the nearest
/// region pass it by (the SDK ranks it last); once it caught up with the peer it is ready,
/// and it stays ready when the peer goes away again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_ready_once_it_caught_up_with_its_peers() {
    let dir = temp_dir("ready");
    certs::init_ca(&dir).unwrap();
    let ids: Vec<NodeId> = ["eu-west", "us-east"]
        .iter()
        .map(|r| NodeId::parse(&format!("{r}/edge-1")).unwrap())
        .collect();
    for id in &ids {
        certs::issue_node(&dir, id).unwrap();
    }
    let addrs = [free_udp_port(), free_udp_port()];
    let start = |i: usize| {
        let b = section(&dir, i, &ids, &addrs);
        let region = ids[i].region().to_owned();
        TestNode::start(move |cfg| {
            cfg.node.region = region;
            cfg.backbone = Some(tern_edge::config::BackboneSection {
                ready_wait: Duration::from_secs(600),
                ..b
            });
        })
    };
    let eu = start(0).await;
    let (status, body) = common::http(eu.addr, "GET", "/readyz", "text/plain", b"").await;
    assert_eq!(status, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false);
    assert_eq!(v["reason"], "catching up with peers");
    assert_eq!(v["peers"][0]["node"], "us-east/edge-1");
    assert_eq!(v["peers"][0]["linked"], false);
    let (status, _) = common::http(eu.addr, "GET", "/v1/ping", "text/plain", b"").await;
    assert_eq!(status, 503, "probes pass a node that is not ready by");
    let ranked = tern_client::nearest::rank(&[eu.url()], 2, Duration::from_secs(5)).await;
    assert_eq!(ranked[0].rtt, None, "the SDK ranks a node that is not ready last");
    let us = start(1).await;
    assert!(
        eventually(|| eu.node.readiness().ready && us.node.readiness().ready).await,
        "both ready once linked and caught up: {:?}",
        eu.node.readiness()
    );
    let (status, body) = common::http(eu.addr, "GET", "/readyz", "text/plain", b"").await;
    assert_eq!(status, 200, "{body}");
    let ranked = tern_client::nearest::rank(&[eu.url(), us.url()], 2, Duration::from_secs(5)).await;
    assert!(ranked.iter().all(|p| p.rtt.is_some()), "both answer probes now: {ranked:?}");
    us.stop().await;
    let (status, _) = common::http(eu.addr, "GET", "/readyz", "text/plain", b"").await;
    assert_eq!(status, 200, "a ready node stays ready when a peer goes away");
    eu.stop().await;
}

/// A publish naming (with `after`) a node this one cannot hear from waits at most
/// `limits.publish_order_wait`, then is refused with `UNAVAILABLE`; so is every later publish
/// of that channel until it is retried; and the answers come in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_ordered_after_an_unreachable_node_is_refused_in_order() {
    let dir = temp_dir("order");
    certs::init_ca(&dir).unwrap();
    let ids: Vec<NodeId> = ["eu-west", "us-east"]
        .iter()
        .map(|r| NodeId::parse(&format!("{r}/edge-1")).unwrap())
        .collect();
    for id in &ids {
        certs::issue_node(&dir, id).unwrap();
    }
    let addrs = [free_udp_port(), free_udp_port()];
    let b = section(&dir, 0, &ids, &addrs);
    // us-east never starts.
    let eu = TestNode::start(move |cfg| {
        cfg.node.region = "eu-west".into();
        cfg.backbone = Some(b);
        cfg.limits.publish_order_wait = Duration::from_millis(300);
    })
    .await;
    let (mut c, _) = common::RawJson::connected(eu.addr).await;
    let after = r#""after":{"origin":"us-east/edge-1","epoch":"5","seq":"9"}"#;
    c.send(&format!(
        r#"{{"publish":{{"requestId":1,"channel":"chat:o","id":"a",{after},"text":"1"}}}}"#
    ))
    .await;
    c.send(&format!(
        r#"{{"publish":{{"requestId":2,"channel":"chat:o","id":"b",{after},"text":"2"}}}}"#
    ))
    .await;
    c.send(r#"{"publish":{"requestId":3,"channel":"chat:other","id":"c","text":"3"}}"#).await;
    let mut answers = Vec::new();
    for _ in 0..3 {
        let f = c.recv().await;
        let (kind, body) = f.as_object().unwrap().iter().next().unwrap();
        answers.push((kind.clone(), body["requestId"].as_u64().unwrap(), body["code"].clone()));
    }
    let unavailable = serde_json::json!("ERROR_CODE_UNAVAILABLE");
    assert_eq!(
        answers,
        [
            ("nack".to_owned(), 1, unavailable.clone()),
            ("nack".to_owned(), 2, unavailable.clone()),
            ("ack".to_owned(), 3, serde_json::Value::Null),
        ],
        "refused after the wait, the channel's next one too, and answers in publish order"
    );
    // The channel stays refused to others until the first is retried (it waits again).
    c.send(r#"{"publish":{"requestId":4,"channel":"chat:o","id":"d","text":"4"}}"#).await;
    let f = c.recv().await;
    assert_eq!(f["nack"]["requestId"], 4, "{f}");
    assert_eq!(f["nack"]["code"], unavailable, "{f}");
    c.send(&format!(
        r#"{{"publish":{{"requestId":5,"channel":"chat:o","id":"a",{after},"text":"1"}}}}"#
    ))
    .await;
    let f = c.recv().await;
    assert_eq!(
        (f["nack"]["requestId"].as_u64(), &f["nack"]["code"]),
        (Some(5), &unavailable),
        "{f}"
    );
    // Over HTTP: 503 with Retry-After.
    let body = format!(r#"{{"id":"h",{after},"text":"over http"}}"#);
    let (status, text) = common::http(
        eu.addr,
        "POST",
        "/v1/channels/chat:h/messages",
        "application/json",
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("ERROR_CODE_UNAVAILABLE"), "{text}");
    eu.stop().await;
}

/// Every request gets its one answer while a subscription waits for a peer that does not
/// answer (the first subscriber of an interest-routed channel waits up to `interest_wait`
/// for the peers to confirm): a subscribe followed at once by an unsubscribe, a subscribe
/// sent twice, and a renewal whose token no longer allows the channel are each answered,
/// in order, and the connection gets nothing of the channel afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_answered_while_a_subscription_waits_for_its_peers() {
    use tern_edge::auth::{AuthMode, Claims, Operation, mint_hs256};
    const SECRET: &str = "waiting-for-peers-secret-0123456789abcdef";
    let dir = temp_dir("waiting");
    certs::init_ca(&dir).unwrap();
    let ids: Vec<NodeId> = ["eu-west", "us-east"]
        .iter()
        .map(|r| NodeId::parse(&format!("{r}/edge-1")).unwrap())
        .collect();
    for id in &ids {
        certs::issue_node(&dir, id).unwrap();
    }
    let addrs = [free_udp_port(), free_udp_port()];
    let mut b = section(&dir, 0, &ids, &addrs);
    // us-east never starts: subscriptions wait for it for the whole test.
    b.interest_wait = Duration::from_secs(120);
    b.ready_wait = Duration::from_millis(10);
    let eu = TestNode::start(move |cfg| {
        cfg.node.region = "eu-west".into();
        cfg.backbone = Some(b);
        cfg.auth.mode = AuthMode::Token;
        cfg.auth.hs256_secret = Some(SECRET.into());
    })
    .await;
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
        + 3600;
    let token = |pattern: &str| {
        let capability = [(pattern.to_owned(), vec![Operation::Subscribe, Operation::Publish])];
        mint_hs256(
            SECRET,
            &Claims { sub: "ann".into(), exp, iat: None, capability: capability.into() },
        )
        .unwrap()
    };
    let mut c = common::RawJson::open(eu.addr).await;
    c.send(&format!(r#"{{"connect":{{"protocol":1,"token":"{}"}}}}"#, token("chat:*"))).await;
    assert!(c.recv().await.get("connected").is_some());
    let mut exchange = async |frames: &[String], answers: usize| {
        for f in frames {
            c.send(f).await;
        }
        let mut got = Vec::new();
        for _ in 0..answers {
            let v = c.recv().await;
            let (kind, body) = v.as_object().unwrap().iter().next().unwrap();
            let resumed = if body["resumed"] == true { " resumed" } else { "" };
            got.push(format!("{kind} {} {}{resumed}", body["requestId"], body["channel"]));
        }
        // Nothing more: the next frame answers a heartbeat.
        c.send(r#"{"heartbeat":{"nonce":"1"}}"#).await;
        let v = c.recv().await;
        assert_eq!(v["heartbeat"]["nonce"], "1", "after {got:?} came {v}");
        got
    };
    let sub =
        |id: u32, ch: &str| format!(r#"{{"subscribe":{{"requestId":{id},"channel":"{ch}"}}}}"#);
    let unsub =
        |id: u32, ch: &str| format!(r#"{{"unsubscribe":{{"requestId":{id},"channel":"{ch}"}}}}"#);

    let got = exchange(&[sub(1, "chat:a"), unsub(2, "chat:a")], 2).await;
    assert_eq!(got, [r#"subscribed 1 "chat:a""#, r#"unsubscribed 2 "chat:a""#]);
    let got = exchange(&[sub(3, "chat:b"), sub(4, "chat:b"), unsub(5, "chat:b")], 3).await;
    assert_eq!(
        got,
        [r#"subscribed 3 "chat:b""#, r#"subscribed 4 "chat:b""#, r#"unsubscribed 5 "chat:b""#]
    );
    // A resumed subscription that waits is answered as one (after the discontinuity a
    // channel without history reports for what the client may have missed).
    let resume = r#"{"subscribe":{"requestId":8,"channel":"chat:r","resume":{"node":"us-east/edge-1","origins":[{"origin":"us-east/edge-1","epoch":"1","seq":"3"}]}}}"#;
    let got = exchange(&[resume.to_owned(), unsub(9, "chat:r")], 3).await;
    assert_eq!(
        got,
        [
            r#"discontinuity null "chat:r""#,
            r#"subscribed 8 "chat:r" resumed"#,
            r#"unsubscribed 9 "chat:r""#
        ]
    );
    // A renewal that no longer allows a waiting subscription: renewed, the subscription
    // answered, then ended with FORBIDDEN.
    let renew = format!(r#"{{"auth":{{"requestId":7,"token":"{}"}}}}"#, token("news:*"));
    let got = exchange(&[sub(6, "chat:c"), renew], 3).await;
    assert_eq!(
        got,
        [r#"authRenewed 7 null"#, r#"subscribed 6 "chat:c""#, r#"error null "chat:c""#],
        "renewal answered, then the waiting subscribe, then its end"
    );
    // None of those channels reaches the connection any more.
    let mut p = common::RawJson::open(eu.addr).await;
    p.send(&format!(r#"{{"connect":{{"protocol":1,"token":"{}"}}}}"#, token("chat:*"))).await;
    assert!(p.recv().await.get("connected").is_some());
    for (i, ch) in ["chat:a", "chat:b", "chat:c"].iter().enumerate() {
        p.send(&format!(r#"{{"publish":{{"requestId":{i},"channel":"{ch}","text":"late"}}}}"#))
            .await;
        assert!(p.recv().await.get("ack").is_some());
    }
    let got = exchange(&[], 0).await;
    assert!(got.is_empty());
    eu.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Presence over real QUIC links, driven by clients: members entered on each node appear on
/// the other with their node (a watcher's snapshot, then events, add up to the same set),
/// leaves follow, and when a node stops, its members leave on the other after
/// `presence.down_after`, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_members_replicate_and_leave_with_their_node() {
    use common::transport::{Raw, Transport};
    use serde_json::{Value, json};
    let c = cluster(&["eu-west", "us-east"], |_, cfg| {
        cfg.presence.down_after = Duration::from_secs(1);
    })
    .await;
    let mut nodes = c.nodes.into_iter();
    let (eu, us) = (nodes.next().unwrap(), nodes.next().unwrap());
    let open = |addr, id: String| async move {
        let mut c = Raw::open(addr, Transport::WebSocket, false).await;
        c.send(&json!({"connect": {"protocol": 1, "clientId": id}}).to_string()).await;
        assert!(c.recv().await.get("connected").is_some());
        c
    };
    let enter = |i: usize, action: &'static str| {
        json!({"presence": {"requestId": i, "channel": "room:lobby", "action": action,
                            "text": format!("{{\"n\":{i}}}")}})
        .to_string()
    };
    // A watcher on us-east from the start, and one that joins once everyone entered.
    let mut early = open(us.addr, "early".into()).await;
    early.send(r#"{"subscribe":{"requestId":1,"channel":"room:lobby","presence":true}}"#).await;
    // 20 members on eu-west, 5 on us-east; 10 of eu-west's leave again.
    let mut members = Vec::new();
    for i in 0..25 {
        let addr = if i < 20 { eu.addr } else { us.addr };
        let mut m = open(addr, format!("user-{i}")).await;
        m.send(&enter(i, "PRESENCE_ACTION_ENTER")).await;
        assert!(m.recv().await.get("presenceReply").is_some());
        members.push(m);
    }
    for (i, m) in members.iter_mut().enumerate().take(10) {
        m.send(&enter(i, "PRESENCE_ACTION_LEAVE")).await;
        assert!(m.recv().await.get("presenceReply").is_some());
    }
    // What the early watcher saw adds up to the 15 members left, each with its node.
    let mut set: HashMap<String, String> = HashMap::new();
    let apply = |set: &mut HashMap<String, String>, f: &Value| {
        if let Some(r) = f.get("presenceReply") {
            for m in r["members"].as_array().into_iter().flatten() {
                set.insert(
                    m["clientId"].as_str().unwrap().into(),
                    m["node"].as_str().unwrap().into(),
                );
            }
        }
        if let Some(e) = f.get("presence") {
            for ev in e["events"].as_array().unwrap() {
                let id = ev["member"]["clientId"].as_str().unwrap().to_owned();
                match ev["action"].as_str().unwrap() {
                    "PRESENCE_ACTION_LEAVE" => {
                        assert!(set.remove(&id).is_some(), "{id} left twice")
                    }
                    "PRESENCE_ACTION_ENTER" => {
                        let node = ev["member"]["node"].as_str().unwrap().to_owned();
                        assert!(set.insert(id.clone(), node).is_none(), "{id} entered twice");
                    }
                    other => panic!("unexpected {other}"),
                }
            }
        }
    };
    let expected = |set: &HashMap<String, String>| {
        set.len() == 15
            && (10..25).all(|i| {
                let node = if i < 20 { "eu-west/edge-1" } else { "us-east/edge-1" };
                set.get(&format!("user-{i}")).map(String::as_str) == Some(node)
            })
    };
    while !expected(&set) {
        let f = early.recv().await;
        apply(&mut set, &f);
    }
    // A late watcher on eu-west gets the same set as its snapshot.
    let mut late = open(eu.addr, "late".into()).await;
    let mut snapshot = HashMap::new();
    late.send(r#"{"subscribe":{"requestId":2,"channel":"room:lobby","presence":true}}"#).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !expected(&snapshot) && tokio::time::Instant::now() < deadline {
        let f = late.recv().await;
        apply(&mut snapshot, &f);
    }
    assert!(expected(&snapshot), "{snapshot:?}");
    // eu-west stops: its 10 members leave on us-east, once each; us-east's stay.
    drop(members);
    eu.stop().await;
    while set.len() > 5 {
        let f = early.recv().await;
        apply(&mut set, &f);
    }
    assert!((20..25).all(|i| set.contains_key(&format!("user-{i}"))), "{set:?}");
    us.stop().await;
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// 100,000 members in one channel: entered on one node (through the presence hub, as
/// sessions do), they reach the other over real QUIC (digest, states and deltas split into
/// frames well under the backbone's limit), and a watcher there gets all of them as a
/// snapshot in pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_of_100k_members_replicates_and_snapshots() {
    use common::transport::{Raw, Transport};
    use tern_backbone::core::MemberKey;
    use tern_proto::types::ChannelName;
    const N: usize = 100_000;
    let c = cluster(&["eu-west", "us-east"], |_, _| {}).await;
    let mut nodes = c.nodes.into_iter();
    let (eu, us) = (nodes.next().unwrap(), nodes.next().unwrap());
    let room = ChannelName::parse("room:stadium").unwrap();
    let hub = eu.node.presence().clone();
    for i in 0..N {
        let key = MemberKey { client_id: format!("fan-{i:06}"), connection_id: i.to_string() };
        let data = bytes::Bytes::from(format!("\u{1}{{\"seat\":{i}}}"));
        hub.put(eu.node.hub().backbone(), &room, key, data, usize::MAX).unwrap();
    }
    let count = || us.node.presence().counts(us.node.hub().backbone()).get(&room).copied();
    assert!(eventually(|| count() == Some(N)).await, "us-east holds {:?}", count());
    let mut w = Raw::open(us.addr, Transport::WebSocket, true).await;
    w.send(r#"{"connect":{"protocol":1}}"#).await;
    assert!(w.recv().await.get("connected").is_some());
    w.send(r#"{"subscribe":{"requestId":1,"channel":"room:stadium","presence":true}}"#).await;
    let (mut members, mut pages) = (std::collections::HashSet::new(), 0);
    loop {
        let f = w.recv().await;
        let Some(r) = f.get("presenceReply") else { continue };
        pages += 1;
        for m in r["members"].as_array().unwrap() {
            assert_eq!(m["node"], "eu-west/edge-1");
            members.insert(m["clientId"].as_str().unwrap().to_owned());
        }
        if r["next"].as_str().unwrap_or_default().is_empty() {
            break;
        }
    }
    assert_eq!(members.len(), N);
    assert!(pages >= N / 1000, "{pages} pages");
    eu.stop().await;
    us.stop().await;
    let _ = std::fs::remove_dir_all(&c.dir);
}
