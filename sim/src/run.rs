//! One simulation run: real edge nodes on loopback behind emulated links, real SDK clients
//! over real WebSockets behind emulated last miles, a workload, and the measurements.
//!
//! Tern run: a node in every region with an edge, a full mesh of UDP relays between them
//! (the backbone's QUIC runs through them), and each client picks its edge with the SDK's
//! nearest-edge probe. Hub run (the naive baseline): one node in the hub region and every
//! client connected to it, the same workload.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tern_backbone::certs;
use tern_client::{Client, ClientOptions, Event, nearest};
use tern_edge::config::{BackboneSection, PeerConfig};
use tern_edge::{Config, Server};
use tern_proto::client::message::Data;
use tern_proto::types::NodeId;
use tokio_util::sync::CancellationToken;

use crate::emu::{Scheduler, UdpRelay, tcp_relay};
use crate::matrix::RttMatrix;
use crate::measure::{Integrity, Pair, RunResult, Sample};
use crate::profile::{self, Direction, Profile};
use crate::scenario::Scenario;

/// Most timeline samples kept per run.
const MAX_TIMELINE: usize = 400_000;

/// Which topology a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A node per region, joined by the backbone; clients pick the nearest.
    Tern,
    /// One node in the hub region; every client connects to it.
    Hub,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Setting up nodes, certificates or relays failed.
    #[error("setup: {0}")]
    Setup(String),
    /// A client could not connect or subscribe.
    #[error("client: {0}")]
    Client(String),
}

fn setup<E: std::fmt::Display>(e: E) -> RunError {
    RunError::Setup(e.to_string())
}

struct SimClient {
    region: usize,
    profile: Profile,
    room: usize,
    publishes: bool,
}

/// Clients interleaved across regions (so rooms span regions), rooms assigned in turn.
fn clients(s: &Scenario) -> Vec<SimClient> {
    let most = s.regions.iter().map(|r| r.clients).max().unwrap_or(0);
    let mut out = Vec::new();
    for k in 0..most {
        for (ri, r) in s.regions.iter().enumerate() {
            if k < r.clients {
                let name = &r.profiles[k % r.profiles.len()];
                let mut profile = profile::profile(name).expect("checked by the scenario");
                if let Some(j) = s.lastmile.jitter_ms {
                    profile.jitter_ms = j;
                }
                if let Some(l) = s.lastmile.loss {
                    profile.loss = l;
                }
                // Shifted per region, so every room has members in several regions.
                let room = (k + ri) % s.workload.rooms;
                out.push(SimClient { region: ri, profile, room, publishes: false });
            }
        }
    }
    let mut per_room = vec![0usize; s.workload.rooms];
    for c in &mut out {
        let n = &mut per_room[c.room];
        c.publishes = s.workload.publishers_per_room == 0 || *n < s.workload.publishers_per_room;
        *n += 1;
    }
    out
}

fn half(d: Duration) -> Duration {
    d / 2
}

