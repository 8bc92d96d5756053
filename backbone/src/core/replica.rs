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
    /// Namespaces whose channels every node keeps in a durable log (the history
    /// namespaces). A node that restarts with its log offers its peers the rest of its
    /// previous epoch of these channels from the log and then ends that epoch (`End`), so
    /// they continue without a discontinuity; a peer waits for that `End` before it takes
    /// the new epoch. Every node of a mesh must use the same set.
    pub durable: BTreeSet<String>,
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
            durable: BTreeSet::new(),
            interest_grace: Duration::from_secs(120),
            interest_wait: Duration::from_secs(2),
        }
    }
}

/// Whether `set` names `channel`'s namespace (or holds `"*"`).
fn names(set: &BTreeSet<String>, channel: &ChannelName) -> bool {
    !set.is_empty() && (set.contains("*") || set.contains(channel.namespace()))
}

impl Config {
    /// Whether `channel` goes to every node regardless of interest.
    pub fn replicates_all(&self, channel: &ChannelName) -> bool {
        names(&self.replicate_all, channel)
    }

    /// Whether nodes keep `channel` in a durable log (its epochs end with `End`).
    pub fn is_durable(&self, channel: &ChannelName) -> bool {
        names(&self.durable, channel)
    }
}

/// How long a receiver that is still in an origin's earlier epoch of a durable channel
/// (waiting for the origin's `End`, see [`Config::durable`]) drops data of the new epoch
/// without any progress in the old one before it gives up waiting: it then reports the rest
/// of the old epoch as a discontinuity and takes the new one.
pub const END_WAIT: Duration = Duration::from_secs(5);

/// What the core reports to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Deliver a replicated message to local subscribers. Per (origin, channel), sequences
    /// come strictly in order, each once, and an origin's epochs one after the other.
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
    /// `peer` asks for the newest message of this node's `channel` it sequenced: answer with
    /// [`Replica::answer_head`] (the node knows what it sequenced but has not sent yet).
    HeadRequested {
        /// The asking peer.
        peer: NodeId,
        /// Channel.
        channel: ChannelName,
        /// To echo.
        nonce: u64,
    },
    /// `origin`'s `epoch` of `channel` ended here with everything delivered (its `End`):
    /// the stream continues in `next`. Nothing more of `epoch` comes.
    EpochEnded {
        /// Origin node.
        origin: NodeId,
        /// Channel.
        channel: ChannelName,
        /// The epoch that ended.
        epoch: Epoch,
        /// The one that follows.
        next: Epoch,
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

/// A durable channel's messages from this node's previous epoch, read back from the log
/// after a restart, for peers that were still in that epoch: they get its rest, then `End`,
/// then the current epoch.
#[derive(Debug, Clone)]
struct Past {
    epoch: Epoch,
    log: OriginLog,
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
    /// Where this node's stream began (its `Start`, or the position it had when restored):
    /// the origin's messages up to it never come.
    start: u64,
    /// Out-of-order messages waiting for the gap before them (or, before the stream
    /// started, for the origin's `Start`).
    held: BTreeMap<u64, Bytes>,
    last_nack: Option<Instant>,
    /// False while an interest waits for the origin's `Start`.
    started: bool,
    /// When the pending interest was last sent to the origin.
    asked: Option<Instant>,
    /// The origin ended `epoch` at this sequence (`End`); once delivered up to it, the
    /// stream continues in the next epoch.
    end: Option<(u64, Epoch)>,
    /// Since when data of a newer epoch is dropped, waiting for the origin's `End` of this
    /// one (reset by progress here).
    waiting_since: Option<Instant>,
}

impl Recv {
    fn started(epoch: Epoch, delivered: u64) -> Self {
        Self {
            epoch,
            delivered,
            start: delivered,
            held: BTreeMap::new(),
            last_nack: None,
            started: true,
            asked: None,
            end: None,
            waiting_since: None,
        }
    }

    fn pending(asked: Option<Instant>) -> Self {
        Self { started: false, asked, ..Self::started(Epoch(0), 0) }
    }

    /// The first sequence missing before `end`, when this epoch is ending: (from, to).
    fn missing_before_end(&self) -> Option<(u64, u64)> {
        let (last, _) = self.end?;
        let to = self.held.keys().next().map_or(last, |first| first - 1).min(last);
        (self.delivered < to).then_some((self.delivered + 1, to))
    }
}

/// Where a peer is in this node's past epoch of a channel.
#[derive(Debug, Clone, Copy)]
struct PastOut {
    acked: u64,
    sent: u64,
    /// `End` sent since the peer last made progress.
    end_sent: bool,
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
    /// While the peer is still in the channel's past epoch (see [`Past`]): its progress
    /// there. The current epoch waits until it moved on.
    past: Option<PastOut>,
}

impl Out {
    /// A stream to a peer that has everything up to `acked`.
    fn new(acked: u64, generation: u64, now: Instant) -> Self {
        Self {
            acked,
            progress_at: now,
            generation,
            start: acked,
            retries: 0,
            sent: acked,
            past: None,
        }
    }

    /// A stream to a peer still at `acked` of the channel's past epoch.
    fn in_past(acked: u64, generation: u64, now: Instant) -> Self {
        let past = Some(PastOut { acked, sent: acked, end_sent: false });
        Self { past, ..Self::new(0, generation, now) }
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
    /// What the peer lacked of this node's channels when its `Hello` came (the current
    /// epoch's last sequence then, per channel); an entry leaves once the peer acknowledged
    /// it. Empty (and greeted): the peer caught up, and the heartbeats say so.
    catchup: BTreeMap<ChannelName, u64>,
    /// The last heartbeat told the peer it caught up.
    told_caught_up: bool,
    /// The peer's heartbeats say this node caught up with it (since the link came up).
    peer_caught_up: bool,
    /// Messages sent to the peer again (asked for by a `Nack`, or repeated after `rto`
    /// without progress), since the start.
    retransmitted: u64,
}

impl Link {
    /// How long to wait for progress before repeating a frame: the configured `rto`, and at
    /// least twice the measured round trip.
    fn rto(&self, config: &Config) -> Duration {
        config.rto.max(self.rtt * 2)
    }

    /// Whether the peer has everything it lacked at its `Hello`.
    fn caught_up(&self) -> bool {
        self.greeted && self.catchup.is_empty()
    }

    /// Forgets catch-up entries the peer passed (or no longer receives).
    fn prune_catchup(&mut self) {
        let out = &self.out;
        self.catchup
            .retain(|c, head| out.get(c).is_some_and(|o| o.past.is_some() || o.acked < *head));
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

/// One durable channel's messages of this node, as its log holds them: the epoch they
/// belong to (the last one with messages), its last sequence, and the newest messages
/// (contiguous, ending at `last`; fewer, or none, when the log trimmed them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnLog {
    /// The channel.
    pub channel: ChannelName,
    /// This node's epoch the messages belong to.
    pub epoch: Epoch,
    /// The last sequence of that epoch.
    pub last: Seq,
    /// Newest messages, oldest first.
    pub entries: Vec<(Seq, Bytes)>,
}

/// What a node's durable log tells the replication core after a restart (see
/// [`Replica::restore`]): its own messages of durable channels, and how far it got in each
/// peer's replicate-all channels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    /// Per durable channel, this node's messages of its last epoch with any.
    pub own: Vec<OwnLog>,
    /// (origin, channel, epoch, last sequence logged).
    pub positions: Vec<(NodeId, ChannelName, Epoch, Seq)>,
}

/// A question to an origin about the newest message of its channel (see
/// [`Replica::request_head`]).
#[derive(Debug, Clone)]
struct HeadAsk {
    origin: NodeId,
    channel: ChannelName,
    /// When it was last sent (`None`: not yet on this link).
    asked: Option<Instant>,
    answer: Option<(Epoch, Seq)>,
}

/// Most questions about heads kept at once; the oldest give way.
const HEADS_MAX: usize = 4096;

/// Where this node is in an origin's stream of a channel (see [`Replica::stream`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPos {
    /// The origin epoch (0 while the stream has not started).
    pub epoch: Epoch,
    /// The stream began after this sequence: the origin's messages up to it never come.
    pub start: Seq,
    /// Last sequence delivered.
    pub delivered: Seq,
}

/// A peer link as the node reports it (`/readyz`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    /// The peer.
    pub peer: NodeId,
    /// The link is up.
    pub up: bool,
    /// This node has everything the peer had for it when the link came up.
    pub caught_up: bool,
    /// How long the link has been down (since the core's first event, if it never came
    /// up); `None` while up, or before anything happened.
    pub down_for: Option<Duration>,
    /// Messages of this node's channels the peer wants and has not acknowledged (0 while
    /// the link is down: nothing is owed until it returns and asks).
    pub unacknowledged: u64,
    /// Messages sent to the peer again since the start (see [`Replica::peers`]).
    pub retransmitted: u64,
}

