//! Presence replication: who is on which channel, across nodes. Sans-IO, beside the
//! [`Replica`](super::Replica), in the same `handle_*` / `poll_*` shape.
//!
//! Each node is the only writer of its own members (the connections it holds). It numbers
//! every change to them with one counter, its **version**, that grows within an epoch; a
//! channel's changes form a chain (each delta names the version of the channel's change
//! before it), so a peer applies a delta only on top of exactly what it has and asks for the
//! channel's full state otherwise. Frames may be lost, repeated or reordered: nothing is
//! applied twice or out of order, and what is missed is repaired from the owner's periodic
//! **digest** (its channels and their versions), which is also the first thing a link
//! carries when it comes up.
//!
//! ```text
//!  enter/update/leave ──▶ own members, version += 1 ──▶ Delta (batched per flush) ──▶ peers
//!  peer frames ─────────▶ handle_frame: Digest → StateRequest for what is behind, drop
//!                         what the owner no longer has; Delta → apply on the chain or ask;
//!                         State → replace the channel's members, reporting the difference
//!  link down ───────────▶ after `down_after`, every member of that node leaves, once
//!  new owner epoch ─────▶ its channels are replaced as its digest and states arrive
//! ```
//!
//! Members that stay through a short outage, a lost delta or a repeated state are never
//! reported as leaving: a state replaces a channel by difference, so only real changes
//! become events (Phoenix.Tracker's model: owners replicate their own members, a node is
//! discarded only when down for a set period).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_proto::types::{ChannelName, Epoch, NodeId};

/// Presence settings.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// A node unreachable this long has all its members leave (synthesised `Leave` events,
    /// once); when it returns, its current members enter again.
    pub down_after: Duration,
    /// How often each linked peer gets this node's digest (repairs lost deltas).
    pub sync_interval: Duration,
    /// A state asked for and not received is asked for again after this long, then after
    /// twice as long, and so on up to 8 times as long.
    pub retry: Duration,
    /// The most bytes of members or channels one frame carries (about): larger digests,
    /// deltas and states are split, each part well inside the backbone's frame limit.
    pub frame_budget: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            down_after: Duration::from_secs(30),
            sync_interval: Duration::from_secs(2),
            retry: Duration::from_millis(500),
            frame_budget: 256 * 1024,
        }
    }
}

/// A member: one connection of one client on a channel.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberKey {
    /// The client id (the token's subject, or the self-declared id in dev mode).
    pub client_id: String,
    /// The connection, unique on its node.
    pub connection_id: String,
}

/// One change of a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The member entered, or its data changed.
    Put {
        /// Who.
        key: MemberKey,
        /// Its data.
        data: Bytes,
    },
    /// The member left.
    Leave {
        /// Who.
        key: MemberKey,
    },
}

/// A presence frame between two nodes. Every frame carries the owner's `epoch` and `as_of`,
/// the owner's version when it sent the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceFrame {
    /// The sender's channels with members and the version of each one's last change, those
    /// named after `after` and up to `until` (a large digest is sent in ranges).
    Digest {
        /// The sender's epoch.
        epoch: Epoch,
        /// The sender's version.
        as_of: u64,
        /// Its channels with members in the range, each with its last change's version.
        channels: Vec<(ChannelName, u64)>,
        /// The range starts after this channel (None: at the first).
        after: Option<ChannelName>,
        /// The range ends with this channel (None: at the last).
        until: Option<ChannelName>,
    },
    /// Changes of the sender's members of `channel`, `prev` being the version of the
    /// channel's change before them (0: the channel had no members) and `version` the last.
    Delta {
        /// The sender's epoch.
        epoch: Epoch,
        /// The sender's version.
        as_of: u64,
        /// The channel.
        channel: ChannelName,
        /// The version these changes follow.
        prev: u64,
        /// The version of the last of them.
        version: u64,
        /// In order.
        changes: Vec<Change>,
    },
    /// All of the sender's members of `channel` (none: it has none).
    State {
        /// The sender's epoch.
        epoch: Epoch,
        /// The sender's version.
        as_of: u64,
        /// The channel.
        channel: ChannelName,
        /// The version of the channel's last change (for no members: `as_of`).
        version: u64,
        /// The members and their data (of this part).
        members: Vec<(MemberKey, Bytes)>,
        /// This part's number, from 0 (a large state is sent in parts, applied together).
        part: u32,
        /// How many parts the state has (0 or 1: one).
        parts: u32,
    },
    /// Asks the recipient for its state of `channel`.
    StateRequest {
        /// The channel.
        channel: ChannelName,
    },
}

/// What a member did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// It entered.
    Enter,
    /// Its data changed.
    Update,
    /// It left (or its node was down for `down_after`, or restarted without it).
    Leave,
}