struct Edge {
    region: String,
    url_addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Runs `scenario` once in `mode`. `sched` is the shared link emulator.
pub async fn run(
    s: &Scenario,
    m: &RttMatrix,
    mode: Mode,
    sched: &Scheduler,
    log: &(dyn Fn(&str) + Sync),
) -> Result<RunResult, RunError> {
    sched.reset_timing();
    let stop = CancellationToken::new();
    let result = run_inner(s, m, mode, sched, log, &stop).await;
    stop.cancel();
    result
}

async fn run_inner(
    s: &Scenario,
    m: &RttMatrix,
    mode: Mode,
    sched: &Scheduler,
    log: &(dyn Fn(&str) + Sync),
    stop: &CancellationToken,
) -> Result<RunResult, RunError> {
    let rtt = |a: &str, b: &str| m.rtt(a, b).unwrap_or_default();
    let edge_regions: Vec<String> = match mode {
        Mode::Tern => s.regions.iter().filter(|r| r.edge).map(|r| r.name.clone()).collect(),
        Mode::Hub => vec![s.hub.clone()],
    };
    let (edges, cuts) = start_edges(s, &edge_regions, mode, sched, stop, &rtt).await?;
    log(&format!(
        "  {} node(s) up: {}",
        edges.len(),
        edges.iter().map(|e| e.region.as_str()).collect::<Vec<_>>().join(", ")
    ));

    // Last-mile relays: one per (client region, profile, edge), shared by its clients.
    let sim_clients = clients(s);
    let mut relays: HashMap<(usize, &'static str, usize), std::net::SocketAddr> = HashMap::new();
    for c in &sim_clients {
        for (ei, e) in edges.iter().enumerate() {
            let key = (c.region, c.profile.name, ei);
            if relays.contains_key(&key) {
                continue;
            }
            let region = &s.regions[c.region].name;
            let dir = Direction {
                delay: half(Duration::from_secs_f64(c.profile.rtt_ms / 1e3))
                    + half(rtt(region, &e.region)),
                jitter: Duration::from_secs_f64(c.profile.jitter_ms / 1e3),
                kind: s.lastmile.jitter,
                loss: c.profile.loss,
                bandwidth_bps: 0,
            };
            let seed =
                s.seed ^ ((c.region as u64) << 32) ^ ((ei as u64) << 16) ^ relays.len() as u64;
            let addr =
                tcp_relay(sched, e.url_addr, dir, dir, seed, stop.clone()).await.map_err(setup)?;
            relays.insert(key, addr);
        }
    }

    // Connect: each client probes every candidate through its own last mile and picks the
    // nearest (the SDK's selection); in the hub run there is one candidate.
    let connect_started = Instant::now();
    let mut connecting = Vec::new();
    for c in &sim_clients {
        let candidates: Vec<String> = (0..edges.len())
            .map(|ei| format!("ws://{}", relays[&(c.region, c.profile.name, ei)]))
            .collect();
        connecting.push(async move {
            let ranked = nearest::rank(&candidates, 2, Duration::from_secs(10)).await;
            let best = ranked.first().filter(|p| p.rtt.is_some()).ok_or_else(|| {
                RunError::Client("no edge answered the nearest-edge probe".into())
            })?;
            let edge = candidates.iter().position(|u| *u == best.url).unwrap_or(0);
            let client = Client::connect(&best.url, ClientOptions::default())
                .await
                .map_err(|e| RunError::Client(e.to_string()))?;
            Ok::<_, RunError>((client, edge))
        });
    }
    let connected = join_bounded(connecting, 64).await;
    let mut conns = Vec::with_capacity(connected.len());
    for r in connected {
        conns.push(r?);
    }
    let mut placement: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for (c, (_, edge)) in sim_clients.iter().zip(&conns) {
        *placement
            .entry(s.regions[c.region].name.clone())
            .or_default()
            .entry(edges[*edge].region.clone())
            .or_default() += 1;
    }
    log(&format!(
        "  {} clients connected in {:.1}s",
        conns.len(),
        connect_started.elapsed().as_secs_f64()
    ));

    // Subscribe everyone, and wait until every subscription is confirmed.
    let mut subscribing = Vec::new();
    for (c, (client, _)) in sim_clients.iter().zip(&conns) {
        let channel = format!("room:{}", c.room);
        subscribing.push(async move { client.subscribe(&channel).await });
    }
    let mut subs = Vec::new();
    for r in join_bounded(subscribing, 64).await {
        subs.push(r.map_err(|e| RunError::Client(e.to_string()))?);
    }

    // Publish for `duration`, then let stragglers arrive for `drain`.
    let t0 = Instant::now();
    let publish_end = t0 + s.duration;
    let listen_end = publish_end + s.drain;
    let published: Arc<Vec<AtomicU64>> =
        Arc::new((0..sim_clients.len()).map(|_| AtomicU64::new(0)).collect());
    schedule_partitions(s, mode, t0, stop, &cuts);

    // Per-message floor pieces: the publisher's path to its edge, the backbone hop, the
    // subscriber's path from its edge.
    let edge_of: Vec<usize> = conns.iter().map(|(_, e)| *e).collect();
    let access = |i: usize| {
        let c = &sim_clients[i];
        half(Duration::from_secs_f64(c.profile.rtt_ms / 1e3))
            + half(rtt(&s.regions[c.region].name, &edges[edge_of[i]].region))
    };
    let access: Arc<Vec<Duration>> = Arc::new((0..sim_clients.len()).map(access).collect());
    let hop: Arc<Vec<Vec<Duration>>> = Arc::new(
        edges
            .iter()
            .map(|a| edges.iter().map(|b| half(rtt(&a.region, &b.region))).collect())
            .collect(),
    );
    let meta: Arc<Vec<(usize, usize, usize)>> = Arc::new(
        sim_clients.iter().enumerate().map(|(i, c)| (c.region, c.room, edge_of[i])).collect(),
    );

    let mut readers = Vec::new();
    for (i, sub) in subs.into_iter().enumerate() {
        let (access, hop, meta) = (access.clone(), hop.clone(), meta.clone());
        let regions: Vec<String> = s.regions.iter().map(|r| r.name.clone()).collect();
        readers.push(tokio::spawn(async move {
            read(sub, i, t0, listen_end, &access, &hop, &meta, &regions).await
        }));
    }
    let mut writers = Vec::new();
    let mut rng = StdRng::seed_from_u64(s.seed);
    let period = Duration::from_secs_f64(1.0 / s.workload.publish_rate);
    for (i, (c, (client, _))) in sim_clients.iter().zip(conns.iter()).enumerate() {
        if !c.publishes {
            continue;
        }
        let client = client.clone();
        let channel = format!("room:{}", c.room);
        let phase = period.mul_f64(rng.random::<f64>());
        let published = published.clone();
        let pad = s.workload.payload_bytes;
        writers.push(tokio::spawn(async move {
            let mut next = t0 + phase;
            let mut seq = 0u64;
            while next < publish_end {
                tokio::time::sleep_until(next.into()).await;
                seq += 1;
                let sent_us = t0.elapsed().as_micros() as u64;
                let mut text = format!("{i}:{seq}:{sent_us}:");
                while text.len() < pad {
                    text.push('x');
                }
                if client.publish(&channel, text).await.is_err() {
                    break;
                }
                published[i].store(seq, Ordering::Relaxed);
                next += period;
            }
        }));
    }
    for w in writers {
        let _ = w.await;
    }
    log(&format!("  published for {:.0}s; draining", s.duration.as_secs_f64()));

    let mut result = RunResult {
        label: match mode {
            Mode::Tern => "tern".into(),
            Mode::Hub => "hub".into(),
        },
        pairs: BTreeMap::new(),
        integrity: Integrity::default(),
        timeline: Vec::new(),
        timing: sched.timing(),
        placement,
        published: published.iter().map(|p| p.load(Ordering::Relaxed)).sum(),
    };
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.await.map_err(setup)?;
        for (k, p) in got.pairs {
            result.pairs.entry(k).or_default().merge(&p);
        }
        let mut integrity = got.integrity;
        // Owed: every message published by a member of this subscriber's room.
        let room = sim_clients[i].room;
        let mut expected = 0;
        for (j, c) in sim_clients.iter().enumerate() {
            if c.room == room && c.publishes {
                let n = published[j].load(Ordering::Relaxed);
                expected += n;
                let distinct = got.distinct.get(&j).copied().unwrap_or(0);
                integrity.lost += n.saturating_sub(distinct);
            }
        }
        integrity.expected = expected;
        result.integrity.merge(&integrity);
        let room_left = MAX_TIMELINE.saturating_sub(result.timeline.len());
        result.timeline.extend(got.timeline.into_iter().take(room_left));
    }
    result.timing = sched.timing();
    for (client, _) in &conns {
        client.close().await;
    }
    for e in edges {
        e.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), e.task).await;
    }
    Ok(result)
}