/// The replication core of one node. See the module docs for the data path.
#[derive(Debug)]
pub struct Replica {
    me: NodeId,
    epoch: Epoch,
    config: Config,
    logs: BTreeMap<ChannelName, OriginLog>,
    /// Durable channels' messages of this node's previous epoch (after a restart).
    past: BTreeMap<ChannelName, Past>,
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
    /// Questions to origins about their channels' heads, by nonce.
    heads: BTreeMap<u64, HeadAsk>,
    next_nonce: u64,
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
            past: BTreeMap::new(),
            budget: LogBudget::default(),
            recv: BTreeMap::new(),
            links,
            interest: BTreeMap::new(),
            // Interest generations grow across restarts too (peers ignore a generation
            // older than one they answered).
            generation: epoch.0,
            withdraw_due: BTreeSet::new(),
            ack_due: BTreeSet::new(),
            next_tick: None,
            last_heartbeat: None,
            born: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            heads: BTreeMap::new(),
            next_nonce: 0,
        }
    }

    /// A node restarted with its durable log, in a new `epoch`: its messages of durable
    /// channels from the last epoch that had any become that channel's past epoch, which
    /// peers still in it get the rest of, then `End` (so they continue without a
    /// discontinuity), and its positions in the peers' replicate-all channels are where it
    /// left off (so peers resend only what it lacks, and nothing it logged comes twice). A
    /// restarted node has no local subscribers, so it holds no interest. Own logs of
    /// `epoch` itself, or whose entries do not end at their last sequence, are skipped.
    pub fn restore(
        me: NodeId,
        epoch: Epoch,
        peers: &[NodeId],
        config: Config,
        restored: Restored,
    ) -> Self {
        let mut r = Self::new(me, epoch, peers, config);
        for own in restored.own {
            if own.epoch >= epoch || own.last.0 == 0 {
                continue;
            }
            let contiguous = own.entries.windows(2).all(|w| w[1].0.0 == w[0].0.0 + 1)
                && own.entries.last().is_none_or(|(s, _)| *s == own.last);
            let entries = if contiguous {
                own.entries.into_iter().map(|(s, b)| (s.0, b)).collect()
            } else {
                VecDeque::new()
            };
            let log = OriginLog { last: own.last.0, entries };
            r.past.insert(own.channel, Past { epoch: own.epoch, log });
        }
        for (origin, channel, e, seq) in restored.positions {
            if origin != r.me && r.links.contains_key(&origin) && r.config.replicates_all(&channel)
            {
                r.recv.insert((origin, channel), Recv::started(e, seq.0));
            }
        }
        r
    }

    /// What a durable log would hold of this node's replication state now, in the form
    /// [`Replica::restore`] takes (the node builds it from its store; the fault suite takes
    /// it from a running core to model a restart with the log): own messages of durable
    /// channels, and positions in the peers' durable channels.
    pub fn durable_state(&self) -> Restored {
        let mut own = Vec::new();
        for (channel, log) in &self.logs {
            if self.config.is_durable(channel) && log.last > 0 {
                own.push(OwnLog {
                    channel: channel.clone(),
                    epoch: self.epoch,
                    last: Seq(log.last),
                    entries: log.entries.iter().map(|(s, b)| (Seq(*s), b.clone())).collect(),
                });
            }
        }
        for (channel, past) in &self.past {
            if self.logs.get(channel).is_none_or(|l| l.last == 0) {
                own.push(OwnLog {
                    channel: channel.clone(),
                    epoch: past.epoch,
                    last: Seq(past.log.last),
                    entries: past.log.entries.iter().map(|(s, b)| (Seq(*s), b.clone())).collect(),
                });
            }
        }
        let positions = self
            .recv
            .iter()
            .filter(|((_, c), r)| r.started && self.config.is_durable(c))
            .map(|((o, c), r)| (o.clone(), c.clone(), r.epoch, Seq(r.delivered)))
            .collect();
        Restored { own, positions }
    }

    /// This node's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The next sequence of `channel` (for callers that do not sequence themselves).
    pub fn next_seq(&self, channel: &ChannelName) -> Seq {
        Seq(self.logs.get(channel).map_or(0, |l| l.last) + 1)
    }

    /// Sequences a local publish itself (see [`Replica::publish`]).
    pub fn publish_next(&mut self, now: Instant, channel: ChannelName, payload: Bytes) -> Seq {
        let seq = self.next_seq(&channel);
        self.publish(now, channel, seq, payload)
    }

    /// Logs a local publish that the node sequenced as `seq` (the next of the channel) and
    /// sends it to every reachable peer that wants the channel. A `seq` further ahead
    /// leaves the sequences in between unsent: peers that ask for them get `Gone`. One at
    /// or below the last is ignored. Returns the sequence logged.
    pub fn publish(&mut self, now: Instant, channel: ChannelName, seq: Seq, payload: Bytes) -> Seq {
        let retention = self.config.retention.max(1);
        // The budget keeps the log's own key: entries of one channel share one allocation,
        // which lets its compaction skip repeated lookups.
        let (key, log) = match self.logs.entry(channel.clone()) {
            btree_map::Entry::Occupied(o) => (o.key().clone(), o.into_mut()),
            btree_map::Entry::Vacant(v) => (v.key().clone(), v.insert(OriginLog::default())),
        };
        let seq = seq.0;
        if seq <= log.last {
            return Seq(log.last);
        }
        if seq > log.last + 1 {
            // Entries stay contiguous: what came before the hole is no longer offered.
            for (_, old) in log.entries.drain(..) {
                self.budget.bytes -= old.len();
                self.budget.held -= 1;
            }
            log.last = seq - 1;
        }
        log.last = seq;
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
        let has_past = self.past.contains_key(&channel);
        for (peer, link) in &mut self.links {
            if !link.up {
                continue;
            }
            let Some(out) = out_for(link, &channel, all, has_past, now) else { continue };
            if out.past.is_some() {
                continue; // the current epoch follows once the peer left the past one
            }
            // A peer that was caught up starts its retransmission clock now; one still
            // behind keeps its older clock, so the repair continues on time.
            if out.acked + 1 >= seq {
                out.progress_at = now;
            }
            // Only the next message, within the window: anything else leaves in order as
            // acknowledgements return (see `Replica::fill`).
            if out.sent + 1 != seq || seq > out.acked.saturating_add(window) {
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
    /// acknowledged yet, past epochs included (a graceful shutdown waits for this to
    /// reach 0).
    pub fn unacknowledged(&self) -> u64 {
        self.links.values().map(|l| self.unacknowledged_by(l)).sum()
    }

    /// [`Replica::unacknowledged`] for one peer's link (0 while it is down).
    fn unacknowledged_by(&self, link: &Link) -> u64 {
        if !link.up {
            return 0;
        }
        link.out
            .iter()
            .map(|(channel, out)| {
                let current =
                    self.logs.get(channel).map_or(0, |log| log.last.saturating_sub(out.acked));
                let past = match (out.past, self.past.get(channel)) {
                    (Some(p), Some(past)) => past.log.last.saturating_sub(p.acked),
                    _ => 0,
                };
                current + past
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

    /// Where this node is in `origin`'s stream of `channel`; `None` when it does not
    /// receive that channel from `origin` (not a peer, or an interest-routed channel it does
    /// not want). A replicate-all channel nothing arrived of yet is at epoch 0.
    pub fn stream(&self, origin: &NodeId, channel: &ChannelName) -> Option<StreamPos> {
        if !self.links.contains_key(origin) {
            return None;
        }
        match self.recv.get(&(origin.clone(), channel.clone())) {
            Some(r) if r.started => {
                Some(StreamPos { epoch: r.epoch, start: Seq(r.start), delivered: Seq(r.delivered) })
            }
            Some(_) => Some(StreamPos { epoch: Epoch(0), start: Seq(0), delivered: Seq(0) }),
            None if self.config.replicates_all(channel) => {
                Some(StreamPos { epoch: Epoch(0), start: Seq(0), delivered: Seq(0) })
            }
            None => None,
        }
    }

    /// Whether this node has everything `peer` had for it when their link (last) came up:
    /// the link is up, the peer's `Hello` came, and the peer's heartbeats say its catch-up
    /// is acknowledged.
    pub fn caught_up_with(&self, peer: &NodeId) -> bool {
        self.links.get(peer).is_some_and(|l| l.up && l.greeted && l.peer_caught_up)
    }

    /// Every peer link: up or not, caught up or not, and for how long it has been down.
    pub fn peers(&self, now: Instant) -> Vec<PeerState> {
        self.links
            .iter()
            .map(|(peer, l)| PeerState {
                peer: peer.clone(),
                up: l.up,
                caught_up: l.up && l.greeted && l.peer_caught_up,
                down_for: if l.up {
                    None
                } else {
                    l.down_since.or(self.born).map(|t| now.saturating_duration_since(t))
                },
                unacknowledged: self.unacknowledged_by(l),
                retransmitted: l.retransmitted,
            })
            .collect()
    }

    /// Asks `origin` for the newest message of its `channel` it sequenced (sent or not yet);
    /// returns the question's nonce for [`Replica::head`]. Asked again after `rto` without an
    /// answer, and when the link comes back; forgotten with [`Replica::forget_head`] (or
    /// when [`HEADS_MAX`] newer questions are pending).
    pub fn request_head(&mut self, now: Instant, origin: &NodeId, channel: &ChannelName) -> u64 {
        self.next_nonce += 1;
        let nonce = self.next_nonce;
        while self.heads.len() >= HEADS_MAX {
            // Answered questions go first (their askers read the answer already, or will
            // not), then the oldest.
            match self.heads.iter().find(|(_, a)| a.answer.is_some()).map(|(n, _)| *n) {
                Some(n) => self.heads.remove(&n),
                None => self.heads.pop_first().map(|(_, a)| a),
            };
        }
        let up = self.links.get(origin).is_some_and(|l| l.up);
        self.heads.insert(
            nonce,
            HeadAsk {
                origin: origin.clone(),
                channel: channel.clone(),
                asked: up.then_some(now),
                answer: None,
            },
        );
        if up {
            let frame = Frame::HeadRequest { channel: channel.clone(), nonce };
            self.transmit.push_back((origin.clone(), frame));
        }
        self.arm(now);
        nonce
    }

    /// The answer to the question `nonce`: the origin's newest message of the channel
    /// (epoch, sequence; sequence 0: none), once it came.
    pub fn head(&self, nonce: u64) -> Option<(Epoch, Seq)> {
        self.heads.get(&nonce)?.answer
    }

    /// Forgets the question `nonce`.
    pub fn forget_head(&mut self, nonce: u64) {
        self.heads.remove(&nonce);
    }

    /// Answers `peer`'s [`Event::HeadRequested`]: the newest message of `channel` this node
    /// sequenced.
    pub fn answer_head(
        &mut self,
        peer: &NodeId,
        channel: ChannelName,
        nonce: u64,
        epoch: Epoch,
        seq: Seq,
    ) {
        if self.links.get(peer).is_some_and(|l| l.up) {
            let frame = Frame::Head { channel, epoch, seq, nonce };
            self.transmit.push_back((peer.clone(), frame));
        }
    }

    /// The last message of `channel` in this node's past epoch, if it has one (after a
    /// restart with its log).
    pub fn past_head(&self, channel: &ChannelName) -> Option<(Epoch, Seq)> {
        self.past.get(channel).map(|p| (p.epoch, Seq(p.log.last)))
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
        link.peer_caught_up = false;
        link.told_caught_up = false;
        link.catchup.clear();
        for ask in self.heads.values_mut().filter(|a| a.origin == *peer && a.answer.is_none()) {
            ask.asked = None; // asked again on the next tick
        }
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
            link.peer_caught_up = false;
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
            // The node hands these to its `Presence`.
            Frame::Presence(_) => {}
            Frame::Hello { epoch, have, want } => self.on_hello(now, from, epoch, have, want),
            Frame::Heartbeat { epoch, greeted, caught_up } => {
                self.on_peer_epoch(from, epoch);
                let up = self.links.get(from).is_some_and(|l| l.up);
                if let Some(link) = self.links.get_mut(from) {
                    link.peer_caught_up = up && caught_up;
                }
                if !greeted && up {
                    self.send_hello(now, from); // ours was lost
                }
            }
            Frame::Data { origin, epoch, channel, seq, payload } => {
                if origin != self.me {
                    self.on_data(now, origin, epoch, channel, seq.0, payload);
                }
            }
            Frame::Ack { channel, epoch, seq } => self.on_ack(now, from, channel, epoch, seq.0),
            Frame::Nack { channel, epoch, from: first, to } => {
                let window = self.config.send_window.max(1) as u64;
                let to = to.0.min(first.0.saturating_add(window - 1));
                let resent = if epoch == self.epoch {
                    self.resend(from, &channel, first.0, to)
                } else if self.past.get(&channel).is_some_and(|p| p.epoch == epoch) {
                    self.resend_past(from, &channel, first.0, to)
                } else {
                    0
                };
                if let Some(link) = self.links.get_mut(from) {
                    link.retransmitted += resent;
                }
            }
            Frame::Gone { channel, epoch, through } => {
                self.on_gone(from, channel, epoch, through.0)
            }
            Frame::End { channel, epoch, last, next } => {
                self.on_end(from, channel, epoch, last.map(|s| s.0), next)
            }
            Frame::HeadRequest { channel, nonce } => {
                self.events.push_back(Event::HeadRequested { peer: from.clone(), channel, nonce })
            }
            Frame::Head { channel, epoch, seq, nonce } => {
                if let Some(ask) = self.heads.get_mut(&nonce) {
                    if ask.origin == *from && ask.channel == channel {
                        ask.answer = Some((epoch, seq));
                    }
                }
            }
            Frame::Interest { channel, generation, withdraw } => {
                self.on_interest(now, from, channel, generation, withdraw)
            }
            Frame::Start { channel, epoch, after, generation } => {
                self.on_start(now, from, channel, epoch, after.0, generation)
            }
        }
    }

    fn on_ack(
        &mut self,
        now: Instant,
        from: &NodeId,
        channel: ChannelName,
        epoch: Epoch,
        seq: u64,
    ) {
        let all = self.config.replicates_all(&channel);
        let past = self.past.get(&channel).map(|p| (p.epoch, p.log.last));
        // A peer acknowledges at most what was sent it (a larger figure is a broken or
        // hostile peer's): clamped, so no arithmetic on it overflows.
        let last = self.logs.get(&channel).map_or(0, |l| l.last);
        let link = self.links.get_mut(from).expect("checked by caller");
        let Some(out) = out_for(link, &channel, all, past.is_some(), now) else { return };
        let mut progressed = false;
        let mut replicated = false;
        if epoch == self.epoch {
            let seq = seq.min(last);
            // An ack in this epoch: the peer left the past one (`End` reached it).
            progressed |= out.past.take().is_some();
            if seq > out.acked {
                out.acked = seq;
                progressed = true;
                replicated = from.region() != self.me.region();
            }
        } else if let Some((_, past_last)) = past.filter(|(e, _)| *e == epoch) {
            let seq = seq.min(past_last);
            if let Some(p) = out.past.as_mut().filter(|p| seq > p.acked) {
                p.acked = seq;
                p.end_sent = false;
                progressed = true;
            }
        }
        if !progressed {
            return;
        }
        out.progress_at = now;
        out.retries = 0;
        self.fill(from, &channel);
        if replicated {
            self.events.push_back(Event::Replicated { channel, seq: Seq(seq) });
        }
        self.check_caught_up(from);
    }

    /// Tells `peer` at once (in a heartbeat) when it has everything it lacked at its
    /// `Hello`, so it need not wait for the next regular one.
    fn check_caught_up(&mut self, peer: &NodeId) {
        let Some(link) = self.links.get_mut(peer) else { return };
        link.prune_catchup();
        if link.up && link.caught_up() && !link.told_caught_up {
            link.told_caught_up = true;
            let frame = Frame::Heartbeat { epoch: self.epoch, greeted: true, caught_up: true };
            self.transmit.push_back((peer.clone(), frame));
        }
    }

    /// A peer announced its epoch: if it is newer than what we hold of its channels, it
    /// restarted, and what we hold of its old epoch is finished — except for durable
    /// channels, whose old epoch the peer ends itself (`End`) once it resent the rest from
    /// its log.
    fn on_peer_epoch(&mut self, from: &NodeId, epoch: Epoch) {
        if let Some(link) = self.links.get_mut(from) {
            if link.peer_epoch.is_some_and(|e| e != epoch) {
                // It lost what it had of our channels, and its interest: its Hello says
                // what it wants now.
                link.out.clear();
                link.catchup.clear();
            }
            link.peer_epoch = Some(epoch);
        }
        let stale: Vec<ChannelName> = self
            .recv
            .iter()
            .filter(|((origin, c), r)| {
                origin == from && r.started && r.epoch < epoch && !self.config.is_durable(c)
            })
            .map(|((_, c), _)| c.clone())
            .collect();
        for channel in stale {
            self.new_epoch(from.clone(), channel, epoch);
        }
    }

    /// A fresh stream of `channel` to a peer that has nothing of it: from the start of the
    /// past epoch when this node has one, else of the current epoch.
    fn fresh_out(&self, channel: &ChannelName, generation: u64, now: Instant) -> Out {
        if self.past.contains_key(channel) {
            Out::in_past(0, generation, now)
        } else {
            Out::new(0, generation, now)
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
        let my_epoch = self.epoch;
        let last = |logs: &BTreeMap<ChannelName, OriginLog>, c: &ChannelName| {
            logs.get(c).map_or(0, |l| l.last)
        };
        let mut first = Vec::new();
        let mut outs = Vec::new();
        for h in have {
            if self.links[from].out.get(&h.channel).is_some_and(|o| o.generation > h.generation) {
                continue;
            }
            let past = self.past.get(&h.channel);
            let out = if h.epoch == my_epoch {
                Out::new(h.delivered.0.min(last(&self.logs, &h.channel)), h.generation, now)
            } else if let Some(p) = past.filter(|p| p.epoch == h.epoch) {
                Out::in_past(h.delivered.0.min(p.log.last), h.generation, now)
            } else {
                // An epoch of ours this node no longer holds (it restarted without its log,
                // or that epoch is older than the one it kept): it ended; the peer reports
                // the rest as lost and follows from the next one this node has.
                let next = past.filter(|p| p.epoch > h.epoch).map_or(my_epoch, |p| p.epoch);
                let end =
                    Frame::End { channel: h.channel.clone(), epoch: h.epoch, last: None, next };
                first.push(end);
                if next == my_epoch {
                    Out::new(0, h.generation, now)
                } else {
                    Out::in_past(0, h.generation, now)
                }
            };
            outs.push((h.channel, out));
        }
        let link = self.links.get_mut(from).expect("checked by caller");
        link.greeted = true;
        for (channel, out) in outs {
            link.out.insert(channel, out);
        }
        // Merged into what the peer already asked for: an `Interest` sent after this Hello
        // may have overtaken it. (Interests the peer dropped while the link was down are
        // withdrawn again when their data reaches it.)
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
            first.push(Frame::Start {
                channel: w.channel,
                epoch: my_epoch,
                after: Seq(after),
                generation: w.generation,
            });
        }
        let fresh: Vec<ChannelName> = self
            .logs
            .keys()
            .chain(self.past.keys())
            .filter(|c| self.config.replicates_all(c) && !self.links[from].out.contains_key(*c))
            .cloned()
            .collect();
        for channel in fresh {
            let out = self.fresh_out(&channel, 0, now);
            self.links.get_mut(from).expect("checked").out.insert(channel, out);
        }
        // Whatever was in flight when the link dropped is lost: send again from each
        // peer position.
        let link = self.links.get_mut(from).expect("checked by caller");
        for o in link.out.values_mut() {
            o.sent = o.acked;
            if let Some(p) = o.past.as_mut() {
                p.sent = p.acked;
                p.end_sent = false;
            }
        }
        let behind: Vec<ChannelName> = link
            .out
            .iter()
            .filter(|(c, o)| o.past.is_some() || o.acked < last(&self.logs, c))
            .map(|(c, _)| c.clone())
            .collect();
        // What the peer lacks now: once it acknowledged all of it, it caught up with us.
        link.catchup = behind.iter().map(|c| (c.clone(), last(&self.logs, c))).collect();
        link.told_caught_up = false;
        self.transmit.extend(first.into_iter().map(|f| (from.clone(), f)));
        for channel in behind {
            self.fill(from, &channel);
        }
        self.check_caught_up(from);
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
        r.start = after;
        r.started = true;
        r.asked = None;
        r.held = r.held.split_off(&after.saturating_add(1));
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
    /// allows: what publishes held back, or a catch-up after the link returned. A peer still
    /// in the channel's past epoch gets the rest of it, then `End`.
    fn fill(&mut self, peer: &NodeId, channel: &ChannelName) {
        let window = self.config.send_window.max(1) as u64;
        let past = self.past.get(channel).map(|p| (p.epoch, p.log.last));
        let my_epoch = self.epoch;
        let Some(out) = self.links.get_mut(peer).and_then(|l| l.out.get_mut(channel)) else {
            return;
        };
        if let Some(p) = out.past.as_mut() {
            let Some((epoch, past_last)) = past else {
                out.past = None;
                return;
            };
            let first = p.sent.max(p.acked) + 1;
            let last = past_last.min(p.acked.saturating_add(window));
            let range = (first <= last).then_some((first, last));
            if let Some((_, last)) = range {
                p.sent = last;
            }
            let end = p.sent >= past_last && !p.end_sent;
            p.end_sent |= end;
            if let Some((first, last)) = range {
                self.resend_past(peer, channel, first, last);
            }
            if end {
                let frame = Frame::End {
                    channel: channel.clone(),
                    epoch,
                    last: Some(Seq(past_last)),
                    next: my_epoch,
                };
                self.transmit.push_back((peer.clone(), frame));
            }
            return;
        }
        let Some(log) = self.logs.get(channel) else { return };
        let first = out.sent.max(out.acked) + 1;
        let last = log.last.min(out.acked.saturating_add(window));
        if first > last {
            return;
        }
        out.sent = last;
        self.resend(peer, channel, first, last);
    }

    /// Sends `first..=last` of `channel` to `peer` from the log; what the log no longer holds
    /// is announced with `Gone`. Returns the messages queued.
    fn resend(&mut self, peer: &NodeId, channel: &ChannelName, first: u64, last: u64) -> u64 {
        let Some(log) = self.logs.get(channel) else { return 0 };
        let frames = resend_frames(&self.me, self.epoch, channel, log, first, last);
        self.queue_resent(peer, frames)
    }

    /// As [`Replica::resend`], from the channel's past epoch.
    fn resend_past(&mut self, peer: &NodeId, channel: &ChannelName, first: u64, last: u64) -> u64 {
        let Some(past) = self.past.get(channel) else { return 0 };
        let frames = resend_frames(&self.me, past.epoch, channel, &past.log, first, last);
        self.queue_resent(peer, frames)
    }

    /// Queues `frames` for `peer`; the `Data` frames among them.
    fn queue_resent(&mut self, peer: &NodeId, frames: Vec<Frame>) -> u64 {
        let data = frames.iter().filter(|f| matches!(f, Frame::Data { .. })).count() as u64;
        self.transmit.extend(frames.into_iter().map(|f| (peer.clone(), f)));
        data
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
        self.recv.insert(key.clone(), Recv::started(epoch, 0));
        // Tells the origin at once where this node is now.
        self.ack_due.insert(key);
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
        let durable = self.config.is_durable(&channel);
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
            Some(r) if r.epoch < epoch && durable => {
                // The origin restarted with its log: it ends our epoch (`End`, after the
                // rest of it) before its new one counts here. An origin that never does
                // costs a discontinuity after `END_WAIT` without progress.
                let since = *r.waiting_since.get_or_insert(now);
                if now.saturating_duration_since(since) < END_WAIT {
                    return;
                }
                self.new_epoch(origin.clone(), channel.clone(), epoch)
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
        if r.end.is_some_and(|(last, _)| seq > last) {
            return; // beyond the end the origin announced
        }
        hold(&mut r.held, seq, payload, self.config.retention);
        self.drain(&key);
        self.nack_gap(now, &key);
    }

    /// The origin ended `epoch` of `channel` at `last` (or lost the rest of it: `None`);
    /// the stream continues in `next` once this node delivered up to `last`.
    fn on_end(
        &mut self,
        origin: &NodeId,
        channel: ChannelName,
        epoch: Epoch,
        last: Option<u64>,
        next: Epoch,
    ) {
        let key = (origin.clone(), channel.clone());
        let Some(r) = self.recv.get(&key) else { return };
        if !r.started || next <= epoch {
            return;
        }
        if r.epoch > epoch {
            // Already past it: a repeat because the origin did not hear of it (our ack in
            // the next epoch was lost). Tell it again.
            self.ack_due.insert(key);
            return;
        }
        if r.epoch < epoch {
            // Older still: what lay between is lost.
            self.new_epoch(origin.clone(), channel.clone(), epoch);
        }
        let Some(last) = last else {
            self.new_epoch(origin.clone(), channel, next);
            return;
        };
        let r = self.recv.get_mut(&key).expect("present");
        r.end = Some((last, next));
        r.held.retain(|s, _| *s <= last);
        self.drain(&key);
        if let Some(r) = self.recv.get_mut(&key) {
            if let Some((from, to)) = r.missing_before_end() {
                r.last_nack = None;
                let nack = Frame::Nack {
                    channel: key.1.clone(),
                    epoch: r.epoch,
                    from: Seq(from),
                    to: Seq(to),
                };
                self.transmit.push_back((origin.clone(), nack));
            }
        }
    }

    /// Asks the origin for the gap before the first held message (at most once per rto).
    fn nack_gap(&mut self, now: Instant, key: &(NodeId, ChannelName)) {
        let rto = self.rto(&key.0);
        let Some(r) = self.recv.get_mut(key) else { return };
        let Some((from, to)) = gap(r) else { return };
        if r.last_nack.is_none_or(|t| now.duration_since(t) >= rto) {
            r.last_nack = Some(now);
            let nack = Frame::Nack {
                channel: key.1.clone(),
                epoch: r.epoch,
                from: Seq(from),
                to: Seq(to),
            };
            self.transmit.push_back((key.0.clone(), nack));
        }
    }

    /// Delivers held messages that are next in sequence; at the end the origin announced,
    /// moves on to its next epoch.
    fn drain(&mut self, key: &(NodeId, ChannelName)) {
        let Some(r) = self.recv.get_mut(key) else { return };
        while let Some(entry) = r.held.first_entry() {
            if r.delivered.checked_add(1) != Some(*entry.key()) {
                break;
            }
            let (seq, payload) = entry.remove_entry();
            r.delivered = seq;
            r.last_nack = None;
            r.waiting_since = None;
            self.events.push_back(Event::Deliver {
                origin: key.0.clone(),
                channel: key.1.clone(),
                epoch: r.epoch,
                seq: Seq(seq),
                payload,
            });
        }
        if let Some((_, next)) = r.end.filter(|(last, _)| r.delivered >= *last) {
            self.events.push_back(Event::EpochEnded {
                origin: key.0.clone(),
                channel: key.1.clone(),
                epoch: r.epoch,
                next,
            });
            *r = Recv::started(next, 0);
            // Acknowledged in the new epoch at once: the origin then sends it.
            self.ack_due.insert(key.clone());
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
        r.held = r.held.split_off(&through.saturating_add(1));
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
            for (peer, link) in &mut self.links {
                if link.up {
                    link.prune_catchup();
                    let caught_up = link.caught_up();
                    link.told_caught_up = caught_up;
                    let frame =
                        Frame::Heartbeat { epoch: self.epoch, greeted: link.greeted, caught_up };
                    self.transmit.push_back((peer.clone(), frame));
                }
            }
        }
        self.interest_timers(now);
        self.send_acks();
        for (nonce, ask) in &mut self.heads {
            let Some(link) = self.links.get(&ask.origin).filter(|l| l.up) else { continue };
            if ask.answer.is_none()
                && ask.asked.is_none_or(|t| now.duration_since(t) >= link.rto(&self.config))
            {
                ask.asked = Some(now);
                let frame = Frame::HeadRequest { channel: ask.channel.clone(), nonce: *nonce };
                self.transmit.push_back((ask.origin.clone(), frame));
            }
        }
        let mut resends = Vec::new();
        let mut past_resends = Vec::new();
        for (peer, link) in &mut self.links {
            if !link.up {
                continue;
            }
            let rto = link.rto(&self.config);
            for (channel, out) in &mut link.out {
                let due = now.duration_since(out.progress_at) >= rto * (1 << out.retries);
                if let Some(p) = out.past.as_mut() {
                    let Some(past) = self.past.get(channel) else { continue };
                    if due {
                        out.progress_at = now;
                        out.retries = (out.retries + 1).min(3);
                        let last = past.log.last.min(p.acked + self.config.resend_batch as u64);
                        link.retransmitted += p.sent.min(last).saturating_sub(p.acked);
                        p.sent = p.sent.max(last);
                        let end = (last == past.log.last).then_some((past.epoch, past.log.last));
                        p.end_sent |= end.is_some();
                        past_resends.push((peer.clone(), channel.clone(), p.acked + 1, last, end));
                    }
                    continue;
                }
                let Some(log) = self.logs.get(channel) else { continue };
                if out.acked >= log.last {
                    continue;
                }
                if due {
                    out.progress_at = now;
                    out.retries = (out.retries + 1).min(3);
                    let last = log.last.min(out.acked + self.config.resend_batch as u64);
                    link.retransmitted += out.sent.min(last).saturating_sub(out.acked);
                    out.sent = out.sent.max(last);
                    resends.push((peer.clone(), channel.clone(), out.acked + 1, last));
                }
            }
            // Replicate-all channels the peer has not acknowledged anything of yet.
            for channel in self.logs.keys().chain(self.past.keys()) {
                if !link.out.contains_key(channel) && self.config.replicates_all(channel) {
                    let out = if self.past.contains_key(channel) {
                        Out::in_past(0, 0, now)
                    } else {
                        Out::new(0, 0, now)
                    };
                    link.out.insert(channel.clone(), out);
                }
            }
        }
        for (peer, channel, first, last) in resends {
            self.resend(&peer, &channel, first, last);
        }
        for (peer, channel, first, last, end) in past_resends {
            self.resend_past(&peer, &channel, first, last);
            if let Some((epoch, last)) = end {
                let frame = Frame::End { channel, epoch, last: Some(Seq(last)), next: self.epoch };
                self.transmit.push_back((peer, frame));
            }
        }
        let mut nacks = Vec::new();
        for ((origin, channel), r) in &mut self.recv {
            if !r.started {
                continue;
            }
            let Some((from, to)) = gap(r) else { continue };
            let Some(link) = self.links.get(origin).filter(|l| l.up) else { continue };
            let rto = link.rto(&self.config);
            if r.last_nack.is_none_or(|t| now.duration_since(t) >= rto) {
                r.last_nack = Some(now);
                let nack = Frame::Nack {
                    channel: channel.clone(),
                    epoch: r.epoch,
                    from: Seq(from),
                    to: Seq(to),
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

/// The range a receiver misses before what it holds (or before the end of an epoch the
/// origin ended).
fn gap(r: &Recv) -> Option<(u64, u64)> {
    if let Some((&first_held, _)) = r.held.iter().next() {
        return Some((r.delivered + 1, first_held - 1));
    }
    r.missing_before_end()
}

/// Frames that resend `first..=last` of `log` (messages of `origin`'s `epoch`): `Gone` for
/// what the log no longer holds, then the data.
fn resend_frames(
    origin: &NodeId,
    epoch: Epoch,
    channel: &ChannelName,
    log: &OriginLog,
    first: u64,
    last: u64,
) -> Vec<Frame> {
    let last = last.min(log.last);
    if first > last {
        return Vec::new();
    }
    let retained = log.first_retained();
    let mut frames = Vec::new();
    if first < retained {
        frames.push(Frame::Gone { channel: channel.clone(), epoch, through: Seq(retained - 1) });
    }
    for seq in first.max(retained)..=last {
        if let Some(p) = log.get(seq) {
            frames.push(Frame::Data {
                origin: origin.clone(),
                epoch,
                channel: channel.clone(),
                seq: Seq(seq),
                payload: p.clone(),
            });
        }
    }
    frames
}

/// What `link`'s peer receives of `channel`: its interest entry, or a fresh one for a
/// replicate-all channel (`all`; starting in the past epoch when the node has one,
/// `has_past`); `None` when the peer does not want the channel.
fn out_for<'a>(
    link: &'a mut Link,
    channel: &ChannelName,
    all: bool,
    has_past: bool,
    now: Instant,
) -> Option<&'a mut Out> {
    if !all {
        return link.out.get_mut(channel);
    }
    Some(
        link.out.entry(channel.clone()).or_insert_with(|| {
            if has_past { Out::in_past(0, 0, now) } else { Out::new(0, 0, now) }
        }),
    )
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
                r.publish_next(now, channel, payload.clone());
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

    /// A peer's unacknowledged messages and the messages sent to it again (`Nack`, and a
    /// timeout without progress) are counted per peer, as the metrics report them.
    #[test]
    fn unacknowledged_and_retransmitted_messages_are_counted_per_peer() {
        let a = NodeId::parse("eu-west/edge-1").unwrap();
        let b = NodeId::parse("us-east/edge-1").unwrap();
        let config =
            Config { replicate_all: BTreeSet::from(["chat".to_owned()]), ..Config::default() };
        let rto = config.rto;
        let now = Instant::now();
        let mut r = Replica::new(a, Epoch(1), std::slice::from_ref(&b), config);
        let channel = ChannelName::parse("chat:x").unwrap();
        r.handle_link_up(now, &b);
        for _ in 0..3 {
            r.publish_next(now, channel.clone(), Bytes::from_static(b"m"));
        }
        r.handle_timeout(now);
        while r.poll_transmit().is_some() {}
        let state = |r: &Replica| r.peers(now).into_iter().find(|p| p.peer == b).unwrap();
        assert_eq!((state(&r).unacknowledged, state(&r).retransmitted), (3, 0));
        let nack =
            Frame::Nack { channel: channel.clone(), epoch: Epoch(1), from: Seq(2), to: Seq(3) };
        r.handle_frame(now, &b, nack);
        while r.poll_transmit().is_some() {}
        assert_eq!(state(&r).retransmitted, 2, "the two messages the Nack asked for");
        // No progress for longer than rto: everything unacknowledged goes again.
        let later = now + rto * 4;
        r.handle_timeout(later);
        r.handle_timeout(later + r.config.tick);
        let resent = std::iter::from_fn(|| r.poll_transmit())
            .filter(|(_, f)| matches!(f, Frame::Data { .. }))
            .count();
        assert_eq!(resent, 3);
        assert_eq!(state(&r).retransmitted, 5);
        r.handle_frame(later, &b, Frame::Ack { channel, epoch: Epoch(1), seq: Seq(3) });
        assert_eq!(state(&r).unacknowledged, 0);
        r.handle_link_down(later, &b);
        assert_eq!(state(&r).retransmitted, 5, "kept across a link's loss");
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
            r.publish_next(now, channel, Bytes::from(vec![1u8; 10]));
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
            r.publish_next(now, channel.clone(), Bytes::from(format!("m{k}")));
        }
        assert_eq!(data_seqs(&mut r), vec![1, 2, 3, 4]);
        let ack = |seq| Frame::Ack { channel: channel.clone(), epoch: Epoch(1), seq: Seq(seq) };
        r.handle_frame(now, &b, ack(2));
        assert_eq!(data_seqs(&mut r), vec![5, 6]);
        r.handle_frame(now, &b, ack(6));
        assert_eq!(data_seqs(&mut r), vec![7, 8, 9, 10]);
        // A new publish while the window is full waits too.
        r.publish_next(now, channel.clone(), Bytes::from("m20"));
        assert_eq!(data_seqs(&mut r), Vec::<u64>::new());
        r.handle_frame(now, &b, ack(10));
        assert_eq!(data_seqs(&mut r), vec![11, 12, 13, 14]);
        r.handle_frame(now, &b, ack(14));
        assert_eq!(data_seqs(&mut r), vec![15, 16, 17, 18]);
        r.handle_frame(now, &b, ack(18));
        assert_eq!(data_seqs(&mut r), vec![19, 20, 21]);
        // A caught-up peer gets the next publish at once.
        r.handle_frame(now, &b, ack(21));
        r.publish_next(now, channel.clone(), Bytes::from("m21"));
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

    /// Moves every frame between two cores until both are quiet; returns B's events.
    fn exchange(a: &mut Replica, b: &mut Replica, now: Instant) -> Vec<Event> {
        let (ida, idb) = (a.me.clone(), b.me.clone());
        let mut events = Vec::new();
        loop {
            let mut moved = false;
            while let Some((_, f)) = a.poll_transmit() {
                moved = true;
                b.handle_frame(now, &ida, f);
            }
            while let Some((_, f)) = b.poll_transmit() {
                moved = true;
                a.handle_frame(now, &idb, f);
            }
            b.send_acks();
            a.send_acks();
            events.extend(std::iter::from_fn(|| b.poll_event()));
            while a.poll_event().is_some() {}
            if !moved {
                return events;
            }
        }
    }

    fn delivered(events: &[Event]) -> Vec<(u64, u64)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Deliver { epoch, seq, .. } => Some((epoch.0, seq.0)),
                _ => None,
            })
            .collect()
    }

    fn durable_config() -> Config {
        Config {
            replicate_all: ["h".to_owned()].into(),
            durable: ["h".to_owned()].into(),
            ..Config::default()
        }
    }

    /// An origin restarts with its log while a peer is behind in its previous epoch: the
    /// peer gets the rest of that epoch, then `End`, then the new epoch — every message once,
    /// in order, with no discontinuity — and learns that it caught up.
    #[test]
    fn a_restarted_origin_ends_its_previous_epoch_after_resending_the_rest() {
        let a = NodeId::parse("eu-west/edge-1").unwrap();
        let b = NodeId::parse("us-east/edge-1").unwrap();
        let ch = ChannelName::parse("h:x").unwrap();
        let ids = [a.clone(), b.clone()];
        let now = Instant::now();
        let mut ra = Replica::new(a.clone(), Epoch(10), &ids, durable_config());
        let mut rb = Replica::new(b.clone(), Epoch(20), &ids, durable_config());
        ra.handle_link_up(now, &b);
        rb.handle_link_up(now, &a);
        for k in 1..=3 {
            ra.publish_next(now, ch.clone(), Bytes::from(format!("m{k}")));
        }
        assert_eq!(delivered(&exchange(&mut ra, &mut rb, now)), [(10, 1), (10, 2), (10, 3)]);
        // The link drops; A logs two more, then crashes and restarts with its log.
        ra.handle_link_down(now, &b);
        rb.handle_link_down(now, &a);
        for k in 4..=5 {
            ra.publish_next(now, ch.clone(), Bytes::from(format!("m{k}")));
        }
        let log = ra.durable_state();
        let mut ra = Replica::restore(a.clone(), Epoch(11), &ids, durable_config(), log);
        ra.publish_next(now, ch.clone(), Bytes::from("new"));
        ra.handle_link_up(now, &b);
        rb.handle_link_up(now, &a);
        let events = exchange(&mut ra, &mut rb, now);
        assert_eq!(delivered(&events), [(10, 4), (10, 5), (11, 1)]);
        assert!(!events.iter().any(|e| matches!(e, Event::Discontinuity { .. })), "{events:?}");
        assert_eq!(ra.unacknowledged(), 0);
        assert!(rb.caught_up_with(&a), "B has everything A had for it");
    }

    /// An origin that lost its log ends the epoch a peer is in without a last sequence: the
    /// peer reports the rest as lost and takes the new epoch.
    #[test]
    fn an_origin_without_its_log_ends_the_old_epoch_as_lost() {
        let a = NodeId::parse("eu-west/edge-1").unwrap();
        let b = NodeId::parse("us-east/edge-1").unwrap();
        let ch = ChannelName::parse("h:x").unwrap();
        let ids = [a.clone(), b.clone()];
        let now = Instant::now();
        let mut ra = Replica::new(a.clone(), Epoch(10), &ids, durable_config());
        let mut rb = Replica::new(b.clone(), Epoch(20), &ids, durable_config());
        ra.handle_link_up(now, &b);
        rb.handle_link_up(now, &a);
        ra.publish_next(now, ch.clone(), Bytes::from("m1"));
        exchange(&mut ra, &mut rb, now);
        let mut ra = Replica::new(a.clone(), Epoch(11), &ids, durable_config());
        ra.publish_next(now, ch.clone(), Bytes::from("new"));
        ra.handle_link_up(now, &b);
        rb.handle_link_down(now, &a);
        rb.handle_link_up(now, &a);
        let events = exchange(&mut ra, &mut rb, now);
        assert!(
            matches!(
                events.first(),
                Some(Event::Discontinuity { epoch: Epoch(10), after: Seq(1), through: None, .. })
            ),
            "{events:?}"
        );
        assert_eq!(delivered(&events), [(11, 1)]);
    }

    /// A receiver still in an origin's earlier epoch of a durable channel drops the new
    /// epoch's data while it waits for the origin's `End`; without one and without progress
    /// for `END_WAIT`, it reports the rest as lost and takes the new epoch.
    #[test]
    fn a_receiver_waits_for_end_but_not_forever() {
        let a = NodeId::parse("eu-west/edge-1").unwrap();
        let b = NodeId::parse("us-east/edge-1").unwrap();
        let ch = ChannelName::parse("h:x").unwrap();
        let now = Instant::now();
        let mut rb = Replica::new(b.clone(), Epoch(20), &[a.clone(), b], durable_config());
        rb.handle_link_up(now, &a);
        let data = |epoch, seq| Frame::Data {
            origin: a.clone(),
            epoch: Epoch(epoch),
            channel: ch.clone(),
            seq: Seq(seq),
            payload: Bytes::from("x"),
        };
        rb.handle_frame(now, &a, data(10, 1));
        rb.handle_frame(now, &a, data(11, 1));
        let events: Vec<Event> = std::iter::from_fn(|| rb.poll_event()).collect();
        assert_eq!(delivered(&events), [(10, 1)], "the new epoch waits");
        let later = now + END_WAIT;
        rb.handle_frame(later, &a, data(11, 1));
        let events: Vec<Event> = std::iter::from_fn(|| rb.poll_event()).collect();
        assert!(matches!(events[0], Event::Discontinuity { through: None, .. }), "{events:?}");
        assert_eq!(delivered(&events), [(11, 1)]);
    }

    /// A node asks an origin for its channel's head; the origin's node answers; the answer
    /// reaches the asker. A question to an unreachable origin is asked again when the link
    /// comes back.
    #[test]
    fn a_head_question_is_answered_and_asked_again_after_the_link_returns() {
        let a = NodeId::parse("eu-west/edge-1").unwrap();
        let b = NodeId::parse("us-east/edge-1").unwrap();
        let ch = ChannelName::parse("chat:x").unwrap();
        let ids = [a.clone(), b.clone()];
        let now = Instant::now();
        let mut ra = Replica::new(a.clone(), Epoch(10), &ids, Config::default());
        let mut rb = Replica::new(b.clone(), Epoch(20), &ids, Config::default());
        // B asks while its link to A is down: nothing goes out.
        let nonce = rb.request_head(now, &a, &ch);
        assert!(std::iter::from_fn(|| rb.poll_transmit()).next().is_none());
        ra.handle_link_up(now, &b);
        rb.handle_link_up(now, &a);
        let later = now + Duration::from_millis(50);
        rb.handle_timeout(later);
        let mut answered = false;
        for _ in 0..10 {
            while let Some((_, f)) = rb.poll_transmit() {
                ra.handle_frame(later, &b, f);
            }
            while let Some(e) = ra.poll_event() {
                if let Event::HeadRequested { peer, channel, nonce } = e {
                    ra.answer_head(&peer, channel, nonce, Epoch(10), Seq(42));
                    answered = true;
                }
            }
            while let Some((_, f)) = ra.poll_transmit() {
                rb.handle_frame(later, &a, f);
            }
        }
        assert!(answered, "A was asked once the link was up");
        assert_eq!(rb.head(nonce), Some((Epoch(10), Seq(42))));
        rb.forget_head(nonce);
        assert_eq!(rb.head(nonce), None);
    }

    /// A broken or hostile peer sends the largest numbers a frame can hold in every control
    /// frame: nothing panics (the core runs the whole backbone), nothing it does to its own
    /// streams reaches another origin's, and this node's messages still reach it in order.
    #[test]
    fn the_largest_numbers_in_control_frames_cost_nothing() {
        let a = NodeId::parse("eu-west/edge-1").unwrap();
        let b = NodeId::parse("us-east/edge-1").unwrap();
        let ch = ChannelName::parse("h:x").unwrap();
        let routed = ChannelName::parse("chat:x").unwrap();
        let ids = [a.clone(), b.clone()];
        let now = Instant::now();
        let mut ra = Replica::new(a.clone(), Epoch(10), &ids, durable_config());
        ra.handle_link_up(now, &b);
        ra.add_interest(now, &routed);
        let max = Seq(u64::MAX);
        let hostile = [
            Frame::Ack { channel: ch.clone(), epoch: Epoch(10), seq: max },
            Frame::Nack { channel: ch.clone(), epoch: Epoch(10), from: Seq(0), to: max },
            Frame::Gone { channel: ch.clone(), epoch: Epoch(7), through: max },
            Frame::End {
                channel: ch.clone(),
                epoch: Epoch(7),
                last: Some(max),
                next: Epoch(u64::MAX),
            },
            Frame::Start {
                channel: routed.clone(),
                epoch: Epoch(7),
                after: max,
                generation: u64::MAX,
            },
            Frame::Heartbeat { epoch: Epoch(u64::MAX), greeted: true, caught_up: true },
            Frame::Head { channel: ch.clone(), epoch: Epoch(u64::MAX), seq: max, nonce: u64::MAX },
            Frame::HeadRequest { channel: ch.clone(), nonce: u64::MAX },
            Frame::Interest { channel: ch.clone(), generation: u64::MAX, withdraw: false },
            Frame::Data {
                origin: b.clone(),
                epoch: Epoch(7),
                channel: ch.clone(),
                seq: max,
                payload: Bytes::from("far"),
            },
        ];
        for f in hostile.iter().cloned() {
            ra.handle_frame(now, &b, f);
        }
        ra.handle_timeout(now + Duration::from_secs(1));
        while ra.poll_transmit().is_some() {}
        while ra.poll_event().is_some() {}
        for k in 0..5 {
            ra.publish_next(now, ch.clone(), Bytes::from(format!("m{k}")));
        }
        let mut rb = Replica::new(b.clone(), Epoch(20), &ids, durable_config());
        rb.handle_link_up(now, &a);
        ra.handle_link_down(now, &b);
        ra.handle_link_up(now, &b);
        let events = exchange(&mut ra, &mut rb, now);
        assert_eq!(delivered(&events), [(10, 1), (10, 2), (10, 3), (10, 4), (10, 5)]);
    }
}
