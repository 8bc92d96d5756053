//! The replication state machine of one node.

use std::collections::{BTreeMap, BTreeSet, VecDeque, btree_map};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_proto::types::{ChannelName, Epoch, NodeId, Seq};

use super::frame::{Frame, Have, Want};

/// Replication settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Messages kept per channel in the origin log for repair and catch-up. A peer that falls
    /// further behind gets a `Gone` and reports a discontinuity.
    pub retention: usize,
    /// Most payload bytes kept in all origin logs together: past it, the oldest messages
    /// (of whichever channels) go first, so memory stays bounded however many channels are
    /// busy. A peer that needs one of them gets a `Gone`, as past `retention`.
    pub retention_bytes: usize,
    /// Timer granularity: acks, retransmissions and re-Nacks run on this tick.
    pub tick: Duration,
    /// Unacknowledged data is resent, and a gap re-Nacked, after this long without progress.
    pub rto: Duration,
    /// Most messages resent to one peer for one channel per retransmission.
    pub resend_batch: usize,
    /// Most messages of one channel in flight to one peer (sent, not yet acknowledged).
    /// Past it, new messages wait in the log and leave as acknowledgements return, so a
    /// publisher faster than the link fills the log, not the link's queues (whose overflow
    /// would cost every channel of the lane retransmissions). One channel's throughput to a
    /// peer is at most this many messages per round trip.
    pub send_window: usize,
    /// How often each peer is told this node's epoch.
    pub heartbeat: Duration,
    /// Namespaces replicated to every node whether or not it has subscribers (namespaces with
    /// history, so history and cross-region resume are served locally). `"*"` means every
    /// channel. Every node of a mesh must use the same set.
    pub replicate_all: BTreeSet<String>,
    /// How long a node keeps receiving a channel after its last local subscriber left, so a
    /// subscriber that returns (or resumes) within it misses nothing.
    pub interest_grace: Duration,
    /// Longest a new interest waits for the reachable peers' `Start` before it is reported
    /// [`Event::Ready`] anyway.
    pub interest_wait: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            retention: 10_000,
            retention_bytes: 256 << 20,
            tick: Duration::from_millis(20),
            rto: Duration::from_millis(200),
            resend_batch: 256,
            send_window: 8192,
            heartbeat: Duration::from_secs(1),
            replicate_all: BTreeSet::new(),
            interest_grace: Duration::from_secs(120),
            interest_wait: Duration::from_secs(2),
        }
    }
}

impl Config {
    /// Whether `channel` goes to every node regardless of interest.
    pub fn replicates_all(&self, channel: &ChannelName) -> bool {
        !self.replicate_all.is_empty()
            && (self.replicate_all.contains("*")
                || self.replicate_all.contains(channel.namespace()))
    }
}

/// What the core reports to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Deliver a replicated message to local subscribers. Per (origin, channel, epoch),
    /// sequences come strictly in order, each once.
    Deliver {
        /// Origin node.
        origin: NodeId,
        /// Channel.
        channel: ChannelName,
        /// Origin epoch.
        epoch: Epoch,
        /// Origin sequence.
        seq: Seq,
        /// The message.
        payload: Bytes,
    },
    /// Messages of `origin`'s `channel` after `after` in `epoch` will never be delivered
    /// (up to `through`, or, when `through` is `None`, the rest of that epoch: the origin
    /// restarted without its log).
    Discontinuity {
        /// Origin node.
        origin: NodeId,
        /// Channel.
        channel: ChannelName,
        /// The epoch the hole is in.
        epoch: Epoch,
        /// Last sequence delivered before the hole.
        after: Seq,
        /// Last sequence of the hole, if known.
        through: Option<Seq>,
    },
    /// A new interest's stream of `origin`'s `channel` begins after `after` in `epoch`:
    /// earlier messages were published before this node asked for the channel.
    Started {
        /// True when the stream started after the interest was already reported
        /// [`Event::Ready`] (the origin was unreachable then): messages it published in
        /// between, up to `after`, may have been missed by local subscribers.
        late: bool,
        /// Origin node.
        origin: NodeId,
        /// Channel.
        channel: ChannelName,
        /// Origin epoch.
        epoch: Epoch,
        /// The stream begins after this sequence.
        after: Seq,
    },
    /// Every peer confirmed this node's new interest in `channel` (peers unreachable for
    /// longer than `interest_wait` excepted), or `interest_wait` passed: anything published
    /// on a confirmed peer from now on will be delivered.
    Ready {
        /// Channel.
        channel: ChannelName,
    },
    /// A node of another region acknowledged this node's messages of `channel` up to `seq`
    /// (this epoch): they survive the loss of this region.
    Replicated {
        /// Channel.
        channel: ChannelName,
        /// Highest sequence acknowledged.
        seq: Seq,
    },
}

/// Holds an out-of-order frame until the gap before it is filled. At most `max` frames are
/// held per stream (an origin retains no more than its retention for repair, so a correct
/// peer never runs further ahead): when full, the frame furthest ahead gives way to an
/// earlier one, and frames beyond the furthest are dropped. A peer sending impossible
/// sequence numbers (far ahead, `u64::MAX`) costs bounded memory; whatever was dropped is
/// not acknowledged, so a correct origin sends it again.
fn hold(held: &mut BTreeMap<u64, Bytes>, seq: u64, payload: Bytes, max: usize) {
    if held.contains_key(&seq) {
        return;
    }
    if held.len() >= max.max(1) {
        match held.last_key_value() {
            Some((&last, _)) if last > seq => {
                held.pop_last();
            }
            _ => return,
        }
    }
    held.insert(seq, payload);
}

/// An origin log: the node's own messages of one channel, the last `retention` kept.
#[derive(Debug, Clone, Default)]
struct OriginLog {
    /// Last sequence assigned.
    last: u64,
    /// Retained messages, contiguous, ending at `last`.
    entries: VecDeque<(u64, Bytes)>,
}

impl OriginLog {
    fn first_retained(&self) -> u64 {
        self.entries.front().map_or(self.last + 1, |(s, _)| *s)
    }

