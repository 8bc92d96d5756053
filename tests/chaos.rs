//! Chaos: three real `tern edge` processes (regions) with durable history; publishers and
//! subscribers whose connections are reset (RST, no close frame) at random moments and come
//! back — to the same node or to another region — one node SIGKILLed and another SIGTERMed
//! (a rolling restart) mid-run, each restarted, and clients that resume on a node that is
//! still catching up. Beside the SDK's clients, plain protocol-level clients written from
//! docs/protocol.md (`common::plain`: raw JSON frames, positions kept as documented, nothing
//! dropped on their side) publish and subscribe. Every subscriber must end with every message
//! of every publisher exactly once, in publisher order, and every node's log must hold each
//! message exactly once, in publisher order; one more subscriber is held away while its
//! channel's log is forced past retention and must be told so with a discontinuity.
//!
//! Each client reaches the cluster through its own TCP proxy, which cuts connections with a
//! reset and picks the node after each cut (same one or another region, at random). A
//! second run puts the SDK's clients behind proxies that refuse WebSocket upgrades: they
//! carry on over HTTP streaming and long polling.
//! `TERN_CHAOS_SEED=N` replays a run's choices (timing still varies).

use crate::common;

use common::plain::{Plain, PlainError, PlainState, log_of};
use common::proxy::{Gate, Proxy};
use common::{ProcessCluster, REGIONS, sigterm};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::text;
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tern_client::{Client, ClientOptions, Event, ReconnectPolicy, Transport};

const WAIT: Duration = Duration::from_secs(90);
/// Messages per publisher.
const EACH: usize = 1_000;
/// SDK subscribers.
const SDK_SUBS: usize = 3;
/// Plain protocol-level subscribers.
const PLAIN_SUBS: usize = 4;
/// Messages published while the retention subscriber is away (its namespace keeps 20).
const FORCED: usize = 150;

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

/// Publisher `p`'s numbers in the order `got` holds them.
fn of(got: &[(String, usize)], p: &str) -> Vec<usize> {
    got.iter().filter(|(who, _)| who == p).map(|(_, k)| *k).collect()
}

/// The entries of `p`'s messages that break "each once, in order", with what the caller
/// knows of them (`info`), for the failure message.
fn anomalies<'a>(texts: impl Iterator<Item = (&'a str, String)>, p: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut next = 0usize;
    let mut first: std::collections::HashMap<&str, (usize, String)> = Default::default();
    for (at, (text, info)) in texts.enumerate() {
        let (who, k) = parse(text);
        if who != p {
            continue;
        }
        if k != next {
            let before = first
                .get(text)
                .map_or("never before".into(), |(i, f)| format!("first at {i}: {f}"));
            out.push(format!("at {at}: {text} (expected {p}:{next}) {info}; {before}"));
        }
        first.entry(text).or_insert((at, info));
        next = next.max(k + 1);
    }
    out.truncate(20);
    out
}

fn parse(text: &str) -> (String, usize) {
    let (who, k) = text.split_once(':').expect("P<n>:<k>");
    (who.to_owned(), k.parse().expect("number"))
}

/// A plain subscriber: reconnects through its proxy after every cut, resumes as the docs
/// say, and records everything it is given until it holds `want` messages.
async fn plain_subscriber(url: String, channel: &'static str, want: usize) -> PlainState {
    let mut st = PlainState::default();
    let deadline = tokio::time::Instant::now() + WAIT;
    'connect: loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "plain subscriber stalled at {}",
            st.got.len()
        );
        let Ok(mut c) = Plain::connect(&url).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        match c.subscribe(&mut st, channel).await {
            Ok(f) if f.get("subscribed").is_some() => {}
            Ok(f) => panic!("plain subscriber refused: {f}"),
            Err(_) => continue 'connect,
        }
        while st.got.len() < want {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match c.frame(&mut st, left).await {
                Ok(_) => {}
                Err(PlainError::Timeout) => panic!(
                    "plain subscriber stalled at {} of {want}: last {:?}",
                    st.got.len(),
                    st.got.last()
                ),
                Err(PlainError::Closed(_)) => continue 'connect,
            }
        }
        return st;
    }
}

