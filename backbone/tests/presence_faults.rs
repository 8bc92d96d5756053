//! Deterministic fault suite for presence replication ([`Presence`]).
//!
//! A seeded in-memory network of 3–4 nodes drops, duplicates, delays (some far longer than
//! the rest) and reorders presence frames, partitions and heals links (for less and for more than `down_after`), crashes
//! nodes and restarts them with a new epoch and none of their members, and links nodes that
//! already hold hundreds of members each for the first time; meanwhile the nodes' clients
//! enter, update and leave at random (and, in two scenarios, connections that left enter
//! again). Frames are split at a 600-byte budget, so digests, deltas and states travel in
//! many parts. After every run, with the network healed and quiet:
//! - every live node's members of every channel equal the union of the live nodes' own
//!   members (no ghost of a crashed or restarted node, nothing missing);
//! - every observer saw each member's events alternate (enter, then updates, then leave;
//!   never two enters or two leaves in a row), so deltas applied once and in order;
//! - a member that stayed entered on a node that was never down, seen by an observer whose
//!   link to that node was never cut for as long as half of `down_after`, entered once
//!   there and never left: no flapping through loss, repeats, reordering or short cuts.
//!
//! A failure prints its scenario and seed. Replay one with
//! `TERN_PRESENCE_SEED=scenario:seed cargo test -p tern-backbone --test integration presence_faults:: -- --nocapture`;
//! scale the number of seeds with `TERN_PRESENCE_SEEDS=N` (per scenario).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_backbone::core::{
    Action, MemberKey, Presence, PresenceConfig, PresenceEvent, PresenceFrame,
};
use tern_proto::types::{ChannelName, Epoch, NodeId};

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
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    nodes: usize,
    loss: f64,
    dup: f64,
    /// Chance per tick that a link is cut.
    partitions: f64,
    /// Chance per tick that a node (never 0 or 1, the stable owners) crashes.
    crashes: f64,
    /// All links start cut, and come up once every node holds `initial` members.
    first_link: bool,
    initial: usize,
    /// Chance per tick and node of a client operation.
    ops: f64,
    /// Chance that a frame is held far longer than usual (200–800 ms: past digests sent
    /// after it).
    tail: f64,
    /// Connections enter again after they left (the same member key).
    reenter: bool,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "lossy",
        nodes: 3,
        loss: 0.3,
        dup: 0.2,
        partitions: 0.0,
        crashes: 0.0,
        first_link: false,
        initial: 0,
        ops: 0.3,
        tail: 0.0,
        reenter: false,
    },
    Scenario {
        name: "partitions",
        nodes: 3,
        loss: 0.05,
        dup: 0.05,
        partitions: 0.01,
        crashes: 0.0,
        first_link: false,
        initial: 0,
        ops: 0.3,
        tail: 0.0,
        reenter: false,
    },
    Scenario {
        name: "crashes",
        nodes: 4,
        loss: 0.05,
        dup: 0.05,
        partitions: 0.0,
        crashes: 0.004,
        first_link: false,
        initial: 0,
        ops: 0.3,
        tail: 0.0,
        reenter: false,
    },
    Scenario {
        name: "first_link",
        nodes: 3,
        loss: 0.1,
        dup: 0.1,
        partitions: 0.0,
        crashes: 0.0,
        first_link: true,
        initial: 300,
        ops: 0.2,
        tail: 0.0,
        reenter: false,
    },
    Scenario {
        name: "everything",
        nodes: 4,
        loss: 0.2,
        dup: 0.1,
        partitions: 0.005,
        crashes: 0.002,
        first_link: false,
        initial: 20,
        ops: 0.4,
        tail: 0.02,
        reenter: true,
    },
    Scenario {
        name: "churn",
        nodes: 3,
        loss: 0.1,
        dup: 0.1,
        partitions: 0.002,
        crashes: 0.0,
        first_link: false,
        initial: 50,
        ops: 0.9,
        tail: 0.05,
        reenter: true,
    },
];

const TICK_MS: u64 = 10;
const CHAOS_MS: u64 = 5_000;
const DOWN_AFTER_MS: u64 = 1_000;
/// Channels of random clients; one more holds only the members entered mid-run.
const CHANNELS: usize = 3;

