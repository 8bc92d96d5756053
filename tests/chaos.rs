//! Chaos: three real `tern edge` processes (regions) with durable history, publishers on
//! every node, subscribers whose connections are reset (RST, no close frame) at random
//! moments and come back — to the same node or to another region — and one node SIGKILLed
//! and restarted mid-run. Every subscriber must end with every message of every publisher
//! exactly once, in publisher order; one more subscriber is held away while its channel's
//! log is forced past retention and must be told so with a discontinuity.
//!
//! Each subscriber reaches the cluster through its own TCP proxy, which picks the node for
//! every new connection (same one or another region, at random) and cuts connections with
//! a reset. `TERN_CHAOS_SEED=N` replays a run's choices (timing still varies).

mod common;

use common::{ProcessCluster, REGIONS};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tern_client::{Client, ClientOptions, Event, ReconnectPolicy};
use tern_proto::client::message::Data;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

const WAIT: Duration = Duration::from_secs(90);
/// Messages per publisher.
const EACH: usize = 1_000;
/// Subscribers per node.
const SUBS_PER_NODE: usize = 2;
/// Messages published while the retention subscriber is away (its namespace keeps 20).
const FORCED: usize = 150;

/// Makes dropping `s` send a TCP reset. (A zero linger never blocks, which is why tokio's
/// deprecation of `set_linger` does not apply here.)
#[allow(deprecated)]
fn reset_on_close(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

/// A TCP proxy in front of the cluster for one subscriber.
struct Proxy {
    addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
}

struct ProxyState {
    rng: StdRng,
    targets: Vec<SocketAddr>,
    last: Option<usize>,
    /// Pipes of the open connections.
    open: Vec<AbortHandle>,
    connections: usize,
    failovers: usize,
    /// While set, new connections are refused (the client stays away).
    hold: bool,
}

impl Proxy {
    async fn start(targets: Vec<SocketAddr>, seed: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ProxyState {
            rng: StdRng::seed_from_u64(seed),
            targets,
            last: None,
            open: Vec::new(),
            connections: 0,
            failovers: 0,
            hold: false,
        }));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                // Every close is a reset: no FIN, no close frame.
                reset_on_close(&client);
                let order = {
                    let mut s = st.lock().unwrap();
                    if s.hold {
                        continue; // dropped: reset
                    }
                    let n = s.targets.len();
                    let stay = s.rng.random_bool(0.5);
                    let first = match s.last {
                        Some(l) if stay => l,
                        _ => s.rng.random_range(0..n),
                    };
                    (0..n).map(|k| (first + k) % n).collect::<Vec<_>>()
                };
                let st = st.clone();
                tokio::spawn(async move {
                    for i in order {
                        let target = st.lock().unwrap().targets[i];
                        let Ok(upstream) = TcpStream::connect(target).await else { continue };
                        reset_on_close(&upstream);
                        let pipe = tokio::spawn(async move {
                            let (mut a, mut b) = (client, upstream);
                            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                        });
                        let mut s = st.lock().unwrap();
                        s.connections += 1;
                        if s.last.is_some_and(|l| l != i) {
                            s.failovers += 1;
                        }
                        s.last = Some(i);
                        s.open.push(pipe.abort_handle());
                        return;
                    }
                });
            }
        });
        Self { addr, state }
    }

    /// Resets every open connection.
    fn cut(&self) {
        for p in self.state.lock().unwrap().open.drain(..) {
            p.abort();
        }
    }

    fn hold(&self, on: bool) {
        self.state.lock().unwrap().hold = on;
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

fn text(m: &tern_client::Message) -> String {
    match &m.data {
        Some(Data::Text(t)) => t.clone(),
        other => panic!("expected text, got {other:?}"),
    }
}

fn fast_reconnect() -> ClientOptions {
    ClientOptions {
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

/// What one subscriber saw: per publisher, the message numbers in arrival order.
#[derive(Debug, Default)]
struct Seen {
    per: BTreeMap<String, Vec<usize>>,
    discontinuities: usize,
    /// (text, id, origin, epoch, seq) of every message, for diagnosing a failure.
    log: Vec<(String, String, String, u64, u64)>,
}

fn record(seen: &mut Seen, ev: Event) {
    match ev {
        Event::Message(m) => {
            let t = text(&m);
            seen.log.push((
                t.clone(),
                m.id.clone(),
                m.origin.clone(),
                m.origin_epoch,
                m.origin_seq,
            ));
            let (who, k) = t.split_once(':').unwrap();
            seen.per.entry(who.to_owned()).or_default().push(k.parse().unwrap());
        }
        Event::Discontinuity { .. } => seen.discontinuities += 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_reset_and_failed_over_get_every_message_exactly_once() {
    let seed = std::env::var("TERN_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("chaos seed {seed} (TERN_CHAOS_SEED={seed} replays the choices)");
    let mut rng = StdRng::seed_from_u64(seed);

    let dir = std::env::temp_dir().join(format!("tern-chaos-{}-{seed}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = ProcessCluster::write(&dir, |r| {
        format!(
            "[history]\ndata_dir = \"{}/{r}-data\"\n\
             [[history.namespaces]]\nname = \"chaos\"\nmax_messages = 100000\n\
             [[history.namespaces]]\nname = \"tiny\"\nmax_messages = 20\n",
            dir.display()
        )
    });
    let client = cluster.client.clone();
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(cluster.start(i, WAIT).await);
    }
    let url = |i: usize| cluster.url(i);

    // Subscribers: each behind its own cutting proxy, subscribed before anything is
    // published, so "everything published during its subscription" is everything.
    let mut proxies = Vec::new();
    let mut subs = Vec::new();
    for i in 0..3 * SUBS_PER_NODE {
        let home = i % 3;
        let mut targets = client.clone();
        targets.rotate_left(home);
        let proxy = Proxy::start(targets, rng.random()).await;
        let c = Client::connect(&proxy.url(), fast_reconnect()).await.unwrap();
        let sub = c.subscribe("chaos:room").await.unwrap();
        proxies.push(proxy);
        subs.push((c, sub));
    }
    // The retention subscriber.
    let tiny_proxy = Proxy::start(client.clone(), rng.random()).await;
    let tiny_client = Client::connect(&tiny_proxy.url(), fast_reconnect()).await.unwrap();
    let mut tiny_sub = tiny_client.subscribe("tiny:room").await.unwrap();

    // Publishers, one per node, each retrying with the same id until acknowledged. They
    // stay with their node (the one on the killed node waits for its restart): acknowledged
    // messages still only in a dead node's log cannot reach anyone before it returns, so a
    // publisher that moved on to another region could be overtaken by itself.
    let mut pubs = Vec::new();
    for i in 0..3 {
        let home = url(i);
        let pause = rng.random_range(1..4u64);
        pubs.push(tokio::spawn(async move {
            let c = Client::connect(&home, fast_reconnect()).await.unwrap();
            for k in 0..EACH {
                let id = format!("p{i}-{k}");
                let body = format!("P{i}:{k}");
                let deadline = tokio::time::Instant::now() + WAIT;
                while c.publish_with("chaos:room", "", Some(&id), body.as_str()).await.is_err() {
                    assert!(tokio::time::Instant::now() < deadline, "publish {id} never acked");
                }
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }));
    }

    // Readers: collect until every publisher's messages are in.
    let mut readers = Vec::new();
    for (i, (c, mut sub)) in subs.into_iter().enumerate() {
        readers.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            let done =
                |s: &Seen| (0..3).all(|p| s.per.get(&format!("P{p}")).map_or(0, Vec::len) >= EACH);
            while !done(&seen) {
                match tokio::time::timeout(WAIT, sub.next()).await {
                    Ok(Some(ev)) => record(&mut seen, ev),
                    Ok(None) => panic!("subscriber {i}: stream ended"),
                    Err(_) => panic!("subscriber {i}: stalled with {:?}", summary(&seen)),
                }
            }
            drop(c);
            seen
        }));
    }

    // Chaos: cut subscribers at random moments; kill one node mid-run and restart it.
    let victim = rng.random_range(0..3usize);
    let kill_after = Duration::from_millis(rng.random_range(500..2000));
    let started = tokio::time::Instant::now();
    let mut killed = false;
    let mut cuts = 0usize;
    while !pubs.iter().all(|p| p.is_finished()) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..120))).await;
        let p = rng.random_range(0..proxies.len());
        proxies[p].cut();
        cuts += 1;
        if !killed && started.elapsed() >= kill_after {
            killed = true;
            nodes[victim].kill().await.unwrap(); // SIGKILL
            tokio::time::sleep(Duration::from_millis(300)).await;
            nodes[victim] = cluster.start(victim, WAIT).await;
        }
    }
    for p in pubs {
        p.await.unwrap();
    }
    assert!(killed, "the run was long enough to kill a node");

    // Retention: the tiny subscriber stays away while its log is forced past 20 messages.
    let publisher = Client::connect(&url(0), fast_reconnect()).await.unwrap();
    publisher.publish("tiny:room", "T:0").await.unwrap();
    let mut tiny = Seen::default();
    record(&mut tiny, tokio::time::timeout(WAIT, tiny_sub.next()).await.unwrap().unwrap());
    tiny_proxy.hold(true);
    tiny_proxy.cut();
    for k in 1..=FORCED {
        publisher.publish("tiny:room", format!("T:{k}")).await.unwrap();
    }
    // Retention trims once a second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    tiny_proxy.hold(false);
    while tiny.per.get("T").and_then(|v| v.last()) != Some(&FORCED) {
        match tokio::time::timeout(WAIT, tiny_sub.next()).await {
            Ok(Some(ev)) => record(&mut tiny, ev),
            other => panic!("retention subscriber: {other:?} with {:?}", summary(&tiny)),
        }
    }

    let mut delivered = 0;
    let mut discontinuities = 0;
    for (i, r) in readers.into_iter().enumerate() {
        let seen = r.await.unwrap();
        for p in 0..3 {
            let got = &seen.per[&format!("P{p}")];
            if got != &(0..EACH).collect::<Vec<_>>() {
                let mut counts = BTreeMap::new();
                for e in &seen.log {
                    *counts.entry(e.0.clone()).or_insert(0) += 1;
                }
                for (at, e) in seen.log.iter().enumerate().filter(|(_, e)| counts[&e.0] > 1) {
                    println!("subscriber {i} repeated, as message {at}: {e:?}");
                }
            }
            assert_eq!(
                got,
                &(0..EACH).collect::<Vec<_>>(),
                "subscriber {i}, publisher {p}: every message once, in order (seed {seed})"
            );
            delivered += got.len();
        }
        discontinuities += seen.discontinuities;
        assert_eq!(seen.discontinuities, 0, "subscriber {i}: nothing was past retention");
    }
    let (mut resumed, mut failed_over) = (0, 0);
    for p in &proxies {
        let s = p.state.lock().unwrap();
        resumed += s.connections.saturating_sub(1);
        failed_over += s.failovers;
    }
    let t = &tiny.per["T"];
    assert!(tiny.discontinuities >= 1, "the forced gap is announced: {:?}", summary(&tiny));
    assert!(t.windows(2).all(|w| w[0] < w[1]), "in order, once: {t:?}");
    assert!(t.len() < FORCED, "the log kept only its retention: {}", t.len());
    println!(
        "chaos seed {seed}: {delivered} delivered to {} subscribers, {cuts} cuts, {resumed} \
         resumes ({failed_over} on another region), node {} killed and restarted, \
         {discontinuities} unexpected discontinuities; retention subscriber: {} \
         discontinuity, {} of {} messages replayable",
        proxies.len(),
        REGIONS[victim],
        tiny.discontinuities,
        t.len() - 1,
        FORCED
    );
    assert!(resumed > 0 && failed_over > 0, "the run resumed on the same and on other nodes");
    for mut n in nodes {
        let _ = n.kill().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn summary(s: &Seen) -> Vec<(String, usize, Option<usize>)> {
    s.per
        .iter()
        .map(|(k, v)| (k.clone(), v.len(), v.last().copied()))
        .collect::<Vec<_>>()
        .into_iter()
        .chain(std::iter::once(("discontinuities".into(), s.discontinuities, None)))
        .collect()
}
