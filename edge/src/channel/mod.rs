//! The channel registry: sequencing, de-duplication and fan-out to local subscribers.
//!
//! ```text
//!  publish ─┐                                      ┌─▶ subscribers (members, fan_out)
//!           ├─▶ channel lock: dedupe → seq/offset ─┤
//!  replica ─┘   (order: hold for the publisher)    └─▶ log ─(commit)─▶ release ─▶ subscribers
//!                                                                           └──▶ backbone
//! ```
//!
//! Each channel has one lock. A publish takes it, assigns the origin sequence and the log
//! offset, and either delivers the shared encoded message to every subscriber's outbox at
//! once (channels without history) or, on channels that keep history, queues it until its
//! log write is committed ([`release`]): a message is delivered — to subscribers here and to
//! other regions — only once it is in this node's log, so a crash never takes back a message
//! anyone saw, and a restarted node knows everything it ever delivered. Either way every
//! subscriber sees one channel order and each publisher's messages in the order it sent
//! them. Nothing under the lock waits: a full outbox is an overflow (see [`crate::fanout`]),
//! never a stall.
//!
//! - [`dedupe`]: ids remembered for the dedupe window (seeded from the log after a restart);
//! - [`members`]: subscribers, and the floors of resumed ones whose client is ahead of this
//!   node (it is still catching up);
//! - [`order`]: a publisher that moved here from another node continues its order
//!   (`Publish.after`), here and at every other node;
//! - [`release`]: delivery after the log write;
//! - [`resume`]: the lock side of `Subscribe.resume`.
//!
//! A channel that was never published to is dropped with its last subscriber. A channel
//! that was keeps its counters (so origin sequences are never reused within an epoch) and
//! its de-duplication window.

mod dedupe;
mod members;
pub mod order;
mod release;
mod resume;
mod state;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use prost::Message as _;
use tern_backbone::transport::Backbone;
use tern_proto::client::{
    Discontinuity, Message, OriginPosition, Position, Subscribed, message, server_frame,
};
use tern_proto::codec::EncodedMessage;
use tern_proto::types::{ChannelName, ConnectionId, Epoch, NodeId, Offset, Seq};

use self::members::{Member, fan_out};
use self::state::{ChannelState, Held, PendingSub, Unreleased, note_origin};
use crate::fanout::{Outbox, Outgoing};

pub use self::resume::Resumed;

/// A message to publish, already validated.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The client's idempotency key, if it chose one.
    pub id: Option<String>,
    /// Event name.
    pub name: String,
    /// Payload.
    pub data: Option<message::Data>,
    /// Publisher's client id.
    pub client_id: String,
    /// The publisher's previous message on the channel, when it was sequenced by another
    /// node (`Publish.after`): the message carries it so every node delivers it after that
    /// one (see [`order`]).
    pub after: Option<OriginPosition>,
}

/// The result of a publish: what the publisher's ack carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Message id (the client's or a generated one).
    pub message_id: String,
    /// Origin sequence.
    pub seq: Seq,
    /// Log offset on this node.
    pub offset: Offset,
    /// Origin timestamp, unix ms.
    pub timestamp_ms: u64,
    /// True when the id was seen within the dedupe window: nothing was delivered again.
    pub duplicate: bool,
    /// The log epoch `offset` belongs to.
    pub epoch: Epoch,
    /// When the channel keeps history: the store ticket to wait for before the ack (the
    /// message is in the log once the store's committed ticket reaches it).
    pub log_ticket: Option<u64>,
    /// Sequenced by this node in this epoch (so `seq` is this node's own origin sequence);
    /// false for an id first seen from another origin.
    pub own: bool,
    /// The origin that sequenced it and its epoch (for a duplicate, the first copy's).
    pub origin: Option<(NodeId, Epoch)>,
}

impl Accepted {
    /// The publisher's `Ack` frame.
    pub fn into_ack(self, request_id: u32, channel: String) -> tern_proto::client::Ack {
        let (origin, origin_epoch) =
            self.origin.map_or((String::new(), 0), |(n, e)| (n.to_string(), e.0));
        tern_proto::client::Ack {
            request_id,
            channel,
            message_id: self.message_id,
            origin_seq: self.seq.0,
            position: Some(Position { epoch: self.epoch.0, offset: self.offset.0 }),
            timestamp_ms: self.timestamp_ms,
            duplicate: self.duplicate,
            origin,
            origin_epoch,
        }
    }
}

/// Registry limits.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// Ids remembered per channel.
    pub dedupe_ids: usize,
    /// How long they are remembered.
    pub dedupe_window: Duration,
    /// Channels held at most before local publishes and subscribes to new channels are
    /// refused (replicated messages still open theirs: refusing them would lose messages).
    pub max_channels: usize,
    /// Longest a replicated message waits for its publisher's earlier message from another
    /// origin (see [`order`]) before it is delivered anyway.
    pub order_wait: Duration,
}

/// What one [`Hub::sweep`] released.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Message ids past the dedupe window, forgotten.
    pub ids: usize,
    /// In-memory tails of history channels idle (no subscriber, no message) for the dedupe
    /// window, dropped; each is read back from the log when its channel is used again.
    pub tails: usize,
}