fn node_id(i: usize) -> NodeId {
    NodeId::parse(&format!("r{i}/edge-1")).unwrap()
}

fn channel(i: usize) -> ChannelName {
    ChannelName::parse(&format!("room:{i}")).unwrap()
}

fn config() -> PresenceConfig {
    PresenceConfig {
        down_after: Duration::from_millis(DOWN_AFTER_MS),
        sync_interval: Duration::from_millis(200),
        retry: Duration::from_millis(100),
        // Small, so that digests, deltas and states travel in many parts under faults.
        frame_budget: 600,
    }
}

struct Node {
    presence: Presence,
    incarnation: u64,
    /// Events seen by this incarnation.
    events: Vec<PresenceEvent>,
}

struct InFlight {
    from: usize,
    to: usize,
    from_inc: u64,
    to_inc: u64,
    frame: PresenceFrame,
}

struct Sim {
    s: Scenario,
    rng: Rng,
    base: Instant,
    now_ms: u64,
    nodes: Vec<Option<Node>>,
    /// Incarnations so far per node (a restart adds one).
    incarnations: Vec<u64>,
    next_epoch: u64,
    cut_until: BTreeMap<(usize, usize), u64>,
    /// Since when each pair's link is down (for either reason).
    down_since: BTreeMap<(usize, usize), u64>,
    /// Pairs whose link was down for half of `down_after` or longer at some point.
    long_outage: BTreeSet<(usize, usize)>,
    crashed_ever: BTreeSet<usize>,
    heap: BinaryHeap<Reverse<(u64, u64)>>,
    flights: BTreeMap<u64, InFlight>,
    next_flight: u64,
    next_conn: u64,
    /// (owner, channel, key) entered at the start and never left.
    stable: Vec<(usize, ChannelName, MemberKey)>,
    /// Members that left, by (owner, owner's incarnation, channel).
    left: BTreeMap<(usize, u64, ChannelName), Vec<MemberKey>>,
    /// (owner, channel, key) of members that entered again after leaving.
    reentered: BTreeSet<(usize, ChannelName, MemberKey)>,
    all_cut: bool,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    fn new(s: Scenario, seed: u64) -> Self {
        let mut sim = Self {
            s,
            rng: Rng(seed),
            base: Instant::now(),
            now_ms: 0,
            nodes: Vec::new(),
            incarnations: vec![0; s.nodes],
            next_epoch: 1,
            cut_until: BTreeMap::new(),
            down_since: BTreeMap::new(),
            long_outage: BTreeSet::new(),
            crashed_ever: BTreeSet::new(),
            heap: BinaryHeap::new(),
            flights: BTreeMap::new(),
            next_flight: 0,
            next_conn: 0,
            stable: Vec::new(),
            left: BTreeMap::new(),
            reentered: BTreeSet::new(),
            all_cut: s.first_link,
        };
        for i in 0..s.nodes {
            let node = sim.fresh(i);
            sim.nodes.push(Some(node));
        }
        for a in 0..s.nodes {
            for b in a + 1..s.nodes {
                sim.down_since.insert((a, b), 0);
            }
        }
        sim
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.now_ms)
    }

    fn fresh(&mut self, i: usize) -> Node {
        let ids: Vec<NodeId> = (0..self.s.nodes).map(node_id).collect();
        let epoch = Epoch(self.next_epoch);
        self.next_epoch += 1;
        self.incarnations[i] += 1;
        Node {
            presence: Presence::new(node_id(i), epoch, &ids, config()),
            incarnation: self.incarnations[i],
            events: Vec::new(),
        }
    }

    fn link_up(&self, a: usize, b: usize) -> bool {
        !self.all_cut
            && self.nodes[a].is_some()
            && self.nodes[b].is_some()
            && self.cut_until.get(&pair(a, b)).is_none_or(|&t| t <= self.now_ms)
    }

    /// Tells both sides of every link whose state changed.
    fn update_links(&mut self) {
        let now = self.now();
        for a in 0..self.s.nodes {
            for b in a + 1..self.s.nodes {
                let up = self.link_up(a, b);
                let was_down = self.down_since.contains_key(&(a, b));
                if up && was_down {
                    let since = self.down_since.remove(&(a, b)).unwrap();
                    if self.now_ms - since >= DOWN_AFTER_MS / 2 && since > 0 {
                        self.long_outage.insert((a, b));
                    }
                    for (x, y) in [(a, b), (b, a)] {
                        let n = self.nodes[x].as_mut().unwrap();
                        n.presence.handle_link_up(now, &node_id(y));
                    }
                } else if !up && !was_down {
                    self.down_since.insert((a, b), self.now_ms);
                    for (x, y) in [(a, b), (b, a)] {
                        if let Some(n) = self.nodes[x].as_mut() {
                            n.presence.handle_link_down(now, &node_id(y));
                        }
                    }
                }
            }
        }
    }

    fn key(&mut self, owner: usize) -> MemberKey {
        self.next_conn += 1;
        let inc = self.incarnations[owner];
        MemberKey {
            client_id: format!("c{}", self.rng.below(20)),
            connection_id: format!("{owner}.{inc}.{}", self.next_conn),
        }
    }

    fn data(&mut self) -> Bytes {
        Bytes::from(vec![self.rng.below(4) as u8])
    }

    /// A random client operation on node `i`: enter, update or leave (never of a stable
    /// member).
    fn operate(&mut self, i: usize) {
        let ch = channel(self.rng.below(CHANNELS as u64) as usize);
        let stable: Vec<MemberKey> = self
            .stable
            .iter()
            .filter(|(o, c, _)| *o == i && *c == ch)
            .map(|(_, _, k)| k.clone())
            .collect();
        let Some(node) = self.nodes[i].as_ref() else { return };
        let own: Vec<MemberKey> = node
            .presence
            .own_members(&ch)
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| !stable.contains(k))
            .collect();
        let inc = self.incarnations[i];
        let gone = self.left.get(&(i, inc, ch.clone())).cloned().unwrap_or_default();
        if self.s.reenter && !gone.is_empty() && self.rng.chance(0.2) {
            // A connection that left enters again.
            let key = gone[self.rng.below(gone.len() as u64) as usize].clone();
            let data = self.data();
            self.left.get_mut(&(i, inc, ch.clone())).unwrap().retain(|k| *k != key);
            self.reentered.insert((i, ch.clone(), key.clone()));
            self.nodes[i].as_mut().unwrap().presence.put(&ch, key, data);
            return;
        }
        let choice = self.rng.below(3);
        if own.is_empty() || choice == 0 {
            let key = self.key(i);
            let data = self.data();
            self.nodes[i].as_mut().unwrap().presence.put(&ch, key, data);
        } else {
            let key = own[self.rng.below(own.len() as u64) as usize].clone();
            if choice == 1 {
                let data = self.data();
                self.nodes[i].as_mut().unwrap().presence.put(&ch, key, data);
            } else {
                self.nodes[i].as_mut().unwrap().presence.leave(&ch, &key).unwrap();
                self.left.entry((i, inc, ch)).or_default().push(key);
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, frame: PresenceFrame, faults: bool) {
        if faults && self.rng.chance(self.s.loss) {
            return;
        }
        let copies = if faults && self.rng.chance(self.s.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if faults && self.rng.chance(self.s.tail) {
                200 + self.rng.below(600)
            } else if faults {
                1 + self.rng.below(40)
            } else {
                1 + self.rng.below(5)
            };
            let id = self.next_flight;
            self.next_flight += 1;
            let flight = InFlight {
                from,
                to,
                from_inc: self.incarnations[from],
                to_inc: self.incarnations[to],
                frame: frame.clone(),
            };
            self.flights.insert(id, flight);
            self.heap.push(Reverse((self.now_ms + delay, id)));
        }
    }

    /// Moves frames and events until nothing more is due at this instant.
    fn pump(&mut self, faults: bool) {
        let now = self.now();
        loop {
            let mut moved = false;
            for i in 0..self.s.nodes {
                let mut out = Vec::new();
                if let Some(n) = self.nodes[i].as_mut() {
                    while let Some(e) = n.presence.poll_event() {
                        n.events.push(e);
                    }
                    while let Some(t) = n.presence.poll_transmit() {
                        out.push(t);
                    }
                }
                for (to, frame) in out {
                    moved = true;
                    let to = (0..self.s.nodes).find(|&j| node_id(j) == to).unwrap();
                    if self.link_up(i, to) {
                        self.send(i, to, frame, faults);
                    }
                }
            }
            while let Some(&Reverse((at, id))) = self.heap.peek() {
                if at > self.now_ms {
                    break;
                }
                self.heap.pop();
                moved = true;
                let f = self.flights.remove(&id).unwrap();
                let live = self.incarnations[f.from] == f.from_inc
                    && self.incarnations[f.to] == f.to_inc
                    && self.link_up(f.from, f.to);
                if live {
                    let n = self.nodes[f.to].as_mut().unwrap();
                    n.presence.handle_frame(now, &node_id(f.from), f.frame);
                }
            }
            if !moved {
                break;
            }
        }
    }

    fn tick(&mut self, chaos: bool) {
        self.now_ms += TICK_MS;
        let now = self.now();
        if chaos {
            for a in 0..self.s.nodes {
                for b in a + 1..self.s.nodes {
                    if self.rng.chance(self.s.partitions) {
                        // Short (well under down_after) or long (well over it).
                        let len = if self.rng.chance(0.5) {
                            50 + self.rng.below(DOWN_AFTER_MS / 4)
                        } else {
                            DOWN_AFTER_MS * 3 / 2 + self.rng.below(DOWN_AFTER_MS)
                        };
                        let until = self.now_ms + len;
                        let e = self.cut_until.entry((a, b)).or_insert(0);
                        *e = (*e).max(until);
                    }
                }
            }
            for i in 2..self.s.nodes {
                if self.nodes[i].is_some() && self.rng.chance(self.s.crashes) {
                    self.nodes[i] = None;
                    self.crashed_ever.insert(i);
                    self.incarnations[i] += 1;
                } else if self.nodes[i].is_none() && self.rng.chance(0.01) {
                    self.incarnations[i] -= 1;
                    let n = self.fresh(i);
                    self.nodes[i] = Some(n);
                }
            }
            for i in 0..self.s.nodes {
                if self.nodes[i].is_some() && self.rng.chance(self.s.ops) {
                    self.operate(i);
                }
            }
        }
        self.update_links();
        for n in self.nodes.iter_mut().flatten() {
            n.presence.handle_timeout(now);
        }
        self.pump(chaos);
    }

    fn run(&mut self) -> Result<(), String> {
        // Stable members: two on each of nodes 0 and 1, entered first, never left.
        for owner in [0, 1] {
            for c in 0..2 {
                let key = self.key(owner);
                let ch = channel(c);
                self.nodes[owner].as_mut().unwrap().presence.put(&ch, key.clone(), Bytes::new());
                self.stable.push((owner, ch, key));
            }
        }
        for i in 0..self.s.nodes {
            for _ in 0..self.s.initial {
                let key = self.key(i);
                let ch = channel(self.rng.below(CHANNELS as u64) as usize);
                let data = self.data();
                self.nodes[i].as_mut().unwrap().presence.put(&ch, key, data);
            }
        }
        if self.all_cut {
            // Nodes that each hold many members link for the first time.
            self.tick(true);
            self.all_cut = false;
        }
        while self.now_ms < CHAOS_MS {
            self.tick(true);
            if self.now_ms == CHAOS_MS / 2 {
                // Stable members entered mid-run, on a channel of their own: a digest
                // sent before them and delayed past their delta must not remove them.
                for owner in [0, 1] {
                    let key = self.key(owner);
                    let ch = channel(CHANNELS);
                    let n = self.nodes[owner].as_mut().unwrap();
                    n.presence.put(&ch, key.clone(), Bytes::new());
                    self.stable.push((owner, ch, key));
                }
            }
        }
        // Heal: every link up, crashed nodes stay down or come back, no more faults.
        self.cut_until.clear();
        while self.now_ms < CHAOS_MS + 2 * DOWN_AFTER_MS + 1_000 {
            self.tick(false);
        }
        self.check()
    }

    fn check(&self) -> Result<(), String> {
        // Convergence: every live node sees the live nodes' own members, nothing else.
        for c in 0..=CHANNELS {
            let ch = channel(c);
            let mut truth = BTreeSet::new();
            for (i, n) in self.nodes.iter().enumerate() {
                if let Some(n) = n {
                    for (k, d) in n.presence.own_members(&ch) {
                        truth.insert((node_id(i), k, d));
                    }
                }
            }
            for (i, n) in self.nodes.iter().enumerate() {
                let Some(n) = n else { continue };
                let seen: BTreeSet<_> = n.presence.members(&ch).into_iter().collect();
                if seen != truth {
                    let ghosts: Vec<_> = seen.difference(&truth).collect();
                    let missing: Vec<_> = truth.difference(&seen).collect();
                    return Err(format!("node {i}, {ch}: ghosts {ghosts:?}, missing {missing:?}"));
                }
            }
        }
        // Events alternate per member, at every observer incarnation; a member that left
        // never comes back (clients never re-enter with a connection that left) unless its
        // node was counted as down here.
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(n) = n else { continue };
            let mut entered: BTreeMap<(NodeId, ChannelName, MemberKey), bool> = BTreeMap::new();
            for e in &n.events {
                let owner = (0..self.s.nodes).find(|&j| node_id(j) == e.owner).unwrap();
                let k = (e.owner.clone(), e.channel.clone(), e.key.clone());
                let outage = owner == i
                    || self.long_outage.contains(&pair(i, owner))
                    || self.reentered.contains(&(owner, e.channel.clone(), e.key.clone()));
                if e.action == Action::Enter && entered.contains_key(&k) && !outage {
                    return Err(format!("node {i}: {e:?} came back after it left"));
                }
                let k = (e.owner.clone(), e.channel.clone(), e.key.clone());
                let was = entered.get(&k).copied().unwrap_or(false);
                let ok = match e.action {
                    Action::Enter => !was,
                    Action::Update | Action::Leave => was,
                };
                if !ok {
                    return Err(format!(
                        "node {i} (incarnation {}): {e:?} out of turn",
                        n.incarnation
                    ));
                }
                entered.insert(k, e.action != Action::Leave);
            }
            // And they add up to what the node shows.
            for c in 0..=CHANNELS {
                let ch = channel(c);
                let shown: BTreeSet<_> =
                    n.presence.members(&ch).into_iter().map(|(o, k, _)| (o, k)).collect();
                let from_events: BTreeSet<_> = entered
                    .iter()
                    .filter(|((_, c2, _), on)| **on && *c2 == ch)
                    .map(|((o, _, k), _)| (o.clone(), k.clone()))
                    .collect();
                if shown != from_events {
                    return Err(format!("node {i}, {ch}: events do not add up to the members"));
                }
            }
        }
        // No flapping of stable members over links never cut for long.
        for (owner, ch, key) in &self.stable {
            for (i, n) in self.nodes.iter().enumerate() {
                let Some(n) = n else { continue };
                if i == *owner || self.long_outage.contains(&pair(i, *owner)) {
                    continue;
                }
                let seen: Vec<Action> = n
                    .events
                    .iter()
                    .filter(|e| e.owner == node_id(*owner) && e.channel == *ch && e.key == *key)
                    .map(|e| e.action)
                    .collect();
                if seen != [Action::Enter] {
                    return Err(format!(
                        "node {i} saw stable member {key:?} of node {owner} on {ch} as {seen:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn seeds() -> u64 {
    std::env::var("TERN_PRESENCE_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(350)
}

#[test]
fn presence_converges_without_ghosts_or_flapping() {
    if let Ok(one) = std::env::var("TERN_PRESENCE_SEED") {
        let (name, seed) = one.split_once(':').expect("scenario:seed");
        let s = SCENARIOS.iter().find(|s| s.name == name).expect("a scenario");
        let r = Sim::new(*s, seed.parse().unwrap()).run();
        assert!(r.is_ok(), "{name}:{seed}: {}", r.unwrap_err());
        return;
    }
    let mut failures = Vec::new();
    let mut runs = 0;
    for s in SCENARIOS {
        for seed in 0..seeds() {
            runs += 1;
            if let Err(e) = Sim::new(*s, seed).run() {
                failures.push(format!("{}:{seed}: {e}", s.name));
            }
        }
    }
    eprintln!("{runs} presence runs, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{} of {runs} failed, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}
