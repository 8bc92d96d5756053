//! Transport fallback: behind proxies that refuse WebSocket upgrades (and one that also holds
//! streamed answers), the Rust SDK opens HTTP streaming or long-polling sessions instead and
//! keeps its guarantees: a chat between two regions of real `tern edge` processes, with the
//! proxies resetting the clients' connections mid-chat, ends with every message once, in
//! order, on both sides.

use crate::common;

use common::ProcessCluster;
use common::proxy::{Gate, Proxy};

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::text;
use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use tern_client::{Client, ClientError, ClientOptions, Event, Format, ReconnectPolicy, Transport};

const WAIT: Duration = Duration::from_secs(60);
/// Messages each side sends.
const EACH: usize = 1_000;

fn options(transport: Transport, format: Format) -> ClientOptions {
    ClientOptions {
        transport,
        format,
        reconnect: ReconnectPolicy {
            enabled: true,
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    }
}

/// Sends `who:0…` with ids `who-k`, each retried until acknowledged.
async fn chat(c: Client, who: &'static str) -> Client {
    let mut rng = rand::rngs::StdRng::seed_from_u64(who.len() as u64);
    for k in 0..EACH {
        let id = format!("{who}-{k}");
        let deadline = tokio::time::Instant::now() + WAIT;
        while c.publish_with("chat:room", "", Some(&id), format!("{who}:{k}")).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "{id} never acknowledged");
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
    }
    c
}

/// Reads until both senders' messages are in; per sender, the numbers in arrival order.
async fn read(mut sub: tern_client::Subscription, me: &str) -> BTreeMap<String, Vec<usize>> {
    let mut per: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    while per.values().map(Vec::len).sum::<usize>() < 2 * EACH {
        match tokio::time::timeout(WAIT, sub.next()).await {
            Ok(Some(Event::Message(m))) => {
                let t = text(&m);
                let (who, k) = t.split_once(':').unwrap();
                per.entry(who.to_owned()).or_default().push(k.parse().unwrap());
            }
            Ok(Some(Event::Discontinuity { reason })) => panic!("{me}: discontinuity: {reason}"),
            Ok(None) => panic!("{me}: the subscription ended"),
            Err(_) => {
                panic!("{me}: stalled with {:?}", per.values().map(Vec::len).collect::<Vec<_>>())
            }
        }
    }
    per
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_between_two_regions_behind_proxies_that_refuse_websockets() {
    let dir = std::env::temp_dir().join(format!("tern-fallback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = ProcessCluster::write(&dir, |r| {
        format!(
            "[history]\ndata_dir = \"{}/{r}-data\"\n\
             [[history.namespaces]]\nname = \"chat\"\nmax_messages = 100000\n",
            dir.display()
        )
    });
    let mut nodes = Vec::new();
    for i in 0..2 {
        nodes.push(cluster.start(i, WAIT).await);
    }
    for i in 0..2 {
        common::ready(&cluster.http(i), WAIT).await;
    }
    let (eu, us) = (cluster.client[0], cluster.client[1]);

    // A client pinned to the WebSocket is refused, with the proxy's answer in the error.
    let refusing = Proxy::start(vec![eu], 1, Gate::NoWebSocket).await;
    let pinned = options(Transport::WebSocket, Format::Protobuf);
    match Client::connect(&refusing.url(), pinned).await {
        Err(ClientError::Connect(e)) => assert!(e.to_string().contains("403"), "{e}"),
        other => panic!("a pinned WebSocket behind the proxy: {other:?}"),
    }

    // Alice (eu-west, protobuf) falls back to HTTP streaming; Bob (us-east, JSON), whose
    // proxy also holds streamed answers until they end (the stream stalls), to long polling.
    let alice_proxy = Proxy::start(vec![eu], 2, Gate::NoWebSocket).await;
    let bob_proxy = Proxy::start(vec![us], 3, Gate::PollOnly).await;
    let alice = Client::connect(&alice_proxy.url(), options(Transport::Auto, Format::Protobuf))
        .await
        .unwrap();
    let bob =
        Client::connect(&bob_proxy.url(), options(Transport::Auto, Format::Json)).await.unwrap();
    assert_eq!(alice.transport(), Some(Transport::Stream));
    assert_eq!(bob.transport(), Some(Transport::Poll));
    // A client pinned to HTTP streaming needs no proxy to use it.
    let carol =
        Client::connect(&cluster.url(0), options(Transport::Stream, Format::Json)).await.unwrap();
    assert_eq!(carol.transport(), Some(Transport::Stream));

    // The backbone link between the two regions is up once a probe crosses it.
    let mut probe = bob.subscribe("probe:link").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "the backbone link never came up");
        alice.publish("probe:link", "?").await.unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), probe.next()).await {
            break;
        }
    }

    let alice_sub = alice.subscribe("chat:room").await.unwrap();
    let bob_sub = bob.subscribe("chat:room").await.unwrap();
    let carol_sub = carol.subscribe("chat:room").await.unwrap();
    let readers = [
        tokio::spawn(read(alice_sub, "alice")),
        tokio::spawn(read(bob_sub, "bob")),
        tokio::spawn(read(carol_sub, "carol")),
    ];
    let senders = [tokio::spawn(chat(alice, "alice")), tokio::spawn(chat(bob, "bob"))];
    // Mid-chat, the proxies reset every connection of the sessions now and then: the
    // clients open new sessions (HTTP again: the fallback is kept) and resume.
    let mut cuts = 0;
    while !senders.iter().all(|s| s.is_finished()) && cuts < 100 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if cuts % 2 == 0 {
            alice_proxy.cut()
        } else {
            bob_proxy.cut()
        }
        cuts += 1;
    }
    let mut clients = Vec::new();
    for s in senders {
        clients.push(s.await.unwrap());
    }
    let all: Vec<usize> = (0..EACH).collect();
    for (r, me) in readers.into_iter().zip(["alice", "bob", "carol"]) {
        let per = r.await.unwrap();
        for who in ["alice", "bob"] {
            assert_eq!(per.get(who), Some(&all), "{me} got {who}'s messages once, in order");
        }
        assert_eq!(per.len(), 2, "{me}: nothing else");
    }
    assert_eq!(clients[0].transport(), Some(Transport::Stream), "alice stays on streaming");
    assert_eq!(clients[1].transport(), Some(Transport::Poll), "bob stays on long polling");
    let (alice_conns, _, alice_refused) = alice_proxy.counts();
    let (bob_conns, _, bob_refused) = bob_proxy.counts();
    assert!(cuts > 2 && alice_conns > 2 && bob_conns > 2, "sessions were cut and reopened");
    // The fallback is kept: the WebSocket (and for Bob the stream) was tried once.
    assert_eq!((alice_refused, bob_refused), (1, 2));
    println!(
        "fallback chat: {EACH} messages each way, 0 lost, 0 duplicated, 0 reordered; \
         {cuts} cuts; alice {alice_conns} connections, bob {bob_conns}"
    );
    for c in &clients {
        c.close().await;
    }
    carol.close().await;
    for mut n in nodes {
        let _ = n.kill().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
