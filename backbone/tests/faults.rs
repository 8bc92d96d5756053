//! Deterministic fault suite for the replication core.
//!
//! A seeded in-memory network of 3–5 nodes drops, duplicates, delays and reorders frames,
//! partitions and heals links, and crashes and restarts nodes (with or without their log).
//! Half the channels are in a replicate-all, durable namespace (`h:`, as history namespaces
//! are), half are interest-routed (`chat:`): every node asks for those at the start (and again
//! after a restart), and in the `interest_churn` scenario nodes gain and withdraw interest at
//! random moments. A restart with the log starts a new epoch from what the crashed node's log
//! held ([`Replica::durable_state`] → [`Replica::restore`], as a real node does from its store).
//! After every run the invariants of the delivery contract are checked:
//! - each node delivers each origin's messages in sequence, each once, with the payload the
//!   origin published; an interest-routed stream starts where the origin's `Start` said
//!   (never before anything already delivered);
//! - after healing, nothing published within retention is missing (for interest-routed
//!   channels: nothing after the start of the node's current interest);
//! - anything irreparable (trimmed log, origin restarted without its log) was reported as a
//!   discontinuity, never skipped silently;
//! - after a restart with the log, nothing is delivered twice (the restarted node continues
//!   from its logged positions: its events before and after the crash are checked as one
//!   stream), and durable channels show no discontinuity at all: the peers get the rest of the
//!   restarted origin's previous epoch and its `End`, then the new epoch.
//!
//! A failure prints its scenario and seed. Replay one with
//! `TERN_FAULT_SEED=scenario:seed cargo test -p tern-backbone --test integration faults:: -- --nocapture`;
//! scale the number of seeds with `TERN_FAULT_SEEDS=N` (per scenario).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_backbone::core::{Config, Event, Frame, Replica, Restored};
use tern_proto::types::{ChannelName, Epoch, NodeId, RegionId};

/// SplitMix64: tiny, seedable, identical everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 1.0 < p
    }
}

#[derive(Clone, Copy)]
enum Restart {
    None,
    WithLog,
    WithoutLog,
}

#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    nodes: usize,
    channels: usize,
    publishes: usize,
    /// Publishes are spread over this much simulated time.
    publish_ms: u64,
    loss: f64,
    dup: f64,
    max_delay_ms: u64,
    /// Cut every link between `partition.0` and `partition.1` ms.
    partition: Option<(u64, u64)>,
    /// Cut only node 0 off instead of all links.
    isolate_first: bool,
    restart: Restart,
    retention: usize,
    /// The origin logs' byte budget (all channels together).
    retention_bytes: usize,
    /// Messages of one channel in flight to one peer.
    send_window: usize,
    /// Random interest changes (add or remove, per node and channel) during the run.
    churn: usize,
}

const BASE: Scenario = Scenario {
    name: "",
    nodes: 3,
    channels: 3,
    publishes: 120,
    publish_ms: 3_000,
    loss: 0.0,
    dup: 0.0,
    max_delay_ms: 20,
    partition: None,
    isolate_first: false,
    restart: Restart::None,
    retention: 10_000,
    retention_bytes: 256 << 20,
    send_window: 8192,
    churn: 0,
};