/// A plain publisher: publishes `P<i>:0…` with ids `p<i>-k` through its proxy; after a cut
/// it reconnects (maybe to another region) and sends the same publish again, with `after`
/// as the docs say, until it is acknowledged.
async fn plain_publisher(url: String, i: usize, pause: u64, acked: Arc<AtomicUsize>) {
    let mut st = PlainState::default();
    let mut conn: Option<Plain> = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    for k in 0..EACH {
        let (id, body) = (format!("p{i}-{k}"), format!("P{i}:{k}"));
        loop {
            assert!(tokio::time::Instant::now() < deadline, "publish {id} never acked");
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match Plain::connect(&url).await {
                    Ok(c) => conn.insert(c),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            match c.publish(&mut st, "chaos:room", &id, &body).await {
                Ok(f) if f.get("ack").is_some() => {
                    acked.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(f) => {
                    let wait = f["nack"]["retryAfterMs"].as_u64().unwrap_or(100);
                    assert!(
                        ["ERROR_CODE_UNAVAILABLE", "ERROR_CODE_RATE_LIMITED"]
                            .contains(&f["nack"]["code"].as_str().unwrap_or("")),
                        "{id}: {f}"
                    );
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Err(_) => conn = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// The runs go one at a time: each starts three nodes.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_reset_and_failed_over_get_every_message_exactly_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    run(Gate::Open).await;
}

/// The same run with every SDK client behind a proxy that refuses WebSocket upgrades: they
/// fall back to HTTP streaming, and the two whose proxies also hold streamed answers to long
/// polling. The plain clients keep their WebSockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_proxies_that_refuse_websockets_sdk_clients_fall_back_and_lose_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    run(Gate::NoWebSocket).await;
}

/// One chaos run; `gate` is what the SDK clients' proxies let through (one subscriber's and
/// one publisher's only long polling when it is not [`Gate::Open`]).
async fn run(gate: Gate) {
    let sdk_gate = |i: usize| match gate {
        Gate::Open => Gate::Open,
        _ if i == 0 => Gate::PollOnly,
        other => other,
    };
    let seed = std::env::var("TERN_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!(
        "chaos seed {seed} (TERN_CHAOS_SEED={seed} replays the choices), SDK clients' proxies {gate:?}"
    );
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
    for i in 0..3 {
        common::ready(&cluster.http(i), WAIT).await;
    }
    let proxy_to = |home: usize| {
        let mut targets = client.clone();
        targets.rotate_left(home);
        targets
    };

    // Subscribers: each behind its own cutting proxy, subscribed before anything is
    // published, so "everything published during its subscription" is everything. SDK
    // subscribers, and plain ones (the contract is the node's).
    let mut proxies = Vec::new();
    let mut subs = Vec::new();
    let mut gated = Vec::new();
    for i in 0..SDK_SUBS {
        let proxy = Proxy::start(proxy_to(i % 3), rng.random(), sdk_gate(i)).await;
        gated.push(proxies.len());
        let c = Client::connect(&proxy.url(), fast_reconnect()).await.unwrap();
        let sub = c.subscribe("chaos:room").await.unwrap();
        proxies.push(proxy);
        subs.push((c, sub));
    }
    let mut plain_subs = Vec::new();
    for i in 0..PLAIN_SUBS {
        let proxy = Proxy::start(proxy_to(i % 3), rng.random(), Gate::Open).await;
        let url = proxy.url();
        proxies.push(proxy);
        // Subscribed before anything is published (its first subscribe answers at once).
        let mut st = PlainState::default();
        let mut c = Plain::connect(&url).await.unwrap();
        c.subscribe(&mut st, "chaos:room").await.unwrap();
        drop(c);
        plain_subs.push(tokio::spawn(async move {
            let mut more = plain_subscriber(url, "chaos:room", 3 * EACH).await;
            more.got.splice(0..0, st.got);
            more
        }));
    }
    // The retention subscriber.
    let tiny_proxy = Proxy::start(client.clone(), rng.random(), sdk_gate(1)).await;
    let tiny_client = Client::connect(&tiny_proxy.url(), fast_reconnect()).await.unwrap();
    let mut tiny_sub = tiny_client.subscribe("tiny:room").await.unwrap();

    // Publishers, each behind its own cutting proxy too: when its connection is cut (or its
    // node goes down) it fails over and retries with the same id. Two use the SDK (which
    // sends `after`), one is plain.
    let mut pubs = Vec::new();
    let acked = Arc::new(AtomicUsize::new(0));
    for i in 0..3 {
        let proxy_gate = if i == 2 { Gate::Open } else { sdk_gate(1 - i) };
        if i != 2 {
            gated.push(proxies.len());
        }
        let proxy = Proxy::start(proxy_to(i), rng.random(), proxy_gate).await;
        let url = proxy.url();
        proxies.push(proxy);
        let pause = rng.random_range(1..4u64);
        let acked = acked.clone();
        if i == 2 {
            pubs.push(tokio::spawn(plain_publisher(url, i, pause, acked)));
            continue;
        }
        pubs.push(tokio::spawn(async move {
            // The chaos is on by now: a first connection can be cut too; try again.
            let deadline = tokio::time::Instant::now() + WAIT;
            let c = loop {
                match Client::connect(&url, fast_reconnect()).await {
                    Ok(c) => break c,
                    Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
                }
            };
            for k in 0..EACH {
                let id = format!("p{i}-{k}");
                let body = format!("P{i}:{k}");
                let deadline = tokio::time::Instant::now() + WAIT;
                while c.publish_with("chaos:room", "", Some(&id), body.as_str()).await.is_err() {
                    assert!(tokio::time::Instant::now() < deadline, "publish {id} never acked");
                }
                acked.fetch_add(1, Ordering::Relaxed);
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
            (seen, c.transport())
        }));
    }

    // Chaos: cut clients at random moments; SIGKILL one node mid-run and restart it, then
    // SIGTERM another (a rolling restart) and restart it. Right after each restart every
    // client is cut, so some resume on the node that is still catching up.
    let killed = rng.random_range(0..3usize);
    let termed = (killed + rng.random_range(1..3usize)) % 3;
    // By progress (acknowledged publishes), so both happen while messages flow.
    let kill_at = 3 * EACH * rng.random_range(15..35usize) / 100;
    let term_at = 3 * EACH * rng.random_range(55..75usize) / 100;
    let (mut kill_done, mut term_done) = (false, false);
    let mut cuts = 0usize;
    while !pubs.iter().all(|p| p.is_finished()) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..120))).await;
        let p = rng.random_range(0..proxies.len());
        proxies[p].cut();
        cuts += 1;
        let progress = acked.load(Ordering::Relaxed);
        if !kill_done && progress >= kill_at {
            kill_done = true;
            println!("chaos: SIGKILL {} at {progress} acked", REGIONS[killed]);
            nodes[killed].kill().await.unwrap(); // SIGKILL
            tokio::time::sleep(Duration::from_millis(300)).await;
            nodes[killed] = cluster.start(killed, WAIT).await;
            proxies.iter().for_each(Proxy::cut);
        } else if kill_done && !term_done && progress >= term_at {
            term_done = true;
            println!("chaos: SIGTERM {} at {progress} acked", REGIONS[termed]);
            sigterm(&mut nodes[termed]).await;
            nodes[termed] = cluster.start(termed, WAIT).await;
            proxies.iter().for_each(Proxy::cut);
        }
    }
    for p in pubs {
        p.await.unwrap();
    }
    assert!(kill_done && term_done, "the run was long enough to kill and to stop a node");

    // Retention: the tiny subscriber stays away while its log is forced past 20 messages.
    let publisher = Client::connect(&cluster.url(0), fast_reconnect()).await.unwrap();
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

    let all: Vec<usize> = (0..EACH).collect();
    // Every node's log holds each message once, in publisher order.
    for (n, region) in REGIONS.iter().enumerate() {
        let log = log_of(&cluster.http(n), "chaos:room").await;
        let got: Vec<(String, usize)> = log.iter().map(|g| parse(&g.text)).collect();
        if std::env::var("TERN_CHAOS_DUMP").is_ok() {
            // Runs of one origin per publisher: (publisher, first..last, origin@epoch:seq, after).
            let mut run: Option<(String, usize, usize, String, String)> = None;
            for g in &log {
                let (who, k) = parse(&g.text);
                let (who2, origin) = (who.clone(), format!("{}@{}", g.origin, g.epoch));
                match run.as_mut() {
                    Some(r)
                        if r.0 == who2 && r.3 == origin && r.2 + 1 == k && g.after.is_empty() =>
                    {
                        r.2 = k
                    }
                    _ => {
                        if let Some(r) = run.take() {
                            println!(
                                "{region} log run: {} {}..{} {} after {:?}",
                                r.0, r.1, r.2, r.3, r.4
                            );
                        }
                        run = Some((who2, k, k, origin, format!("{}:{}", g.seq, g.after)));
                    }
                }
            }
            if let Some(r) = run {
                println!("{region} log run: {} {}..{} {} after {:?}", r.0, r.1, r.2, r.3, r.4);
            }
        }
        for p in 0..3 {
            for a in anomalies(
                log.iter().map(|g| {
                    let info = format!("{}@{}:{} after {:?}", g.origin, g.epoch, g.seq, g.after);
                    (g.text.as_str(), info)
                }),
                &format!("P{p}"),
            ) {
                println!("{region}'s log: {a}");
            }
            assert_eq!(
                of(&got, &format!("P{p}")),
                all,
                "{region}'s log, publisher {p} (seed {seed})"
            );
        }
        assert_eq!(got.len(), 3 * EACH, "{region}'s log holds each message once (seed {seed})");
    }

    let mut delivered = 0;
    let mut discontinuities = 0;
    for (i, r) in readers.into_iter().enumerate() {
        let (seen, transport) = r.await.unwrap();
        println!("SDK subscriber {i} ended on {transport:?}");
        match sdk_gate(i) {
            Gate::Open => {}
            Gate::NoWebSocket => assert_ne!(transport, Some(Transport::WebSocket)),
            Gate::PollOnly => {
                assert!(matches!(transport, Some(Transport::Poll) | None), "{transport:?}")
            }
        }
        for p in 0..3 {
            let got = &seen.per[&format!("P{p}")];
            let info = |e: &(String, String, String, u64, u64)| format!("{}@{}:{}", e.2, e.3, e.4);
            for a in anomalies(seen.log.iter().map(|e| (e.0.as_str(), info(e))), &format!("P{p}")) {
                println!("SDK subscriber {i}: {a}");
            }
            assert_eq!(
                got, &all,
                "SDK subscriber {i}, publisher {p}: every message once, in order (seed {seed})"
            );
            delivered += got.len();
        }
        discontinuities += seen.discontinuities;
        assert_eq!(seen.discontinuities, 0, "SDK subscriber {i}: nothing was past retention");
    }
    for (i, r) in plain_subs.into_iter().enumerate() {
        let st = r.await.unwrap();
        let got: Vec<(String, usize)> = st.got.iter().map(|g| parse(&g.text)).collect();
        for p in 0..3 {
            let mine = of(&got, &format!("P{p}"));
            let info = |g: &common::plain::Got| {
                format!("{}@{}:{} from {}", g.origin, g.epoch, g.seq, g.node)
            };
            for a in anomalies(st.got.iter().map(|g| (g.text.as_str(), info(g))), &format!("P{p}"))
            {
                println!("plain subscriber {i}: {a}");
            }
            assert_eq!(
                mine, all,
                "plain subscriber {i}, publisher {p}: every message once, in order, with no help from the client (seed {seed})"
            );
        }
        assert_eq!(got.len(), 3 * EACH, "plain subscriber {i}: nothing else, nothing twice");
        assert!(st.discontinuities.is_empty(), "plain subscriber {i}: {:?}", st.discontinuities);
        delivered += got.len();
    }
    let (mut resumed, mut failed_over) = (0, 0);
    for (i, p) in proxies.iter().enumerate() {
        let (connections, failovers, refused) = p.counts();
        resumed += connections.saturating_sub(1);
        failed_over += failovers;
        if gate != Gate::Open && gated.contains(&i) {
            assert!(refused > 0, "SDK client {i}'s proxy refused its WebSocket: {refused}");
        }
    }
    let t = &tiny.per["T"];
    assert!(tiny.discontinuities >= 1, "the forced gap is announced: {:?}", summary(&tiny));
    assert!(t.windows(2).all(|w| w[0] < w[1]), "in order, once: {t:?}");
    assert!(t.len() < FORCED, "the log kept only its retention: {}", t.len());
    println!(
        "chaos seed {seed}: {delivered} delivered to {} SDK and {} plain subscribers, 0 lost, \
         0 duplicated, 0 out of order; 3 logs with {} messages each, each once; {cuts} cuts, \
         {resumed} reconnects ({failed_over} to another region); {} SIGKILLed, {} SIGTERMed, \
         both restarted; {discontinuities} unexpected discontinuities; retention subscriber: \
         {} discontinuity, {} of {} messages replayable",
        SDK_SUBS,
        PLAIN_SUBS,
        3 * EACH,
        REGIONS[killed],
        REGIONS[termed],
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