/// A presence event for the node's subscribers: of its own members and of its peers'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    /// The channel.
    pub channel: ChannelName,
    /// The node that owns the member.
    pub owner: NodeId,
    /// What happened.
    pub action: Action,
    /// Who.
    pub key: MemberKey,
    /// Its data (on `Leave`, the last it had).
    pub data: Bytes,
}

/// Queue slots kept once a queue is drained: a burst's (say 100,000 members entering at once)
/// is given back, not held for good.
const QUEUE_KEPT: usize = 1024;

/// Most parts a state may come in (a peer's frame is not trusted to size an allocation):
/// far more than a channel of `presence.max_members` members needs at `frame_budget`.
const MAX_PARTS: u32 = 65_536;

/// About the bytes a change takes in a frame.
fn change_size(change: &Change) -> usize {
    match change {
        Change::Put { key, data } => member_size(key, data),
        Change::Leave { key } => member_size(key, &Bytes::new()),
    }
}

fn member_size(key: &MemberKey, data: &Bytes) -> usize {
    key.client_id.len() + key.connection_id.len() + data.len() + 16
}

/// Errors of the local operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceError {
    /// `update` or `leave` of a member that is not present.
    NotPresent,
}

#[derive(Debug, Default)]
struct Own {
    /// The version of the channel's last change.
    version: u64,
    /// The version before the first change not yet sent (None: nothing pending).
    pending_prev: Option<u64>,
    /// Changes not yet sent, each with its version.
    pending: Vec<(u64, Change)>,
    members: BTreeMap<MemberKey, Bytes>,
}

#[derive(Debug, Default)]
struct Remote {
    /// The version of the last change applied.
    version: u64,
    /// Members of an earlier epoch of the owner, kept until the new epoch's state replaces
    /// them (or its digest drops the channel).
    old: bool,
    members: BTreeMap<MemberKey, Bytes>,
}

#[derive(Debug)]
struct Peer {
    up: bool,
    /// Since when the link is down (None: up, or the node already counted as down).
    down_since: Option<Instant>,
    /// The newest epoch heard of.
    epoch: Option<Epoch>,
    /// Nothing at or below this version creates a channel (what made channels absent).
    floor: u64,
    /// The highest `as_of` heard in `epoch`.
    max_as_of: u64,
    channels: BTreeMap<ChannelName, Remote>,
    /// States asked for.
    asked: BTreeMap<ChannelName, Asked>,
    /// States arriving in parts, applied when the last part is in.
    parts: BTreeMap<ChannelName, Parts>,
    /// Counted as down (after `down_after`) and not linked since: frames still in flight
    /// from it are ignored, so nothing it sent can outlive its leave.
    gone: bool,
}

/// A state arriving in parts.
#[derive(Debug)]
struct Parts {
    epoch: Epoch,
    as_of: u64,
    version: u64,
    got: Vec<Option<Vec<(MemberKey, Bytes)>>>,
    missing: usize,
}

/// A state asked for.
#[derive(Debug, Clone, Copy)]
struct Asked {
    /// When it was last asked for.
    at: Instant,
    /// The peer's `floor` when first asked: a state older than that may be stale; a newer
    /// one answers this request. (Kept per request, so that what empties other channels of
    /// the owner meanwhile does not make the answer look stale.)
    floor: u64,
    /// How often it was asked again (the wait doubles each time, up to 8 × `retry`).
    tries: u32,
}

impl Asked {
    fn due(&self, retry: Duration) -> Instant {
        self.at + retry * (1u32 << self.tries.min(3))
    }
}

impl Peer {
    /// Asks `from` for its state of `channel`, unless that is already asked for.
    fn ask(
        &mut self,
        transmit: &mut VecDeque<(NodeId, PresenceFrame)>,
        from: &NodeId,
        channel: ChannelName,
        now: Instant,
    ) {
        if self.asked.contains_key(&channel) {
            return;
        }
        self.asked.insert(channel.clone(), Asked { at: now, floor: self.floor, tries: 0 });
        transmit.push_back((from.clone(), PresenceFrame::StateRequest { channel }));
    }

    fn new() -> Self {
        Self {
            up: false,
            down_since: None,
            epoch: None,
            floor: 0,
            max_as_of: 0,
            channels: BTreeMap::new(),
            asked: BTreeMap::new(),
            parts: BTreeMap::new(),
            gone: false,
        }
    }
}

/// The presence state machine of one node.
#[derive(Debug)]
pub struct Presence {
    me: NodeId,
    epoch: Epoch,
    config: PresenceConfig,
    version: u64,
    own: BTreeMap<ChannelName, Own>,
    peers: BTreeMap<NodeId, Peer>,
    next_sync: Option<Instant>,
    transmit: VecDeque<(NodeId, PresenceFrame)>,
    events: VecDeque<PresenceEvent>,
}