const SCENARIOS: &[Scenario] = &[
    Scenario { name: "loss30", loss: 0.30, ..BASE },
    Scenario { name: "dup_reorder", nodes: 4, loss: 0.05, dup: 0.25, max_delay_ms: 150, ..BASE },
    Scenario { name: "partition3", loss: 0.02, partition: Some((500, 2_500)), ..BASE },
    Scenario { name: "restart_with_log", loss: 0.05, restart: Restart::WithLog, ..BASE },
    // The node restarts while cut off from the others: when the partition heals, the peers
    // are behind in its previous epoch and it is behind in theirs.
    Scenario {
        name: "restart_isolated",
        loss: 0.05,
        restart: Restart::WithLog,
        partition: Some((200, 2_800)),
        isolate_first: true,
        ..BASE
    },
    Scenario {
        name: "restart_reorder",
        nodes: 4,
        loss: 0.10,
        dup: 0.20,
        max_delay_ms: 150,
        restart: Restart::WithLog,
        ..BASE
    },
    Scenario { name: "restart_without_log", loss: 0.05, restart: Restart::WithoutLog, ..BASE },
    Scenario {
        name: "retention",
        retention: 8,
        partition: Some((200, 2_800)),
        isolate_first: true,
        loss: 0.05,
        ..BASE
    },
    // The logs' byte budget, not the per-channel count, trims them: about 8 of a node's
    // messages (~16 bytes each) fit across all its channels.
    Scenario {
        name: "byte_budget",
        retention_bytes: 128,
        partition: Some((200, 2_800)),
        isolate_first: true,
        loss: 0.05,
        ..BASE
    },
    // A window of 3 messages per channel and peer: publishes queue in the log and leave as
    // acknowledgements return, through loss, duplication, reordering and a partition.
    Scenario {
        name: "send_window",
        send_window: 3,
        loss: 0.10,
        dup: 0.05,
        max_delay_ms: 80,
        partition: Some((800, 1_600)),
        ..BASE
    },
    Scenario {
        name: "five_nodes",
        nodes: 5,
        loss: 0.10,
        dup: 0.05,
        max_delay_ms: 60,
        partition: Some((800, 1_600)),
        ..BASE
    },
    Scenario {
        name: "interest_churn",
        loss: 0.10,
        dup: 0.05,
        max_delay_ms: 80,
        churn: 40,
        partition: Some((1_000, 1_800)),
        ..BASE
    },
];

fn node_id(i: usize) -> NodeId {
    NodeId::new(&RegionId::parse(&format!("r{i}")).unwrap(), "n").unwrap()
}

/// Even channels are replicate-all (`h:`), odd ones interest-routed (`chat:`).
fn channel(i: usize) -> ChannelName {
    let ns = if i % 2 == 0 { "h" } else { "chat" };
    ChannelName::parse(&format!("{ns}:room-{i}")).unwrap()
}

fn routed(i: usize) -> bool {
    i % 2 == 1
}

struct SimNode {
    replica: Replica,
    alive: bool,
    /// Events of the current incarnation (a restart without log starts a new one).
    events: Vec<Event>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Duration,
    order: u64,
    from: usize,
    to: usize,
}

struct Net {
    queue: BinaryHeap<Reverse<InFlight>>,
    frames: BTreeMap<u64, Frame>,
    order: u64,
}

#[derive(Default, Debug)]
struct Counts {
    delivered: u64,
    discontinuities: u64,
    starts: u64,
    ready: u64,
}

fn config(s: &Scenario) -> Config {
    Config {
        retention: s.retention,
        retention_bytes: s.retention_bytes,
        send_window: s.send_window,
        replicate_all: ["h".to_owned()].into(),
        durable: ["h".to_owned()].into(),
        interest_grace: Duration::from_millis(if s.churn > 0 { 150 } else { 60_000 }),
        ..Config::default()
    }
}