/// All channels of a node.
#[derive(Debug)]
pub struct Hub {
    node: NodeId,
    /// This start's origin epoch (backbone sequences, generated message ids).
    epoch: Epoch,
    /// The epoch of log positions: kept across restarts with a durable store.
    log_epoch: Epoch,
    /// Durable history for the namespaces that keep it.
    store: Option<crate::store::Store>,
    limits: HubLimits,
    channels: RwLock<HashMap<ChannelName, Arc<Channel>>>,
    /// Replication to other nodes, when configured.
    backbone: OnceLock<Backbone>,
    /// Bumped whenever another region acknowledges something (publishers waiting for
    /// `DURABILITY_REPLICATED` re-check their channel).
    replicated: tokio::sync::watch::Sender<u64>,
    /// Keys the hashes of replicated message ids (see `Dedupe::remote`).
    id_hash: std::collections::hash_map::RandomState,
    /// `node:epoch-hex:`, the start of the ids this node gives messages published without one.
    id_prefix: String,
    /// Channels with messages waiting for their log write, by the first one's ticket (see
    /// [`release`]).
    releases: Mutex<VecDeque<(u64, Arc<Channel>)>>,
    /// Messages in those channels' queues.
    unreleased: std::sync::atomic::AtomicUsize,
    /// The newest committed ticket a release has seen.
    committed_seen: std::sync::atomic::AtomicU64,
    /// Channels holding replicated messages for their publisher's order (see [`order`]).
    holding: Mutex<HashMap<ChannelName, Arc<Channel>>>,
    /// Observes each replicated message's lag at its sequencing here (None: metrics off).
    pub replication_lag: Option<crate::metrics::ReplicationLag>,
}

#[derive(Debug)]
struct Channel {
    state: Mutex<ChannelState>,
}

/// Most messages a subscription can rewind.
pub const REWIND_MAX: usize = 100;

/// The recent messages a rewind asks for: the last `count`, or those of the last
/// `since_ms` (both capped at [`REWIND_MAX`]).
fn rewound(
    recent: &VecDeque<Arc<EncodedMessage>>,
    r: tern_proto::client::Rewind,
) -> impl Iterator<Item = &Arc<EncodedMessage>> {
    let skip = if r.since_ms > 0 {
        let now = crate::store::now_ms();
        let cutoff = now.saturating_sub(r.since_ms);
        recent.iter().take_while(|m| m.message().timestamp_ms < cutoff).count()
    } else {
        recent.len().saturating_sub((r.count as usize).min(REWIND_MAX))
    };
    recent.iter().skip(skip)
}