impl Presence {
    /// A node with no members, its peers not yet linked.
    pub fn new(me: NodeId, epoch: Epoch, peers: &[NodeId], config: PresenceConfig) -> Self {
        let peers = peers.iter().filter(|p| **p != me).map(|p| (p.clone(), Peer::new())).collect();
        Self {
            me,
            epoch,
            config,
            version: 0,
            own: BTreeMap::new(),
            peers,
            next_sync: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// This node's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Enters `key` on `channel` with `data`, or updates its data if it is present. A put
    /// with the data the member already has changes nothing.
    pub fn put(&mut self, channel: &ChannelName, key: MemberKey, data: Bytes) {
        let own = self.own.entry(channel.clone()).or_default();
        let action = match own.members.get(&key) {
            Some(d) if *d == data => return,
            Some(_) => Action::Update,
            None => Action::Enter,
        };
        self.version += 1;
        own.pending_prev.get_or_insert(own.version);
        own.version = self.version;
        own.members.insert(key.clone(), data.clone());
        own.pending.push((self.version, Change::Put { key: key.clone(), data: data.clone() }));
        let owner = self.me.clone();
        self.events.push_back(PresenceEvent { channel: channel.clone(), owner, action, key, data });
    }

    /// `key` leaves `channel`.
    pub fn leave(&mut self, channel: &ChannelName, key: &MemberKey) -> Result<(), PresenceError> {
        let own = self.own.get_mut(channel).ok_or(PresenceError::NotPresent)?;
        let data = own.members.remove(key).ok_or(PresenceError::NotPresent)?;
        self.version += 1;
        own.pending_prev.get_or_insert(own.version);
        own.version = self.version;
        own.pending.push((self.version, Change::Leave { key: key.clone() }));
        let (owner, key) = (self.me.clone(), key.clone());
        let event =
            PresenceEvent { channel: channel.clone(), owner, action: Action::Leave, key, data };
        self.events.push_back(event);
        Ok(())
    }

    /// This node's own members of `channel`.
    pub fn own_members(&self, channel: &ChannelName) -> Vec<(MemberKey, Bytes)> {
        let Some(own) = self.own.get(channel) else { return Vec::new() };
        own.members.iter().map(|(k, d)| (k.clone(), d.clone())).collect()
    }

    /// Every member of `channel` this node knows of, its own and its peers', with the owner.
    pub fn members(&self, channel: &ChannelName) -> Vec<(NodeId, MemberKey, Bytes)> {
        let mut out: Vec<_> =
            self.own_members(channel).into_iter().map(|(k, d)| (self.me.clone(), k, d)).collect();
        for (id, peer) in &self.peers {
            if let Some(r) = peer.channels.get(channel) {
                out.extend(r.members.iter().map(|(k, d)| (id.clone(), k.clone(), d.clone())));
            }
        }
        out
    }

    /// Up to `limit` members of `channel` (this node's and its peers') in the order of
    /// (member key, owner), starting after `after`: a page, read in O(limit · owners) plus
    /// a lookup per owner.
    pub fn page(
        &self,
        channel: &ChannelName,
        after: Option<(&MemberKey, &NodeId)>,
        limit: usize,
    ) -> Vec<(NodeId, MemberKey, Bytes)> {
        use std::ops::Bound;
        let mut owners: Vec<(&NodeId, &BTreeMap<MemberKey, Bytes>)> = Vec::new();
        if let Some(own) = self.own.get(channel) {
            owners.push((&self.me, &own.members));
        }
        for (id, peer) in &self.peers {
            if let Some(r) = peer.channels.get(channel) {
                owners.push((id, &r.members));
            }
        }
        let mut sources: Vec<_> = owners
            .into_iter()
            .map(|(id, members)| {
                let start = match after {
                    None => Bound::Unbounded,
                    // The same key of a later owner still comes after.
                    Some((key, owner)) if id > owner => Bound::Included(key),
                    Some((key, _)) => Bound::Excluded(key),
                };
                (id, members.range::<MemberKey, _>((start, Bound::Unbounded)).peekable())
            })
            .collect();
        let mut out = Vec::new();
        while out.len() < limit {
            // The smallest (key, owner) of the owners' next members.
            let mut best: Option<(usize, &MemberKey, &NodeId)> = None;
            for (i, (id, it)) in sources.iter_mut().enumerate() {
                let Some((key, _)) = it.peek() else { continue };
                if best.is_none_or(|(_, k, o)| (*key, *id) < (k, o)) {
                    best = Some((i, key, id));
                }
            }
            let Some((i, _, _)) = best else { break };
            let (id, it) = &mut sources[i];
            let Some((key, data)) = it.next() else { break };
            out.push(((*id).clone(), key.clone(), data.clone()));
        }
        out
    }

    /// How many members of `channel` this node knows of, its own and its peers'.
    pub fn member_count(&self, channel: &ChannelName) -> usize {
        self.own.get(channel).map_or(0, |o| o.members.len())
            + self
                .peers
                .values()
                .filter_map(|p| p.channels.get(channel))
                .map(|r| r.members.len())
                .sum::<usize>()
    }

    /// Whether `key` is one of this node's own members of `channel`.
    pub fn is_member(&self, channel: &ChannelName, key: &MemberKey) -> bool {
        self.own.get(channel).is_some_and(|o| o.members.contains_key(key))
    }

    /// The channels this node knows members of.
    pub fn channels(&self) -> Vec<ChannelName> {
        let mut out: Vec<ChannelName> = self.own.keys().cloned().collect();
        for peer in self.peers.values() {
            out.extend(peer.channels.keys().cloned());
        }
        out.sort();
        out.dedup();
        out
    }

    /// Sends every pending change, one delta per channel to every linked peer.
    pub fn flush(&mut self) {
        let linked: Vec<NodeId> =
            self.peers.iter().filter(|(_, p)| p.up).map(|(id, _)| id.clone()).collect();
        let mut emptied = Vec::new();
        let budget = self.config.frame_budget;
        for (channel, own) in &mut self.own {
            let Some(mut prev) = own.pending_prev.take() else { continue };
            // Split into deltas of at most `budget` bytes, each following the one before.
            let mut changes = Vec::new();
            let mut size = 0;
            let mut pending = std::mem::take(&mut own.pending).into_iter().peekable();
            while let Some((version, change)) = pending.next() {
                size += change_size(&change);
                changes.push(change);
                let full = pending.peek().is_some_and(|(_, c)| size + change_size(c) > budget);
                if !full && pending.peek().is_some() {
                    continue;
                }
                let frame = PresenceFrame::Delta {
                    epoch: self.epoch,
                    as_of: self.version,
                    channel: channel.clone(),
                    prev,
                    version,
                    changes: std::mem::take(&mut changes),
                };
                prev = version;
                size = 0;
                for peer in &linked {
                    self.transmit.push_back((peer.clone(), frame.clone()));
                }
            }
            if own.members.is_empty() {
                emptied.push(channel.clone());
            }
        }
        for channel in emptied {
            self.own.remove(&channel);
        }
    }

    /// This node's digest, in ranges of at most `frame_budget` bytes.
    fn digest(&self) -> Vec<PresenceFrame> {
        let (epoch, as_of) = (self.epoch, self.version);
        let mut out = Vec::new();
        let mut after: Option<ChannelName> = None;
        let mut channels = Vec::new();
        let mut size = 0;
        for (c, o) in self.own.iter().filter(|(_, o)| !o.members.is_empty()) {
            let len = c.as_str().len() + 16;
            if size + len > self.config.frame_budget && !channels.is_empty() {
                let until: Option<ChannelName> = channels.last().map(|(c, _)| Clone::clone(c));
                let channels = std::mem::take(&mut channels);
                out.push(PresenceFrame::Digest {
                    epoch,
                    as_of,
                    channels,
                    after: after.clone(),
                    until: until.clone(),
                });
                after = until;
                size = 0;
            }
            size += len;
            channels.push((c.clone(), o.version));
        }
        out.push(PresenceFrame::Digest { epoch, as_of, channels, after, until: None });
        out
    }

    /// A link to `peer` came up: it gets this node's digest (and pending changes first).
    pub fn handle_link_up(&mut self, now: Instant, peer: &NodeId) {
        self.flush();
        let digest = self.digest();
        let Some(p) = self.peers.get_mut(peer) else { return };
        p.up = true;
        p.gone = false;
        p.down_since = None;
        // Asked before the link dropped: ask again on this link.
        for a in p.asked.values_mut() {
            a.tries = 0;
            a.at = now.checked_sub(self.config.retry).unwrap_or(now);
        }
        self.transmit.extend(digest.into_iter().map(|d| (peer.clone(), d)));
        self.next_sync.get_or_insert(now + self.config.sync_interval);
    }

    /// The link to `peer` went down: its members stay for `down_after`.
    pub fn handle_link_down(&mut self, now: Instant, peer: &NodeId) {
        let Some(p) = self.peers.get_mut(peer) else { return };
        if p.up {
            p.up = false;
            p.down_since = Some(now);
        }
    }

    /// Timers: flushes pending changes, sends digests, asks again for states not received,
    /// and ends the members of nodes down for `down_after`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.flush();
        if self.next_sync.is_some_and(|at| at <= now) {
            self.next_sync = Some(now + self.config.sync_interval);
            let digest = self.digest();
            for (id, p) in &self.peers {
                if p.up {
                    self.transmit.extend(digest.iter().map(|d| (id.clone(), d.clone())));
                }
            }
        }
        let ids: Vec<NodeId> = self.peers.keys().cloned().collect();
        for id in ids {
            let p = self.peers.get_mut(&id).unwrap();
            if p.down_since.is_some_and(|t| now.duration_since(t) >= self.config.down_after) {
                p.down_since = None;
                p.gone = true;
                p.asked.clear();
                p.parts.clear();
                p.floor = p.floor.max(p.max_as_of);
                let channels: Vec<ChannelName> = p.channels.keys().cloned().collect();
                for channel in channels {
                    self.replace(&id, &channel, BTreeMap::new(), 0);
                }
                continue;
            }
            if !p.up {
                continue;
            }
            for (channel, a) in &mut p.asked {
                if a.due(self.config.retry) <= now {
                    a.at = now;
                    a.tries += 1;
                    let ask = PresenceFrame::StateRequest { channel: channel.clone() };
                    self.transmit.push_back((id.clone(), ask));
                }
            }
        }
    }

    /// When [`Presence::handle_timeout`] wants to run next, at the latest.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at = self.next_sync;
        let mut due = |t: Instant| at = Some(at.map_or(t, |a: Instant| a.min(t)));
        for p in self.peers.values() {
            if let Some(t) = p.down_since {
                due(t + self.config.down_after);
            }
            if p.up {
                for a in p.asked.values() {
                    due(a.due(self.config.retry));
                }
            }
        }
        at
    }

