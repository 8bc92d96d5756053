//! The replication state machine of one node.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_proto::types::{ChannelName, Epoch, NodeId, Seq};

use super::frame::{Frame, Have};

/// Replication settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Messages kept per channel in the origin log for repair and catch-up. A peer that falls
    /// further behind gets a `Gone` and reports a discontinuity.
    pub retention: usize,
    /// Timer granularity: acks, retransmissions and re-Nacks run on this tick.
    pub tick: Duration,
    /// Unacknowledged data is resent, and a gap re-Nacked, after this long without progress.
    pub rto: Duration,
    /// Most messages resent to one peer for one channel per retransmission.
    pub resend_batch: usize,
    /// How often each peer is told this node's epoch.
    pub heartbeat: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            retention: 10_000,
            tick: Duration::from_millis(20),
            rto: Duration::from_millis(200),
            resend_batch: 256,
            heartbeat: Duration::from_secs(1),
        }
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

/// Receive state for one (origin, channel).
#[derive(Debug, Clone)]
struct Recv {
    epoch: Epoch,
    delivered: u64,
    /// Out-of-order messages waiting for the gap before them.
    held: BTreeMap<u64, Bytes>,
    last_nack: Option<Instant>,
}

/// Per-peer link state (for this node's own channels).
#[derive(Debug, Clone, Default)]
struct Link {
    up: bool,
    /// The peer's epoch, once heard. A change means it lost its state.
    peer_epoch: Option<Epoch>,
    /// What the peer acknowledged of each of this node's channels (current epoch).
    acked: BTreeMap<ChannelName, u64>,
    /// When the peer last made progress on a channel, or data was last sent for it.
    progress_at: BTreeMap<ChannelName, Instant>,
}

/// The state that survives a restart when the node keeps its log.
#[derive(Debug, Clone)]
pub struct Persisted {
    epoch: Epoch,
    logs: BTreeMap<ChannelName, OriginLog>,
    positions: BTreeMap<(NodeId, ChannelName), (Epoch, u64)>,
}

/// The replication core of one node. See the module docs for the data path.
#[derive(Debug)]
pub struct Replica {
    me: NodeId,
    epoch: Epoch,
    config: Config,
    logs: BTreeMap<ChannelName, OriginLog>,
    recv: BTreeMap<(NodeId, ChannelName), Recv>,
    links: BTreeMap<NodeId, Link>,
    /// (origin, channel) whose progress has not been acknowledged yet.
    ack_due: BTreeSet<(NodeId, ChannelName)>,
    next_tick: Option<Instant>,
    last_heartbeat: Option<Instant>,
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
            recv: BTreeMap::new(),
            links,
            ack_due: BTreeSet::new(),
            next_tick: None,
            last_heartbeat: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// A node restarted with its log: same epoch, sequences continue, positions kept.
    pub fn restore(me: NodeId, peers: &[NodeId], config: Config, state: Persisted) -> Self {
        let mut r = Self::new(me, state.epoch, peers, config);
        r.logs = state.logs;
        r.recv = state
            .positions
            .into_iter()
            .map(|(k, (epoch, delivered))| {
                (k, Recv { epoch, delivered, held: BTreeMap::new(), last_nack: None })
            })
            .collect();
        r
    }

    /// The durable part of the state (what a node writes to its log).
    pub fn persisted(&self) -> Persisted {
        Persisted {
            epoch: self.epoch,
            logs: self.logs.clone(),
            positions: self.recv.iter().map(|(k, r)| (k.clone(), (r.epoch, r.delivered))).collect(),
        }
    }