fn run(s: &Scenario, seed: u64) -> Result<Counts, String> {
    let mut rng = Rng(seed ^ 0x5EED);
    // `TERN_FAULT_TRACE=1` with `TERN_FAULT_SEED` prints every frame as it arrives.
    let trace = std::env::var("TERN_FAULT_TRACE").is_ok_and(|v| v == "1");
    let t0 = Instant::now();
    let ids: Vec<NodeId> = (0..s.nodes).map(node_id).collect();
    let mut nodes: Vec<SimNode> = (0..s.nodes)
        .map(|i| SimNode {
            replica: Replica::new(ids[i].clone(), Epoch(1_000), &ids, config(s)),
            alive: true,
            events: Vec::new(),
        })
        .collect();
    // What each origin published: (origin, channel, epoch, seq) → payload.
    let mut published: BTreeMap<(usize, usize, u64, u64), Bytes> = BTreeMap::new();
    let mut last_seq: BTreeMap<(usize, usize, u64), u64> = BTreeMap::new();
    let mut net = Net { queue: BinaryHeap::new(), frames: BTreeMap::new(), order: 0 };

    // Schedule: publishes, then the faults.
    let mut publishes: Vec<(Duration, usize, usize)> = (0..s.publishes)
        .map(|_| {
            (
                Duration::from_millis(rng.below(s.publish_ms)),
                rng.below(s.nodes as u64) as usize,
                rng.below(s.channels as u64) as usize,
            )
        })
        .collect();
    publishes.sort();
    let crash_at = Duration::from_millis(300 + rng.below(s.publish_ms - 600));
    let restart_at = crash_at + Duration::from_millis(100 + rng.below(800));
    let mut crashed_state: Option<Restored> = None;
    let mut crash_done = false;
    let mut restart_done = false;
    let mut cut: BTreeSet<(usize, usize)> = BTreeSet::new();
    let partition = s.partition.map(|(a, b)| (Duration::from_millis(a), Duration::from_millis(b)));
    let (mut cut_done, mut heal_done) = (false, false);
    let end = Duration::from_millis(s.publish_ms + 15_000);
    let mut epoch_counter = 1_000u64;

    let pair = |a: usize, b: usize| (a.min(b), a.max(b));
    let link_up_both =
        |nodes: &mut Vec<SimNode>, now: Instant, a: usize, b: usize, ids: &[NodeId]| {
            if nodes[a].alive && nodes[b].alive {
                nodes[a].replica.handle_link_up(now, &ids[b]);
                nodes[b].replica.handle_link_up(now, &ids[a]);
            }
        };
    for a in 0..s.nodes {
        for b in (a + 1)..s.nodes {
            link_up_both(&mut nodes, t0, a, b, &ids);
        }
    }

    for n in &mut nodes {
        for ch in (0..s.channels).filter(|c| routed(*c)) {
            n.replica.add_interest(t0, &channel(ch));
        }
    }
    // Interest changes: (time, node, channel); each toggles.
    let mut churn: Vec<(Duration, usize, usize)> = (0..s.churn)
        .map(|_| {
            let ch = 2 * rng.below(s.channels as u64 / 2) as usize + 1;
            (Duration::from_millis(rng.below(s.publish_ms)), rng.below(s.nodes as u64) as usize, ch)
        })
        .collect();
    churn.sort();
    let mut next_churn = 0;

    let mut next_pub = 0;
    let mut now_d = Duration::ZERO;
    loop {
        // Move every node's output onto the network and collect events.
        for i in 0..s.nodes {
            while let Some((to, frame)) = nodes[i].replica.poll_transmit() {
                let to = ids.iter().position(|x| *x == to).expect("known node");
                let copies = if rng.chance(s.dup) { 2 } else { 1 };
                for _ in 0..copies {
                    if rng.chance(s.loss) {
                        continue;
                    }
                    let delay = Duration::from_micros(500 + rng.below(s.max_delay_ms * 1000));
                    net.order += 1;
                    net.frames.insert(net.order, frame.clone());
                    net.queue.push(Reverse(InFlight {
                        at: now_d + delay,
                        order: net.order,
                        from: i,
                        to,
                    }));
                }
            }
            while let Some(e) = nodes[i].replica.poll_event() {
                nodes[i].events.push(e);
            }
        }
        // The next thing to happen.
        let mut next = end;
        if let Some(Reverse(f)) = net.queue.peek() {
            next = next.min(f.at);
        }
        if let Some(p) = publishes.get(next_pub) {
            next = next.min(p.0);
        }
        if let Some(c) = churn.get(next_churn) {
            next = next.min(c.0);
        }
        for n in &nodes {
            if n.alive {
                if let Some(t) = n.replica.poll_timeout() {
                    next = next.min(t.duration_since(t0));
                }
            }
        }
        if let Some((a, b)) = partition {
            if !cut_done {
                next = next.min(a);
            } else if !heal_done {
                next = next.min(b);
            }
        }
        if !matches!(s.restart, Restart::None) {
            if !crash_done {
                next = next.min(crash_at);
            } else if !restart_done {
                next = next.min(restart_at);
            }
        }
        if next >= end {
            break;
        }
        now_d = now_d.max(next);
        let now = t0 + now_d;

        if let Some((a, _)) = partition {
            if !cut_done && now_d >= a {
                cut_done = true;
                for x in 0..s.nodes {
                    for y in (x + 1)..s.nodes {
                        if s.isolate_first && x != 0 {
                            continue;
                        }
                        cut.insert((x, y));
                        nodes[x].replica.handle_link_down(now, &ids[y]);
                        nodes[y].replica.handle_link_down(now, &ids[x]);
                    }
                }
            }
        }
        if let Some((_, b)) = partition {
            if cut_done && !heal_done && now_d >= b {
                heal_done = true;
                for (x, y) in std::mem::take(&mut cut) {
                    link_up_both(&mut nodes, now, x, y, &ids);
                }
            }
        }
        if !matches!(s.restart, Restart::None) && !crash_done && now_d >= crash_at {
            crash_done = true;
            crashed_state = Some(nodes[0].replica.durable_state());
            nodes[0].alive = false;
            for y in 1..s.nodes {
                nodes[y].replica.handle_link_down(now, &ids[0]);
            }
        }
        if crash_done && !restart_done && now_d >= restart_at {
            restart_done = true;
            // Every start is a new epoch; with the log, the node continues from it.
            epoch_counter += 1_000;
            let epoch = Epoch(epoch_counter);
            let replica = match s.restart {
                Restart::WithLog => Replica::restore(
                    ids[0].clone(),
                    epoch,
                    &ids,
                    config(s),
                    crashed_state.take().expect("state saved at crash"),
                ),
                _ => {
                    nodes[0].events.clear();
                    Replica::new(ids[0].clone(), epoch, &ids, config(s))
                }
            };
            nodes[0].replica = replica;
            nodes[0].alive = true;
            // Its clients come back and subscribe again.
            for ch in (0..s.channels).filter(|c| routed(*c)) {
                nodes[0].replica.add_interest(now, &channel(ch));
            }
            for y in 1..s.nodes {
                if !cut.contains(&pair(0, y)) {
                    link_up_both(&mut nodes, now, 0, y, &ids);
                }
            }
        }
        while let Some(&(at, n, ch)) = churn.get(next_churn) {
            if at > now_d {
                break;
            }
            next_churn += 1;
            if nodes[n].alive {
                let r = &mut nodes[n].replica;
                if r.has_interest(&channel(ch)) && rng.chance(0.7) {
                    r.remove_interest(now, &channel(ch));
                } else {
                    r.add_interest(now, &channel(ch));
                }
            }
        }
        while let Some(p) = publishes.get(next_pub) {
            if p.0 > now_d {
                break;
            }
            next_pub += 1;
            let (_, origin, ch) = *p;
            if !nodes[origin].alive {
                continue;
            }
            let epoch = nodes[origin].replica.epoch().0;
            let payload = Bytes::from(format!("o{origin}-c{ch}-e{epoch}-{next_pub}"));
            let seq = nodes[origin].replica.publish_next(now, channel(ch), payload.clone()).0;
            published.insert((origin, ch, epoch, seq), payload);
            last_seq.insert((origin, ch, epoch), seq);
        }
        while let Some(Reverse(f)) = net.queue.peek() {
            if f.at > now_d {
                break;
            }
            let Reverse(f) = net.queue.pop().expect("peeked");
            let frame = net.frames.remove(&f.order).expect("stored");
            if cut.contains(&pair(f.from, f.to)) || !nodes[f.to].alive || !nodes[f.from].alive {
                continue;
            }
            if trace {
                println!("{:>6} ms {} → {}: {frame:?}", now_d.as_millis(), f.from, f.to);
            }
            nodes[f.to].replica.handle_frame(now, &ids[f.from], frame);
        }
        for n in &mut nodes {
            if n.alive {
                n.replica.handle_timeout(now);
            }
        }
    }

    check(s, &nodes, &published, &last_seq)
}