struct Received {
    pairs: BTreeMap<(String, String), Pair>,
    integrity: Integrity,
    distinct: HashMap<usize, u64>,
    timeline: Vec<Sample>,
}

#[allow(clippy::too_many_arguments)]
async fn read(
    mut sub: tern_client::Subscription,
    me: usize,
    t0: Instant,
    end: Instant,
    access: &[Duration],
    hop: &[Vec<Duration>],
    meta: &[(usize, usize, usize)],
    regions: &[String],
) -> Received {
    let mut out = Received {
        pairs: BTreeMap::new(),
        integrity: Integrity::default(),
        distinct: HashMap::new(),
        timeline: Vec::new(),
    };
    // Per publisher: highest sequence seen and the set below it (for duplicates).
    let mut seen: HashMap<usize, (u64, std::collections::HashSet<u64>)> = HashMap::new();
    let (my_region, _, my_edge) = meta[me];
    loop {
        let ev = tokio::select! {
            _ = tokio::time::sleep_until(end.into()) => break,
            ev = sub.next() => ev,
        };
        let m = match ev {
            Some(Event::Message(m)) => m,
            Some(Event::Discontinuity { .. }) => {
                out.integrity.discontinuities += 1;
                continue;
            }
            None => break,
        };
        let now_us = t0.elapsed().as_micros() as u64;
        let Some(Data::Text(text)) = &m.data else { continue };
        let mut parts = text.splitn(4, ':');
        let (Some(p), Some(q), Some(t)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(publisher), Ok(seq), Ok(sent_us)) =
            (p.parse::<usize>(), q.parse::<u64>(), t.parse::<u64>())
        else {
            continue;
        };
        if publisher >= meta.len() {
            continue;
        }
        let (max, set) = seen.entry(publisher).or_default();
        if !set.insert(seq) {
            out.integrity.duplicated += 1;
            continue;
        }
        if seq < *max {
            out.integrity.out_of_order += 1;
        }
        *max = (*max).max(seq);
        out.integrity.delivered += 1;
        *out.distinct.entry(publisher).or_default() += 1;
        let (pub_region, _, pub_edge) = meta[publisher];
        let latency = Duration::from_micros(now_us.saturating_sub(sent_us));
        let floor = access[publisher] + hop[pub_edge][my_edge] + access[me];
        out.pairs
            .entry((regions[pub_region].clone(), regions[my_region].clone()))
            .or_default()
            .record(latency, floor);
        if out.timeline.len() < MAX_TIMELINE / 8 {
            out.timeline.push(Sample {
                sent_ms: sent_us as f32 / 1e3,
                latency_ms: latency.as_secs_f32() * 1e3,
                from: pub_region as u8,
                to: my_region as u8,
            });
        }
    }
    out
}