    /// This node's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Sequences a local publish and sends it to every reachable peer. Returns its sequence.
    pub fn publish(&mut self, now: Instant, channel: ChannelName, payload: Bytes) -> Seq {
        let retention = self.config.retention.max(1);
        let log = self.logs.entry(channel.clone()).or_default();
        log.last += 1;
        let seq = log.last;
        log.entries.push_back((seq, payload.clone()));
        while log.entries.len() > retention {
            log.entries.pop_front();
        }
        let frame = self.data(&channel, seq, payload);
        for (peer, link) in &mut self.links {
            if link.up {
                // A peer that was caught up starts its retransmission clock now; one still
                // behind keeps its older clock, so the repair continues on time.
                if link.acked.get(&channel).copied().unwrap_or(0) + 1 >= seq {
                    link.progress_at.insert(channel.clone(), now);
                }
                self.transmit.push_back((peer.clone(), frame.clone()));
            }
        }
        self.arm(now);
        Seq(seq)
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
        if self.next_tick.is_none() {
            self.next_tick = Some(now + self.config.tick);
        }
    }

    /// The transport reports that the link to `peer` is up (connected, or reconnected).
    pub fn handle_link_up(&mut self, now: Instant, peer: &NodeId) {
        let Some(link) = self.links.get_mut(peer) else { return };
        link.up = true;
        let have = self
            .recv
            .iter()
            .filter(|((origin, _), _)| origin == peer)
            .map(|((_, channel), r)| Have {
                channel: channel.clone(),
                epoch: r.epoch,
                delivered: Seq(r.delivered),
            })
            .collect();
        self.transmit.push_back((peer.clone(), Frame::Hello { epoch: self.epoch, have }));
        self.arm(now);
    }

    /// The transport reports that the link to `peer` is down.
    pub fn handle_link_down(&mut self, _now: Instant, peer: &NodeId) {
        if let Some(link) = self.links.get_mut(peer) {
            link.up = false;
        }
    }

    /// A frame arrived from `from`.
    pub fn handle_frame(&mut self, now: Instant, from: &NodeId, frame: Frame) {
        if !self.links.contains_key(from) {
            return; // not a peer of this mesh
        }
        self.arm(now);
        match frame {
            Frame::Hello { epoch, have } => self.on_hello(now, from, epoch, have),
            Frame::Heartbeat { epoch } => self.on_peer_epoch(from, epoch),
            Frame::Data { origin, epoch, channel, seq, payload } => {
                if origin != self.me {
                    self.on_data(now, origin, epoch, channel, seq.0, payload);
                }
            }
            Frame::Ack { channel, epoch, seq } => {
                if epoch == self.epoch {
                    let link = self.links.get_mut(from).expect("checked above");
                    let acked = link.acked.entry(channel.clone()).or_insert(0);
                    if seq.0 > *acked {
                        *acked = seq.0;
                        link.progress_at.insert(channel, now);
                    }
                }
            }
            Frame::Nack { channel, epoch, from: first, to } => {
                if epoch == self.epoch {
                    self.resend(from, &channel, first.0, to.0);
                }
            }
            Frame::Gone { channel, epoch, through } => {
                self.on_gone(from, channel, epoch, through.0)
            }
        }
    }

    /// A peer announced its epoch: if it is newer than what we hold of its channels, it
    /// restarted without its log, and what we hold of its old epoch is finished.
    fn on_peer_epoch(&mut self, from: &NodeId, epoch: Epoch) {
        if let Some(link) = self.links.get_mut(from) {
            if link.peer_epoch.is_some_and(|e| e != epoch) {
                // It lost what it had of our channels too: resend everything retained.
                link.acked.clear();
                link.progress_at.clear();
            }
            link.peer_epoch = Some(epoch);
        }
        let stale: Vec<ChannelName> = self
            .recv
            .iter()
            .filter(|((origin, _), r)| origin == from && r.epoch < epoch)
            .map(|((_, c), _)| c.clone())
            .collect();
        for channel in stale {
            self.new_epoch(from.clone(), channel, epoch);
        }
    }