fn check(
    s: &Scenario,
    nodes: &[SimNode],
    published: &BTreeMap<(usize, usize, u64, u64), Bytes>,
    last_seq: &BTreeMap<(usize, usize, u64), u64>,
) -> Result<Counts, String> {
    let ids: Vec<NodeId> = (0..s.nodes).map(node_id).collect();
    let idx = |n: &NodeId| ids.iter().position(|x| x == n).expect("known");
    let chan_idx = |c: &ChannelName| (0..s.channels).find(|i| channel(*i) == *c).expect("known");
    let mut counts = Counts::default();
    for (n, node) in nodes.iter().enumerate() {
        // (origin, channel) → (epoch, position); and which epochs ended with a report.
        let mut pos: BTreeMap<(usize, usize), (u64, u64)> = BTreeMap::new();
        let mut reported_end: BTreeSet<(usize, usize, u64)> = BTreeSet::new();
        let mut seen_epochs: BTreeMap<(usize, usize, u64), u64> = BTreeMap::new();
        for e in &node.events {
            match e {
                Event::Deliver { origin, channel, epoch, seq, payload } => {
                    let key = (idx(origin), chan_idx(channel));
                    let p = pos.entry(key).or_insert((epoch.0, 0));
                    if p.0 != epoch.0 {
                        // Either the old epoch ended with a report, or it was complete (the
                        // origin ended it with `End` after resending its rest).
                        let complete =
                            last_seq.get(&(key.0, key.1, p.0)).is_none_or(|&last| p.1 >= last);
                        if !reported_end.contains(&(key.0, key.1, p.0)) && !complete {
                            return Err(format!(
                                "node {n}: origin {} {channel} moved from epoch {} (at {}) to {} without a discontinuity",
                                key.0, p.0, p.1, epoch.0
                            ));
                        }
                        if epoch.0 < p.0 {
                            return Err(format!(
                                "node {n}: origin {} {channel} went back from epoch {} to {}",
                                key.0, p.0, epoch.0
                            ));
                        }
                        *p = (epoch.0, 0);
                    }
                    if seq.0 != p.1 + 1 {
                        return Err(format!(
                            "node {n}: origin {} {channel} epoch {}: delivered {} after {} (gap or duplicate)",
                            key.0, epoch.0, seq.0, p.1
                        ));
                    }
                    let want = published.get(&(key.0, key.1, epoch.0, seq.0));
                    if want != Some(payload) {
                        return Err(format!("node {n}: wrong payload for {key:?} seq {}", seq.0));
                    }
                    p.1 = seq.0;
                    seen_epochs.insert((key.0, key.1, epoch.0), seq.0);
                    counts.delivered += 1;
                }
                // Acknowledgement progress for publishers waiting on replication; the
                // edge tests check what it promises.
                Event::Replicated { .. }
                | Event::HeadRequested { .. }
                | Event::EpochEnded { .. } => {}
                Event::Started { origin, channel, epoch, after, .. } => {
                    let key = (idx(origin), chan_idx(channel));
                    if !routed(key.1) {
                        return Err(format!("node {n}: Start for replicate-all {channel}"));
                    }
                    counts.starts += 1;
                    let p = pos.entry(key).or_insert((epoch.0, 0));
                    if epoch.0 < p.0 || (epoch.0 == p.0 && after.0 < p.1) {
                        return Err(format!(
                            "node {n}: {key:?} started after {after} in epoch {}, behind position {p:?} (would repeat)",
                            epoch.0
                        ));
                    }
                    *p = (epoch.0, after.0);
                    seen_epochs.entry((key.0, key.1, epoch.0)).or_insert(after.0);
                }
                Event::Ready { .. } => counts.ready += 1,
                Event::Discontinuity { origin, channel, epoch, after, through } => {
                    let key = (idx(origin), chan_idx(channel));
                    counts.discontinuities += 1;
                    let trimmed = s.retention < 100 || s.retention_bytes < 1024;
                    if matches!(s.restart, Restart::WithLog) && !routed(key.1) && !trimmed {
                        return Err(format!(
                            "node {n}: discontinuity in durable {channel} of origin {} (epoch {}, after {after}, through {through:?}) in a restart with the log",
                            key.0, epoch.0
                        ));
                    }
                    let p = pos.entry(key).or_insert((epoch.0, 0));
                    if p.0 != epoch.0 || p.1 != after.0 {
                        return Err(format!(
                            "node {n}: discontinuity for {key:?} after {after} in epoch {} does not follow position {p:?}",
                            epoch.0
                        ));
                    }
                    match through {
                        Some(t) => p.1 = t.0,
                        None => {
                            reported_end.insert((key.0, key.1, epoch.0));
                        }
                    }
                }
            }
        }
        // Completeness: every origin's current epoch fully delivered; any older epoch either
        // fully delivered or reported.
        for (&(origin, ch, epoch), &last) in last_seq {
            if origin == n {
                continue;
            }
            // A routed channel is owed only while the node wants it, from where it started.
            if routed(ch) && (!node.replica.has_interest(&channel(ch)) || s.churn > 0) {
                if epoch == nodes[origin].replica.epoch().0
                    && node.replica.has_interest(&channel(ch))
                {
                    let got = pos.get(&(origin, ch)).copied();
                    if !got.is_some_and(|(e, p)| e == epoch && p >= last) {
                        return Err(format!(
                            "node {n}: wants routed channel {ch} but misses origin {origin} epoch {epoch}: at {got:?}, last published {last}"
                        ));
                    }
                }
                continue;
            }
            let current = nodes[origin].replica.epoch().0;
            let got = pos.get(&(origin, ch)).copied();
            let done = got.is_some_and(|(e, p)| e == epoch && p >= last)
                || seen_epochs.get(&(origin, ch, epoch)).is_some_and(|&p| p >= last);
            if epoch == current {
                if !done {
                    return Err(format!(
                        "node {n}: missing origin {origin} channel {ch} epoch {epoch}: at {got:?}, last published {last}"
                    ));
                }
            } else {
                let knew = seen_epochs.contains_key(&(origin, ch, epoch));
                if knew && !done && !reported_end.contains(&(origin, ch, epoch)) {
                    return Err(format!(
                        "node {n}: old epoch {epoch} of origin {origin} channel {ch} incomplete and not reported"
                    ));
                }
            }
        }
    }
    Ok(counts)
}