    /// The next frame to send, and to whom.
    pub fn poll_transmit(&mut self) -> Option<(NodeId, PresenceFrame)> {
        let next = self.transmit.pop_front();
        if next.is_none() && self.transmit.capacity() > QUEUE_KEPT {
            // A burst's queue is given back once drained.
            self.transmit = VecDeque::new();
        }
        next
    }

    /// The next event for local subscribers.
    pub fn poll_event(&mut self) -> Option<PresenceEvent> {
        let next = self.events.pop_front();
        if next.is_none() && self.events.capacity() > QUEUE_KEPT {
            self.events = VecDeque::new();
        }
        next
    }

    /// A frame from `from`.
    pub fn handle_frame(&mut self, now: Instant, from: &NodeId, frame: PresenceFrame) {
        if self.peers.get(from).is_none_or(|p| p.gone) {
            return;
        }
        match frame {
            PresenceFrame::StateRequest { channel } => {
                self.flush();
                let (version, members) = match self.own.get(&channel) {
                    Some(o) if !o.members.is_empty() => {
                        (o.version, o.members.iter().map(|(k, d)| (k.clone(), d.clone())).collect())
                    }
                    _ => (self.version, Vec::new()),
                };
                let mut split: Vec<Vec<(MemberKey, Bytes)>> = vec![Vec::new()];
                let mut size = 0;
                for (key, data) in members {
                    let len = member_size(&key, &data);
                    if size + len > self.config.frame_budget && !split[split.len() - 1].is_empty() {
                        split.push(Vec::new());
                        size = 0;
                    }
                    size += len;
                    split.last_mut().unwrap().push((key, data));
                }
                let parts = split.len() as u32;
                for (part, members) in split.into_iter().enumerate() {
                    let state = PresenceFrame::State {
                        epoch: self.epoch,
                        as_of: self.version,
                        channel: channel.clone(),
                        version,
                        members,
                        part: part as u32,
                        parts,
                    };
                    self.transmit.push_back((from.clone(), state));
                }
            }
            PresenceFrame::Digest { epoch, as_of, channels, after, until } => {
                if !self.current(from, epoch, as_of) {
                    return;
                }
                let p = self.peers.get_mut(from).unwrap();
                let listed: BTreeMap<ChannelName, u64> = channels.into_iter().collect();
                let mut dropped = Vec::new();
                let in_range = |c: &ChannelName| {
                    after.as_ref().is_none_or(|a| c > a) && until.as_ref().is_none_or(|u| c <= u)
                };
                for (channel, r) in &p.channels {
                    if in_range(channel)
                        && !listed.contains_key(channel)
                        && (r.old || r.version <= as_of)
                    {
                        dropped.push(channel.clone());
                    }
                }
                for (channel, version) in listed {
                    let behind =
                        p.channels.get(&channel).is_none_or(|r| r.old || r.version < version);
                    if behind {
                        p.ask(&mut self.transmit, from, channel, now);
                    }
                }
                if !dropped.is_empty() {
                    p.floor = p.floor.max(as_of);
                }
                for channel in dropped {
                    self.peers.get_mut(from).unwrap().asked.remove(&channel);
                    self.replace(from, &channel, BTreeMap::new(), as_of);
                }
            }
            PresenceFrame::Delta { epoch, as_of, channel, prev, version, changes } => {
                if !self.current(from, epoch, as_of) {
                    return;
                }
                let p = self.peers.get_mut(from).unwrap();
                let applies = match p.channels.get(&channel) {
                    Some(r) if r.old => false,
                    Some(r) if version <= r.version => return,
                    Some(r) => prev == r.version,
                    // Perhaps older than what emptied the owner's channels: ask.
                    None if version <= p.floor => false,
                    None => prev == 0,
                };
                if !applies {
                    p.ask(&mut self.transmit, from, channel, now);
                    return;
                }
                let r = p.channels.entry(channel.clone()).or_default();
                r.version = version;
                let mut events = Vec::new();
                for change in changes {
                    match change {
                        Change::Put { key, data } => {
                            let action = match r.members.insert(key.clone(), data.clone()) {
                                Some(d) if d == data => continue,
                                Some(_) => Action::Update,
                                None => Action::Enter,
                            };
                            events.push((action, key, data));
                        }
                        Change::Leave { key } => {
                            if let Some(data) = r.members.remove(&key) {
                                events.push((Action::Leave, key, data));
                            }
                        }
                    }
                }
                if r.members.is_empty() {
                    p.channels.remove(&channel);
                    p.floor = p.floor.max(version);
                    // A state asked for before this is older than it.
                    if let Some(a) = p.asked.get_mut(&channel) {
                        a.floor = a.floor.max(version);
                    }
                }
                for (action, key, data) in events {
                    let owner = from.clone();
                    let channel = channel.clone();
                    self.events.push_back(PresenceEvent { channel, owner, action, key, data });
                }
            }
            PresenceFrame::State { epoch, as_of, channel, version, members, part, parts } => {
                if !self.current(from, epoch, as_of) {
                    return;
                }
                let p = self.peers.get_mut(from).unwrap();
                let members = if parts > 1 {
                    if part >= parts || parts > MAX_PARTS {
                        return;
                    }
                    // Parts of one state share (epoch, as_of, version); a newer state's
                    // parts replace an unfinished older one.
                    let fresh = match p.parts.get(&channel) {
                        Some(a) if a.epoch == epoch && a.as_of == as_of && a.version == version => {
                            false
                        }
                        Some(a) if a.epoch == epoch && a.as_of > as_of => return,
                        _ => true,
                    };
                    if fresh {
                        let got = (0..parts).map(|_| None).collect();
                        let assembly =
                            Parts { epoch, as_of, version, got, missing: parts as usize };
                        p.parts.insert(channel.clone(), assembly);
                    }
                    let a = p.parts.get_mut(&channel).unwrap();
                    if a.got.len() != parts as usize || a.got[part as usize].is_some() {
                        return;
                    }
                    a.got[part as usize] = Some(members);
                    a.missing -= 1;
                    if a.missing > 0 {
                        return;
                    }
                    let a = p.parts.remove(&channel).unwrap();
                    a.got.into_iter().flatten().flatten().collect()
                } else {
                    p.parts.remove(&channel);
                    members
                };
                match p.channels.get(&channel) {
                    Some(r) if !r.old && version < r.version => return,
                    Some(_) => {}
                    // An answer to a request, as new as what was known when asking (or
                    // newer): it is accurate. Anything else is a stale repeat.
                    None => match p.asked.get(&channel) {
                        Some(a) if as_of >= a.floor => {}
                        _ => return,
                    },
                }
                p.asked.remove(&channel);
                self.replace(from, &channel, members.into_iter().collect(), version);
                let p = self.peers.get_mut(from).unwrap();
                if !p.channels.contains_key(&channel) {
                    p.floor = p.floor.max(as_of);
                }
            }
        }
    }