    fn on_hello(&mut self, now: Instant, from: &NodeId, epoch: Epoch, have: Vec<Have>) {
        self.on_peer_epoch(from, epoch);
        let my_epoch = self.epoch;
        let channels: Vec<ChannelName> = self.logs.keys().cloned().collect();
        let link = self.links.get_mut(from).expect("checked by caller");
        for channel in &channels {
            let acked = have
                .iter()
                .find(|h| &h.channel == channel && h.epoch == my_epoch)
                .map_or(0, |h| h.delivered.0);
            link.acked.insert(channel.clone(), acked);
            link.progress_at.insert(channel.clone(), now);
        }
        for channel in channels {
            let last = self.logs[&channel].last;
            let acked = self.links[from].acked[&channel];
            if acked < last {
                self.resend(from, &channel, acked + 1, last);
            }
        }
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
            self.events.push_back(Event::Discontinuity {
                origin,
                channel,
                epoch: old.epoch,
                after: Seq(old.delivered),
                through: None,
            });
        }
        self.recv.insert(key, Recv { epoch, delivered: 0, held: BTreeMap::new(), last_nack: None });
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
        match self.recv.get(&key) {
            None => {
                self.recv.insert(
                    key.clone(),
                    Recv { epoch, delivered: 0, held: BTreeMap::new(), last_nack: None },
                );
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
        r.held.insert(seq, payload);
        self.drain(&key);
        let rto = self.config.rto;
        let r = self.recv.get_mut(&key).expect("still there");
        if let Some((&first_held, _)) = r.held.iter().next() {
            if r.last_nack.is_none_or(|t| now.duration_since(t) >= rto) {
                r.last_nack = Some(now);
                let nack = Frame::Nack {
                    channel,
                    epoch,
                    from: Seq(r.delivered + 1),
                    to: Seq(first_held - 1),
                };
                self.transmit.push_back((origin, nack));
            }
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
        let r = self.recv.entry(key.clone()).or_insert_with(|| Recv {
            epoch,
            delivered: 0,
            held: BTreeMap::new(),
            last_nack: None,
        });
        if r.epoch != epoch || r.delivered >= through {
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

    /// Time passed: send due acks, retransmit what peers have not acknowledged, re-Nack gaps.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.next_tick {
            Some(t) if now >= t => self.next_tick = Some(now + self.config.tick),
            _ => return,
        }
        if self.last_heartbeat.is_none_or(|t| now.duration_since(t) >= self.config.heartbeat) {
            self.last_heartbeat = Some(now);
            for (peer, link) in &self.links {
                if link.up {
                    self.transmit.push_back((peer.clone(), Frame::Heartbeat { epoch: self.epoch }));
                }
            }
        }
        for (origin, channel) in std::mem::take(&mut self.ack_due) {
            if let Some(r) = self.recv.get(&(origin.clone(), channel.clone())) {
                if self.links.get(&origin).is_some_and(|l| l.up) {
                    let ack = Frame::Ack { channel, epoch: r.epoch, seq: Seq(r.delivered) };
                    self.transmit.push_back((origin, ack));
                }
            }
        }
        let rto = self.config.rto;
        let mut resends = Vec::new();
        for (peer, link) in &mut self.links {
            if !link.up {
                continue;
            }
            for (channel, log) in &self.logs {
                let acked = link.acked.get(channel).copied().unwrap_or(0);
                if acked >= log.last {
                    continue;
                }
                let since = link.progress_at.entry(channel.clone()).or_insert(now);
                if now.duration_since(*since) >= rto {
                    *since = now;
                    let last = log.last.min(acked + self.config.resend_batch as u64);
                    resends.push((peer.clone(), channel.clone(), acked + 1, last));
                }
            }
        }
        for (peer, channel, first, last) in resends {
            self.resend(&peer, &channel, first, last);
        }
        let mut nacks = Vec::new();
        for ((origin, channel), r) in &mut self.recv {
            let Some((&first_held, _)) = r.held.iter().next() else { continue };
            if r.last_nack.is_none_or(|t| now.duration_since(t) >= rto)
                && self.links.get(origin).is_some_and(|l| l.up)
            {
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