    fn get(&self, seq: u64) -> Option<&Bytes> {
        let first = self.first_retained();
        if seq < first || seq > self.last {
            return None;
        }
        self.entries.get((seq - first) as usize).map(|(_, b)| b)
    }
}

/// The byte budget of all origin logs: which message of which channel is oldest.
#[derive(Debug, Clone, Default)]
struct LogBudget {
    /// (channel, seq) of every logged message in publish order; entries whose message a
    /// channel's own `retention` already dropped stay until compacted.
    order: VecDeque<(ChannelName, u64)>,
    /// Payload bytes held by all logs.
    bytes: usize,
    /// Messages held by all logs.
    held: usize,
}

/// Receive state for one (origin, channel).
#[derive(Debug, Clone)]
struct Recv {
    epoch: Epoch,
    delivered: u64,
    /// Out-of-order messages waiting for the gap before them (or, before the stream
    /// started, for the origin's `Start`).
    held: BTreeMap<u64, Bytes>,
    last_nack: Option<Instant>,
    /// False while an interest waits for the origin's `Start`.
    started: bool,
    /// When the pending interest was last sent to the origin.
    asked: Option<Instant>,
}

impl Recv {
    fn started(epoch: Epoch, delivered: u64) -> Self {
        Self {
            epoch,
            delivered,
            held: BTreeMap::new(),
            last_nack: None,
            started: true,
            asked: None,
        }
    }

    fn pending(asked: Option<Instant>) -> Self {
        Self { started: false, asked, ..Self::started(Epoch(0), 0) }
    }
}

/// What one peer receives of one of this node's channels.
#[derive(Debug, Clone)]
struct Out {
    /// Delivered by the peer (current epoch), as far as its acks tell.
    acked: u64,
    /// When the peer last made progress, or data was last sent.
    progress_at: Instant,
    /// The peer's interest generation (0 for replicate-all channels).
    generation: u64,
    /// Where its stream started (the `Start` reply).
    start: u64,
    /// Timer retransmissions since the last progress: each doubles the wait (backoff), so
    /// a slow or congested link is not flooded with copies.
    retries: u32,
    /// Highest sequence sent at least once (at least `acked`).
    sent: u64,
}

impl Out {
    /// A stream to a peer that has everything up to `acked`.
    fn new(acked: u64, generation: u64, now: Instant) -> Self {
        Self { acked, progress_at: now, generation, start: acked, retries: 0, sent: acked }
    }
}

/// Per-peer link state (for this node's own channels).
#[derive(Debug, Clone, Default)]
struct Link {
    up: bool,
    /// The peer's `Hello` arrived since the link came up.
    greeted: bool,
    /// When the link went down (`None` while up, or if it never was).
    down_since: Option<Instant>,
    /// The link's round-trip time, as the transport measures it.
    rtt: Duration,
    /// The peer's epoch, once heard. A change means it lost its state.
    peer_epoch: Option<Epoch>,
    /// The channels the peer receives from this node, with its progress.
    out: BTreeMap<ChannelName, Out>,
}

impl Link {
    /// How long to wait for progress before repeating a frame: the configured `rto`, and at
    /// least twice the measured round trip.
    fn rto(&self, config: &Config) -> Duration {
        config.rto.max(self.rtt * 2)
    }
}

/// The channels this node receives from its peers.
#[derive(Debug, Clone)]
struct Interest {
    generation: u64,
    /// Set once the last local subscriber left: withdraw at this time.
    withdraw_at: Option<Instant>,
    /// Set while waiting for peers' `Start`: report ready at this time at the latest.
    ready_by: Option<Instant>,
}

/// The state that survives a restart when the node keeps its log.
#[derive(Debug, Clone)]
pub struct Persisted {
    epoch: Epoch,
    logs: BTreeMap<ChannelName, OriginLog>,
    positions: BTreeMap<(NodeId, ChannelName), (Epoch, u64)>,
    generation: u64,
}

/// The replication core of one node. See the module docs for the data path.
#[derive(Debug)]
pub struct Replica {
    me: NodeId,
    epoch: Epoch,
    config: Config,
    logs: BTreeMap<ChannelName, OriginLog>,
    budget: LogBudget,
    recv: BTreeMap<(NodeId, ChannelName), Recv>,
    links: BTreeMap<NodeId, Link>,
    /// Channels this node asked its peers for (replicate-all ones are not listed).
    interest: BTreeMap<ChannelName, Interest>,
    /// Last interest generation issued.
    generation: u64,
    /// Peers that sent data of channels this node does not want: tell them again.
    withdraw_due: BTreeSet<(NodeId, ChannelName)>,
    /// (origin, channel) whose progress has not been acknowledged yet.
    ack_due: BTreeSet<(NodeId, ChannelName)>,
    next_tick: Option<Instant>,
    last_heartbeat: Option<Instant>,
    /// The first time anything happened (links never up count as down since then).
    born: Option<Instant>,
    transmit: VecDeque<(NodeId, Frame)>,
    events: VecDeque<Event>,
}