    /// Whether a frame of `epoch` from `from` is to be handled; a newer epoch makes every
    /// member of the old one provisional (replaced as the new epoch's states arrive).
    fn current(&mut self, from: &NodeId, epoch: Epoch, as_of: u64) -> bool {
        let p = self.peers.get_mut(from).unwrap();
        match p.epoch {
            Some(e) if epoch < e => return false,
            Some(e) if epoch == e => {}
            _ => {
                p.epoch = Some(epoch);
                p.floor = 0;
                p.max_as_of = 0;
                p.asked.clear();
                p.parts.clear();
                for r in p.channels.values_mut() {
                    r.old = true;
                }
            }
        }
        p.max_as_of = p.max_as_of.max(as_of);
        true
    }

    /// Sets `from`'s members of `channel`, reporting the difference.
    fn replace(
        &mut self,
        from: &NodeId,
        channel: &ChannelName,
        members: BTreeMap<MemberKey, Bytes>,
        version: u64,
    ) {
        let p = self.peers.get_mut(from).unwrap();
        let old = p.channels.remove(channel).map(|r| r.members).unwrap_or_default();
        let mut events = Vec::new();
        for (key, data) in &old {
            if !members.contains_key(key) {
                events.push((Action::Leave, key.clone(), data.clone()));
            }
        }
        for (key, data) in &members {
            match old.get(key) {
                Some(d) if d == data => {}
                Some(_) => events.push((Action::Update, key.clone(), data.clone())),
                None => events.push((Action::Enter, key.clone(), data.clone())),
            }
        }
        if !members.is_empty() {
            p.channels.insert(channel.clone(), Remote { version, old: false, members });
        }
        for (action, key, data) in events {
            let (channel, owner) = (channel.clone(), from.clone());
            self.events.push_back(PresenceEvent { channel, owner, action, key, data });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::parse(s).unwrap()
    }

    fn key(n: u32) -> MemberKey {
        MemberKey { client_id: format!("c{n}"), connection_id: n.to_string() }
    }

    /// Moves every frame `from` has for `to` (all of them, or those `keep` lets through;
    /// the rest are returned).
    fn deliver(
        now: Instant,
        from: (&mut Presence, &NodeId),
        to: (&mut Presence, &NodeId),
        mut keep: impl FnMut(&PresenceFrame) -> bool,
    ) -> Vec<PresenceFrame> {
        let mut held = Vec::new();
        while let Some((dest, f)) = from.0.poll_transmit() {
            assert_eq!(&dest, to.1);
            if keep(&f) {
                to.0.handle_frame(now, from.1, f);
            } else {
                held.push(f);
            }
        }
        held
    }

    /// A state answer overtaken by deltas that empty other channels of the owner (small
    /// rooms coming and going on another lane) still answers the request.
    #[test]
    fn a_state_overtaken_by_churn_elsewhere_still_applies() {
        let (a_id, b_id) = (id("r0/edge-1"), id("r1/edge-1"));
        let now = Instant::now();
        let config = PresenceConfig::default();
        let mut a =
            Presence::new(a_id.clone(), Epoch(1), std::slice::from_ref(&b_id), config.clone());
        let mut b = Presence::new(b_id.clone(), Epoch(1), std::slice::from_ref(&a_id), config);
        let big = ChannelName::parse("room:big").unwrap();
        a.put(&big, key(1), Bytes::from_static(b"x"));
        a.flush();
        // B links late: it asks for the big room's state from the digest.
        b.handle_link_up(now, &a_id);
        a.handle_link_up(now, &b_id);
        let _ = deliver(now, (&mut b, &b_id), (&mut a, &a_id), |_| true);
        let _ = deliver(now, (&mut a, &a_id), (&mut b, &b_id), |_| true);
        let requests = deliver(now, (&mut b, &b_id), (&mut a, &a_id), |_| false);
        assert!(matches!(requests[..], [PresenceFrame::StateRequest { .. }]), "{requests:?}");
        for r in requests {
            a.handle_frame(now, &b_id, r);
        }
        let state = deliver(now, (&mut a, &a_id), (&mut b, &b_id), |_| false);
        // Meanwhile a small room fills and empties; its deltas arrive first.
        let tiny = ChannelName::parse("room:tiny").unwrap();
        a.put(&tiny, key(2), Bytes::new());
        a.flush();
        a.leave(&tiny, &key(2)).unwrap();
        a.flush();
        let _ = deliver(now, (&mut a, &a_id), (&mut b, &b_id), |_| true);
        for f in state {
            b.handle_frame(now, &a_id, f);
        }
        assert_eq!(b.members(&big).len(), 1, "the big room's member arrived");
    }

    /// Digests, deltas and states larger than `frame_budget` travel in parts: a digest's
    /// ranges drop nothing the other ranges list, a state applies only when all its parts
    /// are in (a lost part is asked for again), and nobody flaps.
    #[test]
    fn large_digests_deltas_and_states_travel_in_parts() {
        let (a_id, b_id) = (id("r0/edge-1"), id("r1/edge-1"));
        let mut now = Instant::now();
        let config = PresenceConfig { frame_budget: 300, ..PresenceConfig::default() };
        let mut a =
            Presence::new(a_id.clone(), Epoch(1), std::slice::from_ref(&b_id), config.clone());
        let mut b =
            Presence::new(b_id.clone(), Epoch(1), std::slice::from_ref(&a_id), config.clone());
        let big = ChannelName::parse("room:big").unwrap();
        for n in 0..100 {
            a.put(&big, key(n), Bytes::from_static(b"data"));
        }
        for n in 0..60 {
            a.put(
                &ChannelName::parse(&format!("room:{n:03}")).unwrap(),
                key(1000 + n),
                Bytes::new(),
            );
        }
        a.flush();
        a.handle_link_up(now, &b_id);
        b.handle_link_up(now, &a_id);
        let digests = deliver(now, (&mut a, &a_id), (&mut b, &b_id), |_| true);
        assert!(digests.is_empty());
        // B asked for 61 states; A answers, the big room in parts. One part is lost.
        let _ = deliver(now, (&mut b, &b_id), (&mut a, &a_id), |_| true);
        let mut parts = 0;
        let mut lost = false;
        let _ = deliver(now, (&mut a, &a_id), (&mut b, &b_id), |f| match f {
            PresenceFrame::State { parts: n, part, .. } if *n > 1 => {
                parts = *n;
                lost |= *part == 1;
                *part != 1
            }
            _ => true,
        });
        assert!(parts > 1 && lost, "the big room's state came in {parts} parts");
        assert_eq!(b.members(&big).len(), 0, "an incomplete state is not applied");
        assert_eq!(b.channels().len(), 60);
        // Asked again: the state arrives whole.
        now += config.retry;
        b.handle_timeout(now);
        let _ = deliver(now, (&mut b, &b_id), (&mut a, &a_id), |_| true);
        let _ = deliver(now, (&mut a, &a_id), (&mut b, &b_id), |_| true);
        assert_eq!(b.members(&big).len(), 100);
        // Later digests (in ranges) keep everything; a large delta arrives in parts.
        for n in 100..200 {
            a.put(&big, key(n), Bytes::from_static(b"more"));
        }
        a.flush();
        let mut deltas = 0;
        let _ = deliver(now, (&mut a, &a_id), (&mut b, &b_id), |f| {
            deltas += matches!(f, PresenceFrame::Delta { .. }) as usize;
            true
        });
        assert!(deltas > 1, "{deltas} deltas");
        now += config.sync_interval;
        a.handle_timeout(now);
        let mut ranges = 0;
        let _ = deliver(now, (&mut a, &a_id), (&mut b, &b_id), |f| {
            ranges += matches!(f, PresenceFrame::Digest { .. }) as usize;
            true
        });
        assert!(ranges > 1, "the digest came in {ranges} ranges");
        b.handle_timeout(now);
        while let Some((_, f)) = b.poll_transmit() {
            assert!(
                matches!(f, PresenceFrame::Digest { .. }),
                "B is up to date, asks nothing: {f:?}"
            );
        }
        assert_eq!(b.members(&big).len(), 200);
        assert_eq!(b.channels().len(), 61);
        let mut leaves = 0;
        while let Some(e) = b.poll_event() {
            leaves += (e.action == Action::Leave) as usize;
        }
        assert_eq!(leaves, 0, "nobody left");
    }

    /// Pages merge the owners' members in (key, owner) order, the same key of two owners
    /// included, each member once across pages.
    #[test]
    fn pages_merge_owners_in_order() {
        let (a_id, b_id) = (id("r0/edge-1"), id("r1/edge-1"));
        let now = Instant::now();
        let config = PresenceConfig::default();
        let mut a =
            Presence::new(a_id.clone(), Epoch(1), std::slice::from_ref(&b_id), config.clone());
        let mut b = Presence::new(b_id.clone(), Epoch(1), std::slice::from_ref(&a_id), config);
        let room = ChannelName::parse("room:p").unwrap();
        for n in [1, 3, 5, 7] {
            a.put(&room, key(n), Bytes::new());
        }
        for n in [2, 3, 6] {
            b.put(&room, key(n), Bytes::new());
        }
        a.flush();
        b.flush();
        a.handle_link_up(now, &b_id);
        b.handle_link_up(now, &a_id);
        for _ in 0..3 {
            let _ = deliver(now, (&mut a, &a_id), (&mut b, &b_id), |_| true);
            let _ = deliver(now, (&mut b, &b_id), (&mut a, &a_id), |_| true);
        }
        let mut seen = Vec::new();
        let mut after: Option<(MemberKey, NodeId)> = None;
        loop {
            let page = a.page(&room, after.as_ref().map(|(k, o)| (k, o)), 2);
            if page.is_empty() {
                break;
            }
            let (o, k, _) = page.last().unwrap().clone();
            after = Some((k, o));
            seen.extend(page.into_iter().map(|(o, k, _)| (k.client_id, o.to_string())));
        }
        let expected: Vec<(String, String)> = [
            ("c1", "r0"),
            ("c2", "r1"),
            ("c3", "r0"),
            ("c3", "r1"),
            ("c5", "r0"),
            ("c6", "r1"),
            ("c7", "r0"),
        ]
        .iter()
        .map(|(c, r)| (c.to_string(), format!("{r}/edge-1")))
        .collect();
        assert_eq!(seen, expected);
    }
}