/// Runs futures with at most `limit` in flight, keeping their order.
async fn join_bounded<F: std::future::Future>(futs: Vec<F>, limit: usize) -> Vec<F::Output> {
    futures_util::stream::iter(futs).buffered(limit).collect().await
}

/// Cuts every backbone relay touching a partitioned region at its time, and heals it.
fn schedule_partitions(
    s: &Scenario,
    mode: Mode,
    t0: Instant,
    stop: &CancellationToken,
    cuts: &[(String, String, CutFlag)],
) {
    if mode != Mode::Tern {
        return;
    }
    for p in &s.partitions {
        let flags: Vec<_> = cuts
            .iter()
            .filter(|(a, b, _)| *a == p.region || *b == p.region)
            .map(|(_, _, f)| f.clone())
            .collect();
        let (at, until, stop) = (t0 + p.at, t0 + p.at + p.duration, stop.clone());
        tokio::spawn(async move {
            tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep_until(at.into()) => {} }
            flags.iter().for_each(|f| f.store(true, Ordering::Relaxed));
            tokio::select! { _ = stop.cancelled() => {}, _ = tokio::time::sleep_until(until.into()) => {} }
            flags.iter().for_each(|f| f.store(false, Ordering::Relaxed));
        });
    }
}

/// A backbone relay's cut switch.
type CutFlag = Arc<std::sync::atomic::AtomicBool>;