impl Replica {
    /// A node with no history, in `epoch` (epochs must grow across restarts: use the start
    /// time). `peers` are the other nodes of the mesh.
    pub fn new(me: NodeId, epoch: Epoch, peers: &[NodeId], config: Config) -> Self {
        let links =
            peers.iter().filter(|p| **p != me).map(|p| (p.clone(), Link::default())).collect();
        Self {
            me,
            epoch,
            config,
            logs: BTreeMap::new(),
            budget: LogBudget::default(),
            recv: BTreeMap::new(),
            links,
            interest: BTreeMap::new(),
            generation: 0,
            withdraw_due: BTreeSet::new(),
            ack_due: BTreeSet::new(),
            next_tick: None,
            last_heartbeat: None,
            born: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// A node restarted with its log: same epoch, sequences continue, positions of
    /// replicate-all channels kept (a restarted node has no local subscribers, so it holds
    /// no interest).
    pub fn restore(me: NodeId, peers: &[NodeId], config: Config, state: Persisted) -> Self {
        let mut r = Self::new(me, state.epoch, peers, config);
        r.logs = state.logs;
        // Oldest first across channels is unknown after a restore: by sequence, channel
        // after channel, is a fair approximation.
        let mut entries: Vec<(u64, ChannelName)> = Vec::new();
        for (channel, log) in &r.logs {
            for (seq, payload) in &log.entries {
                r.budget.bytes += payload.len();
                r.budget.held += 1;
                entries.push((*seq, channel.clone()));
            }
        }
        entries.sort();
        r.budget.order = entries.into_iter().map(|(seq, c)| (c, seq)).collect();
        r.trim_logs();
        r.generation = state.generation;
        r.recv = state
            .positions
            .into_iter()
            .filter(|((_, channel), _)| r.config.replicates_all(channel))
            .map(|(k, (epoch, delivered))| (k, Recv::started(epoch, delivered)))
            .collect();
        r
    }

    /// The durable part of the state (what a node writes to its log).
    pub fn persisted(&self) -> Persisted {
        Persisted {
            epoch: self.epoch,
            logs: self.logs.clone(),
            positions: self
                .recv
                .iter()
                .filter(|(_, r)| r.started)
                .map(|(k, r)| (k.clone(), (r.epoch, r.delivered)))
                .collect(),
            generation: self.generation,
        }
    }

    /// This node's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Sequences a local publish and sends it to every reachable peer that wants the
    /// channel. Returns its sequence.
    pub fn publish(&mut self, now: Instant, channel: ChannelName, payload: Bytes) -> Seq {
        let retention = self.config.retention.max(1);
        // The budget keeps the log's own key: entries of one channel share one allocation,
        // which lets its compaction skip repeated lookups.
        let (key, log) = match self.logs.entry(channel.clone()) {
            btree_map::Entry::Occupied(o) => (o.key().clone(), o.into_mut()),
            btree_map::Entry::Vacant(v) => (v.key().clone(), v.insert(OriginLog::default())),
        };
        log.last += 1;
        let seq = log.last;
        log.entries.push_back((seq, payload.clone()));
        self.budget.bytes += payload.len();
        self.budget.held += 1;
        self.budget.order.push_back((key, seq));
        while log.entries.len() > retention {
            if let Some((_, old)) = log.entries.pop_front() {
                self.budget.bytes -= old.len();
                self.budget.held -= 1;
            }
        }
        self.trim_logs();
        let frame = self.data(&channel, seq, payload);
        let all = self.config.replicates_all(&channel);
        let window = self.config.send_window.max(1) as u64;
        for (peer, link) in &mut self.links {
            if !link.up {
                continue;
            }
            let Some(out) = out_for(link, &channel, all, now) else { continue };
            // A peer that was caught up starts its retransmission clock now; one still
            // behind keeps its older clock, so the repair continues on time.
            if out.acked + 1 >= seq {
                out.progress_at = now;
            }
            // Only the next message, within the window: anything else leaves in order as
            // acknowledgements return (see `Replica::fill`).
            if out.sent + 1 != seq || seq > out.acked + window {
                continue;
            }
            out.sent = seq;
            self.transmit.push_back((peer.clone(), frame.clone()));
        }
        self.arm(now);
        Seq(seq)
    }

    /// Drops the oldest logged messages while the logs hold more than `retention_bytes`,
    /// and forgets budget entries of messages a channel's `retention` already dropped once
    /// they outnumber the live ones (amortised O(1) per publish).
    fn trim_logs(&mut self) {
        let budget = &mut self.budget;
        while budget.bytes > self.config.retention_bytes {
            let Some((channel, seq)) = budget.order.pop_front() else { break };
            let Some(log) = self.logs.get_mut(&channel) else { continue };
            // Per channel the order is the log's own order: a live entry is its front.
            if log.entries.front().is_some_and(|(s, _)| *s == seq) {
                if let Some((_, old)) = log.entries.pop_front() {
                    budget.bytes -= old.len();
                    budget.held -= 1;
                }
            }
        }
        if budget.order.len() > 2 * budget.held + 1024 {
            let logs = &self.logs;
            // Runs of one channel share its key's allocation: one lookup per run. (Every
            // entry holds its key alive during the pass, so an address is never reused.)
            let mut run: Option<(*const u8, u64)> = None;
            budget.order.retain(|(c, seq)| {
                let at = c.as_str().as_ptr();
                let first = match run {
                    Some((p, first)) if p == at => first,
                    _ => {
                        let first = logs.get(c).map_or(u64::MAX, OriginLog::first_retained);
                        run = Some((at, first));
                        first
                    }
                };
                *seq >= first
            });
        }
    }

    /// Messages of this node's channels that peers whose links are up want and have not
    /// acknowledged yet (a graceful shutdown waits for this to reach 0).
    pub fn unacknowledged(&self) -> u64 {
        self.links
            .values()
            .filter(|l| l.up)
            .flat_map(|l| &l.out)
            .map(|(channel, out)| {
                self.logs.get(channel).map_or(0, |log| log.last.saturating_sub(out.acked))
            })
            .sum()
    }

    /// Payload bytes and messages the origin logs hold now.
    pub fn log_usage(&self) -> (usize, usize) {
        (self.budget.bytes, self.budget.held)
    }

    /// A local subscriber needs `channel`: ask every peer for it (idempotent; cancels a
    /// pending withdrawal). Returns true when it is already flowing; otherwise
    /// [`Event::Ready`] follows once the reachable peers confirmed.
    pub fn add_interest(&mut self, now: Instant, channel: &ChannelName) -> bool {
        if self.config.replicates_all(channel) {
            return true;
        }
        if let Some(i) = self.interest.get_mut(channel) {
            i.withdraw_at = None;
            return i.ready_by.is_none();
        }
        self.generation += 1;
        let generation = self.generation;
        self.arm(now);
        let mut wait = false;
        for (peer, link) in &self.links {
            let asked = link.up.then_some(now);
            self.recv.insert((peer.clone(), channel.clone()), Recv::pending(asked));
            wait |= !self.written_off(link, now);
            if link.up {
                let frame =
                    Frame::Interest { channel: channel.clone(), generation, withdraw: false };
                self.transmit.push_back((peer.clone(), frame));
            }
        }
        let ready_by = wait.then(|| now + self.config.interest_wait);
        self.interest.insert(channel.clone(), Interest { generation, withdraw_at: None, ready_by });
        !wait
    }

    /// A peer that has been unreachable for longer than `interest_wait` (or since this node
    /// started): new interests do not wait for it. When it returns, its streams start late
    /// ([`Event::Started`] with `late`).
    fn written_off(&self, link: &Link, now: Instant) -> bool {
        !link.up
            && link
                .down_since
                .or(self.born)
                .is_some_and(|t| now.saturating_duration_since(t) >= self.config.interest_wait)
    }

    /// The last local subscriber of `channel` left: withdraw from peers after the grace
    /// period unless [`Replica::add_interest`] comes first.
    pub fn remove_interest(&mut self, now: Instant, channel: &ChannelName) {
        if let Some(i) = self.interest.get_mut(channel) {
            i.withdraw_at = Some(now + self.config.interest_grace);
            self.arm(now);
        }
    }

    /// Whether this node currently receives `channel` from its peers.
    pub fn has_interest(&self, channel: &ChannelName) -> bool {
        self.config.replicates_all(channel) || self.interest.contains_key(channel)
    }

    fn data(&self, channel: &ChannelName, seq: u64, payload: Bytes) -> Frame {
        Frame::Data {
            origin: self.me.clone(),
            epoch: self.epoch,
            channel: channel.clone(),
            seq: Seq(seq),
            payload,
        }
    }

    fn arm(&mut self, now: Instant) {
        self.born.get_or_insert(now);
        if self.next_tick.is_none() {
            self.next_tick = Some(now + self.config.tick);
        }
    }

    /// The peers whose links are up.
    pub fn linked(&self) -> Vec<NodeId> {
        self.links.iter().filter(|(_, l)| l.up).map(|(p, _)| p.clone()).collect()
    }

    /// The transport reports that the link to `peer` is up (connected, or reconnected).
    pub fn handle_link_up(&mut self, now: Instant, peer: &NodeId) {
        let Some(link) = self.links.get_mut(peer) else { return };
        link.up = true;
        link.greeted = false;
        link.down_since = None;
        self.send_hello(now, peer);
        self.arm(now);
    }

    /// Tells `peer` this node's epoch and what it wants of the peer's channels.
    fn send_hello(&mut self, now: Instant, peer: &NodeId) {
        let mut have = Vec::new();
        let mut want = Vec::new();
        for ((origin, channel), r) in &mut self.recv {
            if origin != peer {
                continue;
            }
            let generation = self.interest.get(channel).map_or(0, |i| i.generation);
            if r.started {
                have.push(Have {
                    channel: channel.clone(),
                    epoch: r.epoch,
                    delivered: Seq(r.delivered),
                    generation,
                });
            } else {
                r.asked = Some(now);
                want.push(Want { channel: channel.clone(), generation });
            }
        }
        self.transmit.push_back((peer.clone(), Frame::Hello { epoch: self.epoch, have, want }));
    }

    /// The transport reports the link's measured round-trip time. Retransmission and
    /// re-request timers wait at least twice this long (and `Config::rto`).
    pub fn set_link_rtt(&mut self, peer: &NodeId, rtt: Duration) {
        if let Some(link) = self.links.get_mut(peer) {
            link.rtt = rtt;
        }
    }

    fn rto(&self, peer: &NodeId) -> Duration {
        self.links.get(peer).map_or(self.config.rto, |l| l.rto(&self.config))
    }

    /// The transport reports that the link to `peer` is down.
    pub fn handle_link_down(&mut self, now: Instant, peer: &NodeId) {
        if let Some(link) = self.links.get_mut(peer) {
            if link.up {
                link.down_since = Some(now);
            }
            link.up = false;
        }
        self.arm(now);
    }

    /// A frame arrived from `from`.
    pub fn handle_frame(&mut self, now: Instant, from: &NodeId, frame: Frame) {
        if !self.links.contains_key(from) {
            return; // not a peer of this mesh
        }
        self.arm(now);
        match frame {
            Frame::Hello { epoch, have, want } => self.on_hello(now, from, epoch, have, want),
            Frame::Heartbeat { epoch, greeted } => {
                self.on_peer_epoch(from, epoch);
                if !greeted && self.links.get(from).is_some_and(|l| l.up) {
                    self.send_hello(now, from); // ours was lost
                }
            }
            Frame::Data { origin, epoch, channel, seq, payload } => {
                if origin != self.me {
                    self.on_data(now, origin, epoch, channel, seq.0, payload);
                }
            }
            Frame::Ack { channel, epoch, seq } => {
                if epoch == self.epoch {
                    let all = self.config.replicates_all(&channel);
                    let link = self.links.get_mut(from).expect("checked above");
                    if let Some(out) = out_for(link, &channel, all, now) {
                        if seq.0 > out.acked {
                            out.acked = seq.0;
                            out.progress_at = now;
                            out.retries = 0;
                            self.fill(from, &channel);
                            if from.region() != self.me.region() {
                                self.events.push_back(Event::Replicated { channel, seq });
                            }
                        }
                    }
                }
            }
            Frame::Nack { channel, epoch, from: first, to } => {
                if epoch == self.epoch {
                    let window = self.config.send_window.max(1) as u64;
                    let to = to.0.min(first.0.saturating_add(window - 1));
                    self.resend(from, &channel, first.0, to);
                }
            }
            Frame::Gone { channel, epoch, through } => {
                self.on_gone(from, channel, epoch, through.0)
            }
            Frame::Interest { channel, generation, withdraw } => {
                self.on_interest(now, from, channel, generation, withdraw)
            }
            Frame::Start { channel, epoch, after, generation } => {
                self.on_start(now, from, channel, epoch, after.0, generation)
            }
        }
    }

    /// A peer announced its epoch: if it is newer than what we hold of its channels, it
    /// restarted without its log, and what we hold of its old epoch is finished.
    fn on_peer_epoch(&mut self, from: &NodeId, epoch: Epoch) {
        if let Some(link) = self.links.get_mut(from) {
            if link.peer_epoch.is_some_and(|e| e != epoch) {
                // It lost what it had of our channels, and its interest: its Hello says
                // what it wants now.
                link.out.clear();
            }
            link.peer_epoch = Some(epoch);
        }
        let stale: Vec<ChannelName> = self
            .recv
            .iter()
            .filter(|((origin, _), r)| origin == from && r.started && r.epoch < epoch)
            .map(|((_, c), _)| c.clone())
            .collect();
        for channel in stale {
            self.new_epoch(from.clone(), channel, epoch);
        }
    }

    fn on_hello(
        &mut self,
        now: Instant,
        from: &NodeId,
        epoch: Epoch,
        have: Vec<Have>,
        want: Vec<Want>,
    ) {
        self.on_peer_epoch(from, epoch);
        if let Some(link) = self.links.get_mut(from) {
            link.greeted = true;
        }
        let my_epoch = self.epoch;
        let last = |logs: &BTreeMap<ChannelName, OriginLog>, c: &ChannelName| {
            logs.get(c).map_or(0, |l| l.last)
        };
        // Merged into what the peer already asked for: an `Interest` sent after this Hello
        // may have overtaken it. (Interests the peer dropped while the link was down are
        // withdrawn again when their data reaches it.)
        let link = self.links.get_mut(from).expect("checked by caller");
        let mut starts = Vec::new();
        for h in have {
            if link.out.get(&h.channel).is_some_and(|o| o.generation > h.generation) {
                continue;
            }
            // A position in an older epoch of ours: we lost that log; start from 1.
            let acked = if h.epoch == my_epoch {
                h.delivered.0.min(last(&self.logs, &h.channel))
            } else {
                0
            };
            link.out.insert(h.channel, Out::new(acked, h.generation, now));
        }
        for w in want {
            let after = match link.out.get(&w.channel) {
                Some(o) if o.generation > w.generation => continue,
                Some(o) if o.generation == w.generation => o.start,
                _ => {
                    let after = last(&self.logs, &w.channel);
                    link.out.insert(w.channel.clone(), Out::new(after, w.generation, now));
                    after
                }
            };
            starts.push(Frame::Start {
                channel: w.channel,
                epoch: my_epoch,
                after: Seq(after),
                generation: w.generation,
            });
        }
        for channel in self.logs.keys() {
            if self.config.replicates_all(channel) && !link.out.contains_key(channel) {
                link.out.insert(channel.clone(), Out::new(0, 0, now));
            }
        }
        // Whatever was in flight when the link dropped is lost: send again from each
        // peer position.
        for o in link.out.values_mut() {
            o.sent = o.acked;
        }
        let behind: Vec<ChannelName> = link
            .out
            .iter()
            .filter(|(c, o)| o.acked < last(&self.logs, c))
            .map(|(c, _)| c.clone())
            .collect();
        self.transmit.extend(starts.into_iter().map(|f| (from.clone(), f)));
        for channel in behind {
            self.fill(from, &channel);
        }
    }

    fn on_interest(
        &mut self,
        now: Instant,
        from: &NodeId,
        channel: ChannelName,
        generation: u64,
        withdraw: bool,
    ) {
        let all = self.config.replicates_all(&channel);
        let after = self.logs.get(&channel).map_or(0, |l| l.last);
        let epoch = self.epoch;
        let link = self.links.get_mut(from).expect("checked by caller");
        if withdraw {
            if !all && link.out.get(&channel).is_some_and(|o| generation >= o.generation) {
                link.out.remove(&channel);
            }
            return;
        }
        let start = match link.out.get(&channel) {
            Some(o) if o.generation > generation => return, // stale: a newer interest is being answered
            Some(o) if o.generation == generation => o.start, // a repeat: same answer
            _ => {
                link.out.insert(channel.clone(), Out::new(after, generation, now));
                after
            }
        };
        let frame = Frame::Start { channel, epoch, after: Seq(start), generation };
        self.transmit.push_back((from.clone(), frame));
    }

    fn on_start(
        &mut self,
        now: Instant,
        origin: &NodeId,
        channel: ChannelName,
        epoch: Epoch,
        after: u64,
        generation: u64,
    ) {
        if self.interest.get(&channel).is_none_or(|i| i.generation != generation) {
            return; // an answer to an interest already withdrawn or replaced
        }
        let key = (origin.clone(), channel.clone());
        let r = self.recv.entry(key.clone()).or_insert_with(|| Recv::pending(None));
        if r.started {
            return;
        }
        if r.epoch != epoch {
            r.held.clear(); // held frames of another epoch
        }
        r.epoch = epoch;
        r.delivered = after;
        r.started = true;
        r.asked = None;
        r.held = r.held.split_off(&(after + 1));
        let late = self.interest.get(&channel).is_some_and(|i| i.ready_by.is_none());
        self.events.push_back(Event::Started {
            origin: origin.clone(),
            channel: channel.clone(),
            epoch,
            after: Seq(after),
            late,
        });
        self.drain(&key);
        self.nack_gap(now, &key);
        self.check_ready(now, &channel);
    }

    /// Reports [`Event::Ready`] for a pending interest once every peer not written off
    /// started its stream.
    fn check_ready(&mut self, now: Instant, channel: &ChannelName) {
        if self.interest.get(channel).is_none_or(|i| i.ready_by.is_none()) {
            return;
        }
        let all_started = self.links.iter().all(|(peer, link)| {
            self.written_off(link, now)
                || self.recv.get(&(peer.clone(), channel.clone())).is_some_and(|r| r.started)
        });
        if all_started {
            let i = self.interest.get_mut(channel).expect("checked above");
            i.ready_by = None;
            self.events.push_back(Event::Ready { channel: channel.clone() });
        }
    }

    /// Sends `peer` the messages of `channel` it has not been sent yet, as far as its window
    /// allows: what publishes held back, or a catch-up after the link returned.
    fn fill(&mut self, peer: &NodeId, channel: &ChannelName) {
        let window = self.config.send_window.max(1) as u64;
        let Some(log) = self.logs.get(channel) else { return };
        let Some(out) = self.links.get_mut(peer).and_then(|l| l.out.get_mut(channel)) else {
            return;
        };
        let first = out.sent.max(out.acked) + 1;
        let last = log.last.min(out.acked + window);
        if first > last {
            return;
        }
        out.sent = last;
        self.resend(peer, channel, first, last);
    }

    /// Sends `first..=last` of `channel` to `peer` from the log; what the log no longer holds
    /// is announced with `Gone`.
    fn resend(&mut self, peer: &NodeId, channel: &ChannelName, first: u64, last: u64) {
        let Some(log) = self.logs.get(channel) else { return };
        let last = last.min(log.last);
        if first > last {
            return;
        }
        let retained = log.first_retained();
        let mut frames = Vec::new();
        if first < retained {
            frames.push(Frame::Gone {
                channel: channel.clone(),
                epoch: self.epoch,
                through: Seq(retained - 1),
            });
        }
        for seq in first.max(retained)..=last {
            if let Some(p) = log.get(seq) {
                frames.push(self.data(channel, seq, p.clone()));
            }
        }
        self.transmit.extend(frames.into_iter().map(|f| (peer.clone(), f)));
    }

    fn new_epoch(&mut self, origin: NodeId, channel: ChannelName, epoch: Epoch) {
        let key = (origin.clone(), channel.clone());
        if let Some(old) = self.recv.remove(&key) {
            if old.started {
                self.events.push_back(Event::Discontinuity {
                    origin,
                    channel,
                    epoch: old.epoch,
                    after: Seq(old.delivered),
                    through: None,
                });
            }
        }
        self.recv.insert(key, Recv::started(epoch, 0));
    }

    fn on_data(
        &mut self,
        now: Instant,
        origin: NodeId,
        epoch: Epoch,
        channel: ChannelName,
        seq: u64,
        payload: Bytes,
    ) {
        let key = (origin.clone(), channel.clone());
        match self.recv.get_mut(&key) {
            None if self.config.replicates_all(&channel) => {
                self.recv.insert(key.clone(), Recv::started(epoch, 0));
            }
            None => {
                // Not wanted (a withdrawal the origin has not seen yet): say it again.
                self.withdraw_due.insert(key);
                return;
            }
            Some(r) if !r.started => {
                // Hold until the origin's Start says where the stream begins.
                if r.epoch != epoch {
                    if epoch < r.epoch {
                        return;
                    }
                    r.held.clear();
                    r.epoch = epoch;
                }
                hold(&mut r.held, seq, payload, self.config.retention);
                return;
            }
            Some(r) if r.epoch < epoch => self.new_epoch(origin.clone(), channel.clone(), epoch),
            Some(r) if r.epoch > epoch => return, // a frame of an epoch already left behind
            Some(_) => {}
        }
        self.ack_due.insert(key.clone());
        let r = self.recv.get_mut(&key).expect("inserted above");
        if seq <= r.delivered || r.held.contains_key(&seq) {
            return; // duplicate: the ack above tells the origin
        }
        hold(&mut r.held, seq, payload, self.config.retention);
        self.drain(&key);
        self.nack_gap(now, &key);
    }

    /// Asks the origin for the gap before the first held message (at most once per rto).
    fn nack_gap(&mut self, now: Instant, key: &(NodeId, ChannelName)) {
        let rto = self.rto(&key.0);
        let Some(r) = self.recv.get_mut(key) else { return };
        let Some((&first_held, _)) = r.held.iter().next() else { return };
        if r.last_nack.is_none_or(|t| now.duration_since(t) >= rto) {
            r.last_nack = Some(now);
            let nack = Frame::Nack {
                channel: key.1.clone(),
                epoch: r.epoch,
                from: Seq(r.delivered + 1),
                to: Seq(first_held - 1),
            };
            self.transmit.push_back((key.0.clone(), nack));
        }
    }

    /// Delivers held messages that are next in sequence.
    fn drain(&mut self, key: &(NodeId, ChannelName)) {
        let Some(r) = self.recv.get_mut(key) else { return };
        while let Some(entry) = r.held.first_entry() {
            if *entry.key() != r.delivered + 1 {
                break;
            }
            let (seq, payload) = entry.remove_entry();
            r.delivered = seq;
            r.last_nack = None;
            self.events.push_back(Event::Deliver {
                origin: key.0.clone(),
                channel: key.1.clone(),
                epoch: r.epoch,
                seq: Seq(seq),
                payload,
            });
        }
    }

    fn on_gone(&mut self, origin: &NodeId, channel: ChannelName, epoch: Epoch, through: u64) {
        let key = (origin.clone(), channel.clone());
        if !self.recv.contains_key(&key) {
            if !self.config.replicates_all(&channel) {
                return;
            }
            self.recv.insert(key.clone(), Recv::started(epoch, 0));
        }
        let r = self.recv.get_mut(&key).expect("inserted above");
        if !r.started || r.epoch != epoch || r.delivered >= through {
            return;
        }
        self.events.push_back(Event::Discontinuity {
            origin: origin.clone(),
            channel,
            epoch,
            after: Seq(r.delivered),
            through: Some(Seq(through)),
        });
        r.delivered = through;
        r.held = r.held.split_off(&(through + 1));
        self.ack_due.insert(key.clone());
        self.drain(&key);
    }

    /// Acknowledges what was delivered since the last acks (one frame per origin and
    /// channel). Runs on every tick; a driver may also call it after each batch of received
    /// frames so origins learn sooner (publishers waiting for replication).
    pub fn send_acks(&mut self) {
        for (origin, channel) in std::mem::take(&mut self.ack_due) {
            if let Some(r) = self.recv.get(&(origin.clone(), channel.clone())) {
                if r.started && self.links.get(&origin).is_some_and(|l| l.up) {
                    let ack = Frame::Ack { channel, epoch: r.epoch, seq: Seq(r.delivered) };
                    self.transmit.push_back((origin, ack));
                }
            }
        }
    }

    /// Time passed: send due acks, retransmit what peers have not acknowledged, re-Nack gaps,
    /// repeat unanswered interests, withdraw interests whose grace ended.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.next_tick {
            Some(t) if now >= t => self.next_tick = Some(now + self.config.tick),
            _ => return,
        }
        if self.last_heartbeat.is_none_or(|t| now.duration_since(t) >= self.config.heartbeat) {
            self.last_heartbeat = Some(now);
            for (peer, link) in &self.links {
                if link.up {
                    let frame = Frame::Heartbeat { epoch: self.epoch, greeted: link.greeted };
                    self.transmit.push_back((peer.clone(), frame));
                }
            }
        }
        self.interest_timers(now);
        self.send_acks();
        let mut resends = Vec::new();
        for (peer, link) in &mut self.links {
            if !link.up {
                continue;
            }
            let rto = link.rto(&self.config);
            for (channel, out) in &mut link.out {
                let Some(log) = self.logs.get(channel) else { continue };
                if out.acked >= log.last {
                    continue;
                }
                if now.duration_since(out.progress_at) >= rto * (1 << out.retries) {
                    out.progress_at = now;
                    out.retries = (out.retries + 1).min(3);
                    let last = log.last.min(out.acked + self.config.resend_batch as u64);
                    out.sent = out.sent.max(last);
                    resends.push((peer.clone(), channel.clone(), out.acked + 1, last));
                }
            }
            // Replicate-all channels the peer has not acknowledged anything of yet.
            for (channel, log) in &self.logs {
                if log.last > 0
                    && !link.out.contains_key(channel)
                    && self.config.replicates_all(channel)
                {
                    link.out.insert(channel.clone(), Out::new(0, 0, now));
                }
            }
        }
        for (peer, channel, first, last) in resends {
            self.resend(&peer, &channel, first, last);
        }
        let mut nacks = Vec::new();
        for ((origin, channel), r) in &mut self.recv {
            if !r.started {
                continue;
            }
            let Some((&first_held, _)) = r.held.iter().next() else { continue };
            let Some(link) = self.links.get(origin).filter(|l| l.up) else { continue };
            let rto = link.rto(&self.config);
            if r.last_nack.is_none_or(|t| now.duration_since(t) >= rto) {
                r.last_nack = Some(now);
                let nack = Frame::Nack {
                    channel: channel.clone(),
                    epoch: r.epoch,
                    from: Seq(r.delivered + 1),
                    to: Seq(first_held - 1),
                };
                nacks.push((origin.clone(), nack));
            }
        }
        self.transmit.extend(nacks);
    }