fn seeds() -> u64 {
    std::env::var("TERN_FAULT_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(750)
}

#[test]
fn fault_suite() {
    if let Ok(one) = std::env::var("TERN_FAULT_SEED") {
        let (name, seed) = one.split_once(':').expect("TERN_FAULT_SEED=scenario:seed");
        let s = SCENARIOS.iter().find(|s| s.name == name).expect("known scenario");
        let counts = run(s, seed.parse().expect("numeric seed")).unwrap_or_else(|e| panic!("{e}"));
        println!("{name}:{seed} ok: {counts:?}");
        return;
    }
    let n = seeds();
    let mut total = 0;
    for s in SCENARIOS {
        let mut counts = Counts::default();
        for seed in 0..n {
            match run(s, seed) {
                Ok(c) => {
                    counts.delivered += c.delivered;
                    counts.discontinuities += c.discontinuities;
                    counts.starts += c.starts;
                    counts.ready += c.ready;
                }
                Err(e) => panic!(
                    "scenario {} seed {seed} failed: {e}\nreplay: TERN_FAULT_SEED={}:{seed} cargo test -p tern-backbone --test integration faults:: -- --nocapture",
                    s.name, s.name
                ),
            }
            total += 1;
        }
        println!(
            "{:<20} {n} seeds: {} deliveries, {} discontinuities, {} stream starts, {} ready",
            s.name, counts.delivered, counts.discontinuities, counts.starts, counts.ready
        );
        assert!(counts.starts > 0 && counts.ready > 0, "{}: interest was never exercised", s.name);
        if s.retention < 100 || s.retention_bytes < 1024 {
            assert!(
                counts.discontinuities > 0,
                "{}: the logs were never trimmed past a lagging peer",
                s.name
            );
        }
    }
    assert!(total >= 5_000, "the suite must cover at least 5,000 seeds, ran {total}");
}