/// Only reachable if a caller skipped validation: keep serving rather than panic.
fn unvalidated(name: &str) -> ChannelName {
    tracing::error!(channel = name, "unvalidated channel name reached the hub");
    ChannelName::parse("invalid").unwrap_or_else(|_| unreachable!("\"invalid\" is a valid name"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a channel lock leaves consistent counters (they are bumped
    // before anything that can panic), so continuing is safe.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a channel's log tells when the channel is opened after a restart: where it stands,
/// its newest messages, and the ids of the dedupe window.
#[derive(Debug, Default)]
struct Loaded {
    offset: u64,
    /// Per other origin, the newest message logged.
    remote: Vec<OriginPosition>,
    /// Newest messages, oldest first.
    tail: Vec<Message>,
    /// Messages logged within the dedupe window, oldest first, with their offsets.
    window: Vec<(u64, Message)>,
}

impl Hub {
    /// Creates an empty registry for `node`: origin sequences in `epoch`, log positions in
    /// `log_epoch`, history in `store`.
    pub fn new(
        node: NodeId,
        epoch: Epoch,
        log_epoch: Epoch,
        limits: HubLimits,
        store: Option<crate::store::Store>,
    ) -> Self {
        Self {
            epoch,
            log_epoch,
            store,
            limits,
            channels: RwLock::new(HashMap::new()),
            backbone: OnceLock::new(),
            replicated: tokio::sync::watch::Sender::new(0),
            id_hash: std::collections::hash_map::RandomState::new(),
            id_prefix: format!("{node}:{:x}:", epoch.0),
            node,
            releases: Mutex::new(VecDeque::new()),
            unreleased: std::sync::atomic::AtomicUsize::new(0),
            committed_seen: std::sync::atomic::AtomicU64::new(0),
            holding: Mutex::new(HashMap::new()),
            replication_lag: None,
        }
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The backbone, when it runs.
    pub fn backbone(&self) -> Option<&Backbone> {
        self.backbone.get()
    }

    /// The backbone's UDP address, when it runs.
    pub fn backbone_addr(&self) -> Option<std::net::SocketAddr> {
        self.backbone.get().map(Backbone::local_addr)
    }

    /// Own messages reachable peers want and have not acknowledged yet (0 without a
    /// backbone).
    pub fn backbone_unacknowledged(&self) -> u64 {
        self.backbone.get().map_or(0, Backbone::unacknowledged)
    }

    /// The peers this node's backbone has a link with now (none without a backbone).
    pub fn linked_peers(&self) -> Vec<NodeId> {
        self.backbone.get().map(Backbone::linked_peers).unwrap_or_default()
    }

    /// Hands local publishes to the backbone from now on.
    pub fn set_backbone(&self, backbone: Backbone) {
        let _ = self.backbone.set(backbone);
    }

    /// Delivers a message replicated from `origin` (its `epoch` and `seq`, as the backbone
    /// received them) to local subscribers, at the next position of this node's channel log.
    /// A message this node already holds (by its origin identity, or by its id within the
    /// dedupe window) is dropped; one that names an earlier message of its publisher this
    /// node has not delivered yet waits for it (see [`order`]). Returns false for a payload
    /// that is not a valid message of that identity (the origin's bug; dropped and logged).
    pub fn deliver_remote(&self, origin: &NodeId, epoch: Epoch, seq: Seq, payload: &[u8]) -> bool {
        let Ok(message) = Message::decode(payload) else {
            tracing::warn!(%origin, "undecodable replicated message dropped");
            return false;
        };
        if ChannelName::validate(&message.channel).is_err()
            || message.origin != origin.as_str()
            || message.origin_epoch != epoch.0
            || message.origin_seq != seq.0
        {
            tracing::warn!(%origin, channel = %message.channel, "replicated message whose identity does not match its frame dropped");
            return false;
        }
        let channel = message.channel.clone();
        let now = Instant::now();
        let mut message = Some(message);
        self.with_channel(&channel, usize::MAX, |ch, state| {
            let Some(m) = message.take() else { return };
            if tern_proto::vector::covers(&state.remote, &m) {
                // Already here (logged before a restart, or a relayed copy).
                return;
            }
            let after = m.after.clone().filter(|a| a.origin != self.node.as_str());
            // An origin's messages never overtake each other: behind one that waits, wait.
            let blocked = state.held.iter().any(|h| h.origin == *origin);
            if blocked || after.as_ref().is_some_and(|a| !self.order_met(state, a)) {
                let bytes = payload.len();
                state.held_bytes += bytes;
                let origin = origin.clone();
                state.held.push_back(Held { bytes, origin, message: m, after, since: now });
                self.note_holding(ch, state);
                return;
            }
            self.accept_remote(ch, state, m, now);
            if !state.held.is_empty() {
                self.release_held(ch, state, now, false);
            }
        })
        .unwrap_or(());
        true
    }

    /// Sequences a replicated message into this node's channel log and delivers it (or
    /// queues it for its log write).
    fn accept_remote(
        &self,
        ch: &Arc<Channel>,
        state: &mut ChannelState,
        mut m: Message,
        now: Instant,
    ) {
        note_origin(&mut state.remote, &m.origin, m.origin_epoch, m.origin_seq);
        // A publish retried on another region (after a failover) carries the same id:
        // whichever copy reaches this node first is the one delivered here.
        state.dedupe.prune(now, &self.limits);
        if !m.id.is_empty() {
            let h = self.id_hash.hash_one(&m.id);
            let at = (m.origin_epoch, m.origin_seq, state.offset + 1);
            if state.dedupe.seen.contains_key(&m.id)
                || !state.dedupe.note_remote(h, &m.origin, at, now)
            {
                tracing::debug!(channel = %m.channel, id = %m.id, origin = %m.origin, "repeated id from another origin dropped");
                return;
            }
        }
        if let Some(lag) = &self.replication_lag {
            lag.observe(&m.origin, m.timestamp_ms, crate::store::now_ms());
        }
        state.offset += 1;
        m.position = Some(Position { epoch: self.log_epoch.0, offset: state.offset });
        let encoded = Arc::new(EncodedMessage::new(m));
        self.sequenced(ch, state, encoded, false);
    }

    /// A message took its place in the channel: delivered now, or, on a channel that keeps
    /// history, once its log write is committed. Returns the store ticket.
    fn sequenced(
        &self,
        ch: &Arc<Channel>,
        state: &mut ChannelState,
        encoded: Arc<EncodedMessage>,
        own: bool,
    ) -> Option<u64> {
        let Some(store) = self.store.as_ref().filter(|s| s.keeps(&encoded.message().channel))
        else {
            self.show(state, &encoded, own);
            return None;
        };
        state.last_message = Some(Instant::now());
        let m = encoded.message();
        let name = state.name.clone().unwrap_or_else(|| unvalidated(&m.channel));
        let identity = crate::store::Identity {
            origin: if own {
                self.node.clone()
            } else {
                NodeId::parse(&m.origin).unwrap_or_else(|_| self.node.clone())
            },
            epoch: m.origin_epoch,
            seq: m.origin_seq,
        };
        let ticket = store.append(&name, offset_of_encoded(&encoded), encoded.protobuf(), identity);
        if ticket.is_none() {
            tracing::error!(channel = %name, "history writer is gone; message delivered without its log write");
        }
        self.queue_release(
            ch,
            state,
            Unreleased { ticket: ticket.unwrap_or(0), message: encoded, own },
        );
        ticket
    }

    /// Whether a backbone runs (publishes can wait for another region).
    pub fn replicates(&self) -> bool {
        self.backbone.get().is_some()
    }

    /// A node of another region acknowledged this node's messages of `name` up to `seq`.
    pub fn note_replicated(&self, name: &ChannelName, seq: u64) {
        let Some(channel) =
            self.channels.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
        else {
            return;
        };
        let mut state = lock(&channel.state);
        if seq > state.replicated {
            state.replicated = seq;
            drop(state);
            self.replicated.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Whether another region has this node's message `seq` of `name`.
    pub fn is_replicated(&self, name: &str, seq: u64) -> bool {
        self.channels
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .is_some_and(|c| lock(&c.state).replicated >= seq)
    }

    /// Changes whenever another region acknowledged something.
    pub fn replicated_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.replicated.subscribe()
    }

    /// This start's origin epoch (the backbone's).
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The epoch of log positions (kept across restarts with a durable store).
    pub fn log_epoch(&self) -> Epoch {
        self.log_epoch
    }

    /// The durable history, when configured.
    pub fn store(&self) -> Option<&crate::store::Store> {
        self.store.as_ref()
    }

    /// Forgets, on every channel, the message ids older than the dedupe window, and gives
    /// back the memory of emptied windows. Publishes prune their own channel as they go;
    /// this reaches the channels nobody publishes to any more, so id memory is bounded by
    /// the last window's traffic. Also drops the in-memory tail (up to [`REWIND_MAX`]
    /// messages) of history channels that had no subscriber and no message for the window,
    /// so tail memory is bounded by the active channels; the next use reads it back from
    /// the log. Run periodically by the server.
    pub fn sweep(&self, now: Instant) -> Swept {
        let channels: Vec<Arc<Channel>> = self
            .channels
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut swept = Swept::default();
        for channel in channels {
            let mut state = lock(&channel.state);
            let d = &mut state.dedupe;
            let before = d.len();
            d.prune(now, &self.limits);
            let after = d.len();
            swept.ids += before - after;
            if after == 0 && before > 0 {
                *d = dedupe::Dedupe::default();
            }
            let idle = state.members.is_empty()
                && state.pending.is_empty()
                && state.unreleased.is_empty()
                && state
                    .last_message
                    .is_none_or(|t| now.saturating_duration_since(t) >= self.limits.dedupe_window);
            if idle && !state.recent.is_empty() {
                state.recent = VecDeque::new();
                state.tail_evicted = true;
                swept.tails += 1;
            }
        }
        swept
    }

    /// Whether a subscribe may use `name`: it exists, or the node holds fewer than
    /// `max_channels` channels. (Publishes are checked as the channel is created: see
    /// [`Hub::publish`].)
    pub fn admits(&self, name: &str) -> bool {
        let map = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        map.len() < self.limits.max_channels || map.contains_key(name)
    }

    /// Number of channels held.
    pub fn channel_count(&self) -> usize {
        self.channels.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Subscriptions, live or waiting for the peers, across every channel (walks every
    /// channel: for a metrics scrape, not a message path).
    pub fn subscription_count(&self) -> usize {
        let map = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        map.values()
            .map(|c| {
                let state = lock(&c.state);
                state.members.len() + state.pending.len()
            })
            .sum()
    }

    /// Subscriptions of `conn`, live or waiting for the peers, across every channel (a
    /// connection that ended must have none; walks every channel).
    pub fn subscriptions_of(&self, conn: ConnectionId) -> usize {
        let map = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        map.values()
            .map(|c| {
                let state = lock(&c.state);
                usize::from(state.members.contains_key(&conn))
                    + state.pending.iter().filter(|p| p.conn == conn).count()
            })
            .sum()
    }

    /// The channel `name`, if the node holds it.
    fn existing(&self, name: &str) -> Option<Arc<Channel>> {
        self.channels.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
    }

    /// Looks a channel up by its (already validated) name, creating it if needed while the
    /// node holds fewer than `max` channels (`None` at the limit). A channel that keeps
    /// history starts from what its log holds (read before the registry is locked).
    fn channel(&self, name: &str, max: usize) -> Option<Arc<Channel>> {
        if let Some(c) = self.channels.read().unwrap_or_else(PoisonError::into_inner).get(name) {
            return Some(c.clone());
        }
        let loaded = self.store.as_ref().filter(|s| s.keeps(name)).map(|s| self.load(s, name));
        let mut map = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get(name) {
            return Some(c.clone());
        }
        if map.len() >= max {
            return None;
        }
        let key = ChannelName::parse(name).unwrap_or_else(|_| unvalidated(name));
        let mut state = ChannelState { name: Some(key.clone()), ..ChannelState::default() };
        if let Some(loaded) = loaded {
            self.seed(&mut state, loaded);
        }
        let channel = Arc::new(Channel { state: Mutex::new(state) });
        map.insert(key, channel.clone());
        Some(channel)
    }

    /// Reads what `name`'s log holds (see [`Loaded`]).
    fn load(&self, store: &crate::store::Store, name: &str) -> Loaded {
        let fail = |e: crate::store::StoreError| {
            tracing::error!(channel = name, error = %e, "cannot read the history log");
        };
        let mut loaded = Loaded::default();
        match store.last_offset(name) {
            Ok(last) => loaded.offset = last,
            Err(e) => fail(e),
        }
        match store.positions(name) {
            Ok(positions) => {
                for p in positions.into_iter().filter(|p| p.origin != self.node.as_str()) {
                    note_origin(&mut loaded.remote, &p.origin, p.epoch, p.seq);
                }
            }
            Err(e) => fail(e),
        }
        loaded.tail = self.read_tail(store, name);
        let since =
            crate::store::now_ms().saturating_sub(self.limits.dedupe_window.as_millis() as u64);
        let window = crate::store::Query {
            since_ms: Some(since),
            ..crate::store::Query::newest(self.limits.dedupe_ids.max(1))
        };
        match store.read(name, window) {
            Ok(rows) => {
                loaded.window = rows
                    .into_iter()
                    .rev()
                    .filter_map(|r| Some((r.offset, Message::decode(r.message.as_slice()).ok()?)))
                    .collect();
            }
            Err(e) => fail(e),
        }
        loaded
    }

    /// The channel's newest logged messages, oldest first.
    fn read_tail(&self, store: &crate::store::Store, name: &str) -> Vec<Message> {
        let newest = crate::store::Query::newest(REWIND_MAX);
        let rows = store.read(name, newest).unwrap_or_else(|e| {
            tracing::error!(channel = name, error = %e, "cannot read the history log");
            Vec::new()
        });
        rows.into_iter().rev().filter_map(|r| Message::decode(r.message.as_slice()).ok()).collect()
    }

    /// Starts a channel's state from its log: offsets continue, the origins it holds are
    /// not accepted again, the ids of the dedupe window are recognised, rewinds are served.
    fn seed(&self, state: &mut ChannelState, loaded: Loaded) {
        state.offset = loaded.offset;
        state.shown_offset = loaded.offset;
        state.remote = loaded.remote.clone();
        state.shown = loaded.remote;
        state.recent = loaded.tail.into_iter().map(|m| Arc::new(EncodedMessage::new(m))).collect();
        let now = Instant::now();
        for (offset, m) in loaded.window {
            if m.id.is_empty() {
                continue;
            }
            if m.origin == self.node.as_str() {
                let accepted = Accepted {
                    message_id: m.id.clone(),
                    seq: Seq(m.origin_seq),
                    offset: Offset(offset),
                    timestamp_ms: m.timestamp_ms,
                    duplicate: false,
                    epoch: self.log_epoch,
                    log_ticket: None,
                    own: m.origin_epoch == self.epoch.0,
                    origin: Some((self.node.clone(), Epoch(m.origin_epoch))),
                };
                state.dedupe.note_own(&m.id, &accepted, now);
            } else {
                let at = (m.origin_epoch, m.origin_seq, offset);
                state.dedupe.note_remote(self.id_hash.hash_one(&m.id), &m.origin, at, now);
            }
        }
    }

    /// Runs `f` on the live state of `name`, creating the channel if needed (whatever the
    /// channel limit: replication and existing subscriptions must not be refused).
    fn with_state<R>(&self, name: &str, mut f: impl FnMut(&mut ChannelState) -> R) -> R {
        self.with_channel(name, usize::MAX, |_, state| f(state))
            .unwrap_or_else(|| unreachable!("no limit, so the channel exists"))
    }

    /// Runs `f` on the channel `name` and its live state, creating the channel only while
    /// the node holds fewer than `max` channels; `None` when it would be a new one beyond
    /// that.
    fn with_channel<R>(
        &self,
        name: &str,
        max: usize,
        mut f: impl FnMut(&Arc<Channel>, &mut ChannelState) -> R,
    ) -> Option<R> {
        loop {
            let channel = self.channel(name, max)?;
            let mut state = lock(&channel.state);
            if !state.removed {
                if state.tail_evicted {
                    state.tail_evicted = false;
                    if let Some(store) = self.store.as_ref() {
                        let tail = self.read_tail(store, name);
                        state.recent =
                            tail.into_iter().map(|m| Arc::new(EncodedMessage::new(m))).collect();
                    }
                }
                return Some(f(&channel, &mut state));
            }
        }
    }

    /// The channel's vector as its subscribers see it: per origin (this node first), the
    /// last message delivered here.
    fn origins(&self, state: &ChannelState) -> Vec<OriginPosition> {
        let own = OriginPosition {
            origin: self.node.as_str().to_owned(),
            epoch: self.epoch.0,
            seq: state.shown_seq,
        };
        std::iter::once(own).chain(state.shown.iter().cloned()).collect()
    }

    /// The `Subscribed` frame for a subscription whose live stream starts now.
    fn subscribed(&self, state: &ChannelState, request_id: u32, name: &ChannelName) -> Subscribed {
        Subscribed {
            request_id,
            channel: name.to_string(),
            position: Some(Position { epoch: self.log_epoch.0, offset: state.shown_offset }),
            origins: self.origins(state),
            resumed: false,
        }
    }

    /// Marks the channel wanted from the backbone. False when the peers must confirm first
    /// (see [`Hub::subscribe`]).
    fn want(&self, state: &mut ChannelState, name: &ChannelName) -> bool {
        if state.interested {
            return state.pending.is_empty();
        }
        state.interested = true;
        self.backbone.get().is_none_or(|b| b.add_interest(name))
    }

    /// Adds a subscriber. Its `Subscribed` frame is queued to `outbox` under the channel's
    /// lock when the subscription takes effect, so every delivery of the channel follows it.
    ///
    /// With a backbone, the first local subscriber of a channel makes the node ask its peers
    /// for it; the subscription then takes effect once they confirmed (or after the
    /// backbone's `interest_wait`), so that from its `Subscribed` frame on, everything
    /// published anywhere reaches it.
    ///
    /// With `rewind` on a channel that keeps history, the recent messages it asks for follow
    /// the `Subscribed` frame, ahead of the live stream: the seam has no gap and no
    /// duplicate.
    pub fn subscribe(
        &self,
        name: &ChannelName,
        conn: ConnectionId,
        outbox: Outbox,
        request_id: u32,
        rewind: Option<tern_proto::client::Rewind>,
    ) {
        self.with_state(name.as_str(), |state| {
            if let Some(r) = rewind.filter(|_| !state.recent.is_empty()) {
                // History channels go everywhere: the backbone is ready at once.
                self.want(state, name);
                let mut subscribed = self.subscribed(state, request_id, name);
                // The client's vector starts before the rewound messages.
                let mut seen = Vec::new();
                for m in rewound(&state.recent, r).map(|m| m.message()) {
                    if seen.contains(&&m.origin) {
                        continue;
                    }
                    seen.push(&m.origin);
                    let (epoch, seq) = (m.origin_epoch, m.origin_seq.saturating_sub(1));
                    match subscribed.origins.iter_mut().find(|p| p.origin == m.origin) {
                        Some(p) => (p.epoch, p.seq) = (epoch, seq),
                        None => subscribed.origins.push(OriginPosition {
                            origin: m.origin.clone(),
                            epoch,
                            seq,
                        }),
                    }
                }
                let mut ok = outbox.push_replay(Outgoing::Frame(Box::new(
                    server_frame::Kind::Subscribed(subscribed),
                )));
                for m in rewound(&state.recent, r) {
                    ok = ok && outbox.push_replay(Outgoing::Message(m.clone()));
                }
                if ok {
                    state.members.insert(conn, Member::new(outbox.clone()));
                }
                return;
            }
            self.join(state, name, conn, &outbox, request_id, None);
        })
    }

    /// Registers a live subscriber (or a pending one, until the peers confirm).
    fn join(
        &self,
        state: &mut ChannelState,
        name: &ChannelName,
        conn: ConnectionId,
        outbox: &Outbox,
        request_id: u32,
        resume: Option<&[OriginPosition]>,
    ) {
        let resume = resume.map(<[OriginPosition]>::to_vec);
        let p = PendingSub { conn, outbox: outbox.clone(), request_id, resume };
        if !self.want(state, name) {
            state.pending.push(p);
            return;
        }
        // Queued under the lock, so no delivery of the channel goes ahead of it.
        let frame = server_frame::Kind::Subscribed(self.pending_subscribed(state, &p, name));
        if outbox.push_replay(Outgoing::Frame(Box::new(frame))) {
            match &p.resume {
                Some(vector) => self.join_resumed(state, conn, outbox, vector),
                None => {
                    state.members.insert(conn, Member::new(outbox.clone()));
                }
            }
        }
    }

    /// Tells the channel's subscribers that messages of `origin` were lost between regions
    /// (after `after` in `epoch`, through `through` or, when `None`, the rest of that
    /// epoch); messages held for their publisher's order behind them go on (see [`order`]).
    pub fn discontinuity(
        &self,
        name: &ChannelName,
        origin: &str,
        epoch: u64,
        after: u64,
        through: Option<u64>,
    ) {
        let Some(channel) =
            self.channels.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
        else {
            return;
        };
        let mut state = lock(&channel.state);
        let frame = Discontinuity {
            channel: name.to_string(),
            reason: format!(
                "messages of {origin} after sequence {after} were lost between regions"
            ),
            origins: vec![OriginPosition { origin: origin.to_owned(), epoch, seq: after }],
        };
        state.members.retain(|_, m| {
            m.outbox
                .push(Outgoing::Frame(Box::new(server_frame::Kind::Discontinuity(frame.clone()))))
        });
        // Nothing of the hole comes: messages waiting for one of them go on.
        note_origin(&mut state.remote, origin, epoch, through.unwrap_or(u64::MAX));
        self.release_held(&channel, &mut state, Instant::now(), false);
    }

    /// `origin`'s `epoch` of `name` ended with everything delivered here (it restarted and
    /// sent the rest from its log): nothing more of it comes, so what waits on a message of
    /// it (a publish's order, a head it reported before crashing) goes on.
    pub fn epoch_ended(&self, name: &ChannelName, origin: &str, epoch: u64) {
        let Some(channel) =
            self.channels.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
        else {
            return;
        };
        let mut state = lock(&channel.state);
        note_origin(&mut state.remote, origin, epoch, u64::MAX);
        self.release_held(&channel, &mut state, Instant::now(), false);
    }

    /// The peers confirmed this node's interest in `name`: pending subscriptions take effect.
    pub fn interest_ready(&self, name: &ChannelName) {
        let Some(channel) =
            self.channels.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
        else {
            return;
        };
        let mut state = lock(&channel.state);
        for p in std::mem::take(&mut state.pending) {
            let frame = server_frame::Kind::Subscribed(self.pending_subscribed(&state, &p, name));
            if p.outbox.push(Outgoing::Frame(Box::new(frame))) {
                match &p.resume {
                    Some(vector) => self.join_resumed(&mut state, p.conn, &p.outbox, vector),
                    None => {
                        state.members.insert(p.conn, Member::new(p.outbox));
                    }
                }
            }
        }
    }

    /// The `Subscribed` frame answering a subscription that waited for the peers.
    fn pending_subscribed(
        &self,
        state: &ChannelState,
        p: &PendingSub,
        name: &ChannelName,
    ) -> Subscribed {
        let subscribed = self.subscribed(state, p.request_id, name);
        match p.resume {
            Some(_) => Subscribed { resumed: true, origins: Vec::new(), ..subscribed },
            None => subscribed,
        }
    }

    /// Removes a subscriber. `then` is queued to its outbox after the last message of the
    /// channel it will get, so it arrives in order (e.g. the `Unsubscribed` frame).
    ///
    /// A subscription still waiting for the peers (see [`Hub::subscribe`]) is answered first:
    /// its `Subscribed` frame goes out ahead of `then`, so every `subscribe` request gets its
    /// one answer whatever follows it.
    pub fn unsubscribe(&self, name: &ChannelName, conn: ConnectionId, then: Option<Outgoing>) {
        let Some(channel) =
            self.channels.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
        else {
            return;
        };
        let mut map = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        let mut state = lock(&channel.state);
        let mut removed = state.members.remove(&conn).map(|m| m.outbox);
        let mut i = 0;
        while i < state.pending.len() {
            if state.pending[i].conn != conn {
                i += 1;
                continue;
            }
            let p = state.pending.remove(i);
            let frame = server_frame::Kind::Subscribed(self.pending_subscribed(&state, &p, name));
            p.outbox.push(Outgoing::Frame(Box::new(frame)));
            removed = Some(p.outbox);
        }
        if let (Some(outbox), Some(item)) = (removed, then) {
            outbox.push(item);
        }
        if state.members.is_empty() && state.pending.is_empty() && state.interested {
            state.interested = false;
            if let Some(b) = self.backbone.get() {
                b.remove_interest(name);
            }
        }
        let unused = state.members.is_empty()
            && state.pending.is_empty()
            && state.held.is_empty()
            && state.seq == 0
            && state.offset == 0;
        if unused && !state.removed {
            state.removed = true;
            if let Entry::Occupied(e) = map.entry(name.clone()) {
                if Arc::ptr_eq(e.get(), &channel) {
                    e.remove();
                }
            }
        }
    }

    /// Sequences a message on `name` (validated with [`ChannelName::validate`]) and delivers
    /// it to every local subscriber — on a channel that keeps history, once it is in the log.
    /// `None` when `name` would be a new channel and the node holds `max_channels` already.
    pub fn publish(&self, name: String, msg: NewMessage) -> Option<Accepted> {
        let now = Instant::now();
        let timestamp_ms = crate::store::now_ms();
        self.with_channel(&name, self.limits.max_channels, |ch, state| {
            state.dedupe.prune(now, &self.limits);
            if let Some(id) = &msg.id {
                if let Some(prev) = state.dedupe.seen.get(id) {
                    return Accepted { duplicate: true, ..prev.clone() };
                }
                if let Some((origin, r)) = state.dedupe.remote(self.id_hash.hash_one(id)) {
                    // First sequenced by another origin (the publisher failed over here):
                    // the ack names that message, so the publisher's next `after` does.
                    return Accepted {
                        message_id: id.clone(),
                        seq: Seq(r.seq),
                        offset: Offset(r.offset),
                        timestamp_ms,
                        duplicate: true,
                        epoch: self.log_epoch,
                        log_ticket: None,
                        own: false,
                        origin: Some((origin, Epoch(r.epoch))),
                    };
                }
            }
            state.seq += 1;
            state.offset += 1;
            let message_id = match &msg.id {
                Some(id) => id.clone(),
                None => {
                    // `node:epoch-hex:seq`, without the formatting machinery (hot path).
                    let mut digits = itoa::Buffer::new();
                    let seq = digits.format(state.seq);
                    let mut id = String::with_capacity(self.id_prefix.len() + seq.len());
                    id.push_str(&self.id_prefix);
                    id.push_str(seq);
                    id
                }
            };
            let encoded = Arc::new(EncodedMessage::new(Message {
                channel: name.clone(),
                id: message_id.clone(),
                name: msg.name.clone(),
                data: msg.data.clone(),
                client_id: msg.client_id.clone(),
                origin: self.node.as_str().to_owned(),
                origin_epoch: self.epoch.0,
                origin_seq: state.seq,
                position: Some(Position { epoch: self.log_epoch.0, offset: state.offset }),
                timestamp_ms,
                after: msg.after.clone().filter(|a| a.origin != self.node.as_str()),
            }));
            let mut accepted = Accepted {
                message_id,
                seq: Seq(state.seq),
                offset: Offset(state.offset),
                timestamp_ms,
                duplicate: false,
                epoch: self.log_epoch,
                log_ticket: None,
                own: true,
                origin: Some((self.node.clone(), self.epoch)),
            };
            accepted.log_ticket = self.sequenced(ch, state, encoded, true);
            if let Some(id) = &msg.id {
                // With its ticket: a retry's ack also waits for (and checks) the log write.
                state.dedupe.note_own(id, &accepted, now);
            }
            accepted
        })
    }

    /// Delivers a sequenced message to the channel's subscribers (and, when this node
    /// sequenced it, hands it to the backbone): the message is now part of what the node
    /// shows, in log order.
    fn show(&self, state: &mut ChannelState, encoded: &Arc<EncodedMessage>, own: bool) {
        let m = encoded.message();
        state.shown_offset = state.shown_offset.max(offset_of_encoded(encoded));
        if self.store.as_ref().is_some_and(|s| s.keeps(&m.channel)) {
            state.recent.push_back(encoded.clone());
            if state.recent.len() > REWIND_MAX {
                state.recent.pop_front();
            }
        }
        if own {
            state.shown_seq = m.origin_seq;
        } else {
            note_origin(&mut state.shown, &m.origin, m.origin_epoch, m.origin_seq);
        }
        // Overflowed subscribers are dropped here; their sessions close with 4001.
        fan_out(&mut state.members, encoded);
        // Still under the channel lock, so the backbone sees this channel's messages in
        // sequence order.
        if own {
            if let (Some(backbone), Some(channel)) = (self.backbone.get(), state.name.clone()) {
                backbone.publish(channel, Seq(m.origin_seq), encoded.protobuf());
            }
        }
    }
}

/// The log offset of a message this node sequenced.
fn offset_of_encoded(m: &EncodedMessage) -> u64 {
    state::offset_of(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::outbox;
    use tern_proto::types::RegionId;

    fn hub() -> Hub {
        hub_with(3)
    }

    fn hub_with(max_channels: usize) -> Hub {
        let node = NodeId::new(&RegionId::parse("r").unwrap(), "n").unwrap();
        Hub::new(
            node,
            Epoch(7),
            Epoch(7),
            HubLimits {
                dedupe_ids: 2,
                dedupe_window: Duration::from_secs(120),
                max_channels,
                order_wait: Duration::from_secs(10),
            },
            None,
        )
    }

    /// Publishes on a channel the hub admits.
    fn publish(hub: &Hub, channel: String, msg: NewMessage) -> Accepted {
        hub.publish(channel, msg).expect("under the channel limit")
    }

    fn msg(id: Option<&str>) -> NewMessage {
        NewMessage {
            id: id.map(str::to_owned),
            name: String::new(),
            data: None,
            client_id: String::new(),
            after: None,
        }
    }

    /// A message published without an id gets `node:epoch-hex:seq`, unique within its channel.
    #[test]
    fn generated_ids_name_the_origin_epoch_and_sequence() {
        let hub = hub();
        let ids: Vec<String> =
            (0..11).map(|_| publish(&hub, "a:b".to_owned(), msg(None)).message_id).collect();
        assert_eq!(ids[0], "r/n:7:1");
        assert_eq!(ids[10], "r/n:7:11");
        assert_eq!(publish(&hub, "a:c".to_owned(), msg(None)).message_id, "r/n:7:1");
    }

    #[test]
    fn sequences_dedupes_and_forgets_oldest_ids() {
        let hub = hub();
        let ch = || "a:b".to_owned();
        let a = publish(&hub, ch(), msg(Some("x")));
        assert_eq!((a.seq, a.duplicate), (Seq(1), false));
        let again = publish(&hub, ch(), msg(Some("x")));
        assert_eq!(again, Accepted { duplicate: true, ..a });
        assert_eq!(publish(&hub, ch(), msg(None)).seq, Seq(2));
        publish(&hub, ch(), msg(Some("y")));
        publish(&hub, ch(), msg(Some("z")));
        // Only two ids are kept: "x" was forgotten and is sequenced anew.
        assert!(!publish(&hub, ch(), msg(Some("x"))).duplicate);
    }

    #[test]
    fn new_channels_are_refused_at_the_limit_but_existing_ones_are_not() {
        let hub = hub();
        for k in 0..3 {
            assert!(hub.admits(&format!("a:{k}")));
            publish(&hub, format!("a:{k}"), msg(None));
        }
        assert!(!hub.admits("a:new"), "a fourth channel is refused");
        assert!(hub.admits("a:1"), "an existing one is not");
    }

    #[test]
    fn the_sweep_forgets_ids_of_idle_channels_after_the_window() {
        let hub = hub_with(100);
        for k in 0..50 {
            publish(&hub, format!("a:{k}"), msg(Some("same")));
        }
        assert!(publish(&hub, "a:7".into(), msg(Some("same"))).duplicate);
        // Inside the window nothing goes.
        assert_eq!(hub.sweep(Instant::now()).ids, 0);
        assert!(publish(&hub, "a:8".into(), msg(Some("same"))).duplicate);
        // After it, every idle channel's ids are gone (the sequence stays).
        let later = Instant::now() + Duration::from_secs(121);
        assert_eq!(hub.sweep(later).ids, 50);
        let again = publish(&hub, "a:9".into(), msg(Some("same")));
        assert!(!again.duplicate);
        assert_eq!(again.seq, Seq(2));
    }

    #[test]
    fn unused_channels_are_dropped_used_ones_keep_their_sequence() {
        let hub = hub();
        let ch = ChannelName::parse("a").unwrap();
        let (tx, _rx) = outbox(8, 1 << 20, tokio_util::sync::CancellationToken::new());
        hub.subscribe(&ch, ConnectionId(1), tx.clone(), 1, None);
        hub.unsubscribe(&ch, ConnectionId(1), None);
        assert_eq!(hub.channel_count(), 0);
        publish(&hub, ch.to_string(), msg(None));
        hub.subscribe(&ch, ConnectionId(1), tx, 2, None);
        hub.unsubscribe(&ch, ConnectionId(1), None);
        assert_eq!(hub.channel_count(), 1);
        assert_eq!(publish(&hub, ch.to_string(), msg(None)).seq, Seq(2));
    }
}