    fn interest_timers(&mut self, now: Instant) {
        // Withdrawals whose grace ended.
        let ended: Vec<ChannelName> = self
            .interest
            .iter()
            .filter(|(_, i)| i.withdraw_at.is_some_and(|t| now >= t))
            .map(|(c, _)| c.clone())
            .collect();
        for channel in ended {
            self.interest.remove(&channel);
            self.recv.retain(|(_, c), _| *c != channel);
            self.ack_due.retain(|(_, c)| *c != channel);
            for (peer, link) in &self.links {
                if link.up {
                    let frame = Frame::Interest {
                        channel: channel.clone(),
                        generation: self.generation,
                        withdraw: true,
                    };
                    self.transmit.push_back((peer.clone(), frame));
                }
            }
        }
        for (origin, channel) in std::mem::take(&mut self.withdraw_due) {
            if !self.has_interest(&channel) && self.links.get(&origin).is_some_and(|l| l.up) {
                let frame =
                    Frame::Interest { channel, generation: self.generation, withdraw: true };
                self.transmit.push_back((origin, frame));
            }
        }
        // Interests not answered yet.
        for ((origin, channel), r) in &mut self.recv {
            let Some(link) = self.links.get(origin).filter(|l| l.up) else { continue };
            let rto = link.rto(&self.config);
            if r.started || r.asked.is_some_and(|t| now.duration_since(t) < rto) {
                continue;
            }
            let Some(i) = self.interest.get(channel) else { continue };
            r.asked = Some(now);
            let frame = Frame::Interest {
                channel: channel.clone(),
                generation: i.generation,
                withdraw: false,
            };
            self.transmit.push_back((origin.clone(), frame));
        }
        // Interests that waited long enough.
        for (channel, i) in &mut self.interest {
            if i.ready_by.is_some_and(|t| now >= t) {
                i.ready_by = None;
                self.events.push_back(Event::Ready { channel: channel.clone() });
            }
        }
    }