async fn start_edges(
    s: &Scenario,
    regions: &[String],
    mode: Mode,
    sched: &Scheduler,
    stop: &CancellationToken,
    rtt: &dyn Fn(&str, &str) -> Duration,
) -> Result<(Vec<Edge>, Vec<(String, String, CutFlag)>), RunError> {
    let ids: Vec<NodeId> = regions
        .iter()
        .map(|r| NodeId::parse(&format!("{r}/edge-1")).map_err(setup))
        .collect::<Result<_, _>>()?;
    let dir = cert_dir()?;
    let n = regions.len();
    // One relay per pair; both nodes name it as the other's address (the smaller id dials).
    let mut relays: BTreeMap<(usize, usize), UdpRelay> = BTreeMap::new();
    let mut cuts = Vec::new();
    if mode == Mode::Tern && n > 1 {
        certs::init_ca(&dir).map_err(setup)?;
        for id in &ids {
            certs::issue_node(&dir, id).map_err(setup)?;
        }
        let bb = &s.backbone;
        for a in 0..n {
            for b in (a + 1)..n {
                let dir = Direction {
                    delay: half(rtt(&regions[a], &regions[b])),
                    jitter: Duration::from_secs_f64(bb.jitter_ms / 1e3),
                    kind: bb.jitter,
                    loss: bb.loss,
                    bandwidth_bps: (bb.bandwidth_mbps * 1e6) as u64,
                };
                let seed = s.seed ^ ((a as u64) << 8 | b as u64).wrapping_mul(0x2545_F491);
                let relay =
                    UdpRelay::bind(sched, dir, dir, seed, stop.clone()).await.map_err(setup)?;
                cuts.push((regions[a].clone(), regions[b].clone(), relay.cut.clone()));
                relays.insert((a, b), relay);
            }
        }
    }
    let mut edges = Vec::new();
    let mut backbone_addrs = Vec::new();
    let mut nodes = Vec::new();
    for (i, region) in regions.iter().enumerate() {
        let mut cfg = Config::default();
        // Every emulated client reaches the node from a loopback relay: one address.
        cfg.limits.max_connections_per_ip = usize::MAX;
        // Simulated publishers each stand for many users.
        cfg.limits.publish_rate = u32::MAX;
        cfg.limits.publish_burst = u32::MAX;
        cfg.limits.frame_rate = u32::MAX;
        cfg.limits.frame_burst = u32::MAX;
        cfg.node.region = region.clone();
        cfg.node.name = "edge-1".into();
        cfg.listen.client = "127.0.0.1:0".parse().expect("valid address");
        cfg.timeouts.shutdown_grace = Duration::from_secs(2);
        cfg.timeouts.close = Duration::from_millis(500);
        if !relays.is_empty() {
            let (cert, key) = certs::node_files(&dir, &ids[i]);
            cfg.backbone = Some(BackboneSection {
                listen: "127.0.0.1:0".parse().expect("valid address"),
                ca: dir.join("ca.pem"),
                cert,
                key,
                crl: None,
                lanes: 4,
                lane_queue: 4096,
                retention: 10_000,
                retention_bytes: 256 << 20,
                send_window: 8192,
                replicate_all: Vec::new(),
                interest_grace: Duration::from_secs(120),
                interest_wait: Duration::from_secs(5),
                ready_wait: Duration::from_secs(10),
                order_wait: Duration::from_secs(10),
                peers: (0..n)
                    .filter(|&j| j != i)
                    .map(|j| PeerConfig {
                        id: ids[j].to_string(),
                        addr: relays[&(i.min(j), i.max(j))].addr().to_string(),
                    })
                    .collect(),
            });
        }
        let settings = cfg.validate().map_err(setup)?;
        let shutdown = CancellationToken::new();
        let server = Server::bind(settings, shutdown.clone()).await.map_err(setup)?;
        backbone_addrs.push(server.backbone_addr());
        let url_addr = server.local_addr();
        nodes.push(server.node().clone());
        let task = tokio::spawn(server.run());
        edges.push(Edge { region: region.clone(), url_addr, shutdown, task });
    }
    for ((a, b), relay) in &relays {
        // The larger id accepts: the relay forwards to it.
        let target = if ids[*a] > ids[*b] { *a } else { *b };
        if let Some(addr) = backbone_addrs[target] {
            relay.set_target(addr);
        }
    }
    // Let the mesh come up before clients arrive: every node ready (`/readyz`: caught up
    // with its reachable peers, or `backbone.ready_wait` passed). A node that is not ready
    // answers the clients' nearest-edge probes with 503.
    while !nodes.iter().all(|n| n.readiness().ready) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok((edges, cuts))
}

fn cert_dir() -> Result<PathBuf, RunError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("tern-sim-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(setup)?;
    Ok(dir)
}