    /// When `handle_timeout` wants to be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<(NodeId, Frame)> {
        self.transmit.pop_front()
    }

    /// The next event for the node.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

/// What `link`'s peer receives of `channel`: its interest entry, or a fresh one for a
/// replicate-all channel (`all`); `None` when the peer does not want the channel.
fn out_for<'a>(
    link: &'a mut Link,
    channel: &ChannelName,
    all: bool,
    now: Instant,
) -> Option<&'a mut Out> {
    if !all {
        return link.out.get_mut(channel);
    }
    Some(link.out.entry(channel.clone()).or_insert(Out::new(0, 0, now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many busy channels hold at most `retention_bytes` together; the newest messages stay,
    /// the budget's bookkeeping stays proportional to what is held, and a peer asking for a
    /// trimmed message is told it is gone.
    #[test]
    fn origin_logs_keep_to_their_byte_budget() {
        let a = NodeId::parse("eu-west/edge-1").unwrap();
        let b = NodeId::parse("us-east/edge-1").unwrap();
        let config = Config { retention_bytes: 64 << 10, ..Config::default() };
        let now = Instant::now();
        let mut r = Replica::new(a, Epoch(1), std::slice::from_ref(&b), config);
        let payload = Bytes::from(vec![7u8; 1000]);
        for round in 0..200 {
            for c in 0..50 {
                let channel = ChannelName::parse(&format!("chat:{c}")).unwrap();
                r.publish(now, channel, payload.clone());
            }
            let (bytes, held) = r.log_usage();
            assert!(bytes <= 64 << 10, "round {round}: {bytes} bytes held");
            assert!(r.budget.order.len() <= 2 * held + 1024);
        }
        let (bytes, held) = r.log_usage();
        assert_eq!((bytes, held), (65_000, 65), "the newest 65 messages fill the budget");
        // The last round's 50 messages and 15 of the one before are kept.
        let last = ChannelName::parse("chat:49").unwrap();
        assert_eq!(r.logs[&last].first_retained(), 199);
        let first = ChannelName::parse("chat:0").unwrap();
        assert_eq!(r.logs[&first].first_retained(), 200);
        r.handle_link_up(now, &b);
        while r.poll_transmit().is_some() {}
        let nack =
            Frame::Nack { channel: first.clone(), epoch: Epoch(1), from: Seq(1), to: Seq(200) };
        r.handle_frame(now, &b, nack);
        let sent: Vec<Frame> = std::iter::from_fn(|| r.poll_transmit()).map(|(_, f)| f).collect();
        assert!(
            matches!(&sent[0], Frame::Gone { through: Seq(199), .. }),
            "first reply: {:?}",
            sent.first()
        );
        assert!(matches!(&sent[1], Frame::Data { seq: Seq(200), .. }));
        assert_eq!(sent.len(), 2);
    }

    /// Channels trimmed by their own `retention` leave stale budget entries; compaction keeps
    /// the bookkeeping proportional to what the logs hold, and the byte count exact.
    #[test]
    fn budget_bookkeeping_follows_per_channel_retention() {
        let a = NodeId::parse("eu-west/edge-1").unwrap();
        let config = Config { retention: 100, ..Config::default() };
        let now = Instant::now();
        let mut r = Replica::new(a, Epoch(1), &[], config);
        for k in 0..20_000u64 {
            // Runs of one channel, then interleaved ones.
            let c = if k < 10_000 { k / 2_500 } else { k % 3 };
            let channel = ChannelName::parse(&format!("chat:{c}")).unwrap();
            r.publish(now, channel, Bytes::from(vec![1u8; 10]));
            let (bytes, held) = r.log_usage();
            assert!(r.budget.order.len() <= 2 * held + 1024, "after {k}");
            let real: usize = r.logs.values().map(|l| l.entries.len()).sum();
            assert_eq!((held, bytes), (real, real * 10), "after {k}");
        }
        assert_eq!(r.log_usage().1, 400, "4 channels × retention 100");
    }

    /// A publisher faster than the peer's acknowledgements: at most `send_window` messages
    /// are in flight; the rest leave from the log, in order, as acknowledgements return.
    #[test]
    fn a_channel_keeps_at_most_its_window_in_flight() {
        let a = NodeId::parse("eu-west/edge-1").unwrap();
        let b = NodeId::parse("us-east/edge-1").unwrap();
        let channel = ChannelName::parse("chat:x").unwrap();
        let config = Config {
            send_window: 4,
            replicate_all: ["chat".to_owned()].into(),
            ..Config::default()
        };
        let now = Instant::now();
        let mut r = Replica::new(a, Epoch(1), std::slice::from_ref(&b), config);
        r.handle_link_up(now, &b);
        let data_seqs = |r: &mut Replica| -> Vec<u64> {
            std::iter::from_fn(|| r.poll_transmit())
                .filter_map(|(_, f)| match f {
                    Frame::Data { seq, .. } => Some(seq.0),
                    _ => None,
                })
                .collect()
        };
        for k in 0..20 {
            r.publish(now, channel.clone(), Bytes::from(format!("m{k}")));
        }
        assert_eq!(data_seqs(&mut r), vec![1, 2, 3, 4]);
        let ack = |seq| Frame::Ack { channel: channel.clone(), epoch: Epoch(1), seq: Seq(seq) };
        r.handle_frame(now, &b, ack(2));
        assert_eq!(data_seqs(&mut r), vec![5, 6]);
        r.handle_frame(now, &b, ack(6));
        assert_eq!(data_seqs(&mut r), vec![7, 8, 9, 10]);
        // A new publish while the window is full waits too.
        r.publish(now, channel.clone(), Bytes::from("m20"));
        assert_eq!(data_seqs(&mut r), Vec::<u64>::new());
        r.handle_frame(now, &b, ack(10));
        assert_eq!(data_seqs(&mut r), vec![11, 12, 13, 14]);
        r.handle_frame(now, &b, ack(14));
        assert_eq!(data_seqs(&mut r), vec![15, 16, 17, 18]);
        r.handle_frame(now, &b, ack(18));
        assert_eq!(data_seqs(&mut r), vec![19, 20, 21]);
        // A caught-up peer gets the next publish at once.
        r.handle_frame(now, &b, ack(21));
        r.publish(now, channel.clone(), Bytes::from("m21"));
        assert_eq!(data_seqs(&mut r), vec![22]);
    }

    /// An authenticated but broken (or hostile) peer sends impossible sequence numbers:
    /// far ahead of anything it could have published, up to `u64::MAX`. The receiver holds
    /// a bounded number of them and still delivers the real stream in order.
    #[test]
    fn impossible_sequences_cost_bounded_memory_and_the_stream_still_flows() {
        let a = NodeId::parse("eu-west/edge-1").unwrap();
        let b = NodeId::parse("us-east/edge-1").unwrap();
        let channel = ChannelName::parse("chat:x").unwrap();
        let config = Config {
            retention: 100,
            replicate_all: ["chat".to_owned()].into(),
            ..Config::default()
        };
        let now = Instant::now();
        let mut r = Replica::new(b, Epoch(2), std::slice::from_ref(&a), config);
        r.handle_link_up(now, &a);
        let data = |seq: u64| Frame::Data {
            origin: a.clone(),
            epoch: Epoch(1),
            channel: channel.clone(),
            seq: Seq(seq),
            payload: Bytes::from(seq.to_string()),
        };
        r.handle_frame(now, &a, data(u64::MAX));
        for k in 0..10_000 {
            r.handle_frame(now, &a, data(1_000_000 + k * 7));
        }
        for seq in 1..=50 {
            r.handle_frame(now, &a, data(seq));
        }
        let held = r.recv.values().map(|s| s.held.len()).max().unwrap_or(0);
        assert!(held <= 100, "held {held} frames for one stream");
        let delivered: Vec<u64> = std::iter::from_fn(|| r.poll_event())
            .filter_map(|e| match e {
                Event::Deliver { seq, .. } => Some(seq.0),
                _ => None,
            })
            .collect();
        assert_eq!(delivered, (1..=50).collect::<Vec<_>>());
    }
}
