//! The channel registry: sequencing, de-duplication and fan-out to local subscribers.
//!
//! Each channel has one lock. A publish takes it, assigns the origin sequence and the log
//! offset, and pushes the shared encoded message into every subscriber's outbox before
//! releasing it, so every subscriber sees one channel order and each publisher's messages
//! in the order it sent them. Nothing under the lock waits: a full outbox is an overflow
//! (see [`crate::fanout`]), never a stall.
//!
//! A channel that was never published to is dropped with its last subscriber. A channel
//! that was keeps its counters (so origin sequences are never reused within an epoch) and
//! its de-duplication window. The durable log (a later issue) bounds that by retention.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use prost::Message as _;
use tern_backbone::transport::Backbone;
use tern_proto::client::{
    Discontinuity, Message, OriginPosition, Position, Resume, Subscribed, message, server_frame,
};
use tern_proto::codec::EncodedMessage;
use tern_proto::types::{ChannelName, ConnectionId, Epoch, NodeId, Offset, Seq};

use crate::fanout::{Outbox, Outgoing};

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
}

impl Accepted {
    /// The publisher's `Ack` frame.
    pub fn into_ack(self, request_id: u32, channel: String) -> tern_proto::client::Ack {
        tern_proto::client::Ack {
            request_id,
            channel,
            message_id: self.message_id,
            origin_seq: self.seq.0,
            position: Some(Position { epoch: self.epoch.0, offset: self.offset.0 }),
            timestamp_ms: self.timestamp_ms,
            duplicate: self.duplicate,
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
}

#[derive(Debug)]
struct Channel {
    state: Mutex<ChannelState>,
}

#[derive(Debug, Default)]
struct ChannelState {
    /// The channel's name, set when the registry creates it.
    name: Option<ChannelName>,
    /// Last origin sequence this node assigned.
    seq: u64,
    /// Last log offset.
    offset: u64,
    subscribers: HashMap<ConnectionId, Outbox>,
    /// First subscribers waiting for the peers to confirm the channel (see
    /// [`Hub::subscribe`]).
    pending: Vec<PendingSub>,
    /// Whether this node asked the backbone for the channel (it has, or had until the
    /// last one left, local subscribers).
    interested: bool,
    dedupe: Dedupe,
    /// Set when the registry dropped this channel; holders must look it up again.
    removed: bool,
    /// Own sequences (this epoch) a node of another region acknowledged.
    replicated: u64,
    /// The newest messages of a channel that keeps history (at most [`REWIND_MAX`]), so a
    /// rewind is served under the channel lock, seamlessly joined to the live stream.
    recent: VecDeque<Arc<EncodedMessage>>,
    /// `recent` was dropped while the channel sat idle (see [`Hub::sweep`]); it is read
    /// back from the log before the channel is used again.
    tail_evicted: bool,
    /// When the channel last logged a message (history channels: the ones with a tail).
    last_message: Option<Instant>,
    /// Per other origin, the last message delivered here (newest epoch only).
    remote: Vec<OriginPosition>,
}

/// What [`Hub::resume`] did.
#[derive(Debug)]
pub enum Resumed {
    /// The subscription is set up (any replay, discontinuity and `Subscribed` are queued, or
    /// the frame is returned for the session to send, as with [`Hub::subscribe`]).
    Done(Option<Subscribed>),
    /// The session must replay from the log first (see [`crate::resume`]); the subscription
    /// is not live until [`Hub::finish_catchup`] says so.
    Catchup(Box<crate::resume::Catchup>, Subscribed),
}

/// Most messages a subscription can rewind.
pub const REWIND_MAX: usize = 100;

#[derive(Debug)]
struct PendingSub {
    conn: ConnectionId,
    outbox: Outbox,
    request_id: u32,
}

#[derive(Debug, Default)]
struct Dedupe {
    seen: HashMap<String, Accepted>,
    order: VecDeque<(Instant, String)>,
    /// Ids of messages that arrived from other origins, as keyed 64-bit hashes (the
    /// replication path stays allocation-free; the key is random per process, so ids
    /// cannot be crafted to collide).
    remote: std::collections::HashSet<u64>,
    remote_order: VecDeque<(Instant, u64)>,
}

impl Dedupe {
    fn prune(&mut self, now: Instant, limits: &HubLimits) {
        expire(&mut self.order, now, limits, |id| {
            self.seen.remove(&id);
        });
        expire(&mut self.remote_order, now, limits, |h| {
            self.remote.remove(&h);
        });
    }
}

/// Drops the entries of `order` older than the dedupe window or beyond its size, handing
/// each to `forget`.
fn expire<T>(
    order: &mut VecDeque<(Instant, T)>,
    now: Instant,
    limits: &HubLimits,
    mut forget: impl FnMut(T),
) {
    while let Some((at, _)) = order.front() {
        if now.duration_since(*at) < limits.dedupe_window && order.len() <= limits.dedupe_ids {
            break;
        }
        if let Some((_, key)) = order.pop_front() {
            forget(key);
        }
    }
}

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

/// The log offset a message was delivered at on this node.
fn offset_of(m: &EncodedMessage) -> u64 {
    m.message().position.map_or(0, |p| p.offset)
}

/// Records the newest message of an origin in a channel's vector.
fn note_origin(vector: &mut Vec<OriginPosition>, origin: &str, epoch: u64, seq: u64) {
    match vector.iter_mut().find(|p| p.origin == origin) {
        Some(p) if (epoch, seq) > (p.epoch, p.seq) => {
            p.epoch = epoch;
            p.seq = seq;
        }
        Some(_) => {}
        None => vector.push(OriginPosition { origin: origin.to_owned(), epoch, seq }),
    }
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
        }
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

    /// Delivers a message replicated from another origin to local subscribers, at the next
    /// position of this node's channel log. Returns false for a payload that is not a valid
    /// message (the origin's bug; dropped and logged).
    pub fn deliver_remote(&self, payload: &[u8]) -> bool {
        let Ok(mut message) = Message::decode(payload) else {
            tracing::warn!("undecodable replicated message dropped");
            return false;
        };
        if ChannelName::validate(&message.channel).is_err() {
            tracing::warn!(channel = %message.channel, "replicated message with an invalid channel dropped");
            return false;
        }
        let channel = message.channel.clone();
        let epoch = self.log_epoch.0;
        let now = Instant::now();
        let mut message = Some(&mut message);
        self.with_state(&channel, |state| {
            let Some(m) = message.take() else { return };
            // Already here: a message the restarted origin relayed again from its log (see
            // `Hub::relay_recent`), which reached this node before the crash.
            if crate::resume::covers(&state.remote, m) {
                return;
            }
            note_origin(&mut state.remote, &m.origin, m.origin_epoch, m.origin_seq);
            // A publish retried on another region (after a failover) carries the same id:
            // whichever copy reaches this node first is the one delivered here.
            state.dedupe.prune(now, &self.limits);
            if !m.id.is_empty() {
                let h = self.id_hash.hash_one(&m.id);
                if state.dedupe.seen.contains_key(&m.id) || !state.dedupe.remote.insert(h) {
                    tracing::debug!(channel = %m.channel, id = %m.id, origin = %m.origin, "repeated id from another origin dropped");
                    return;
                }
                state.dedupe.remote_order.push_back((now, h));
            }
            state.offset += 1;
            m.position = Some(Position { epoch, offset: state.offset });
            let encoded = Arc::new(EncodedMessage::new(std::mem::take(m)));
            let offset = state.offset;
            let _ = self.log(state, &channel, offset, &encoded);
            state.subscribers.retain(|_, outbox| outbox.push(Outgoing::Message(encoded.clone())));
        });
        true
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

    /// Writes a message to the durable log if its namespace keeps history (and keeps it
    /// among the channel's recent ones); returns the store ticket to wait for.
    fn log(
        &self,
        state: &mut ChannelState,
        channel: &str,
        offset: u64,
        encoded: &Arc<EncodedMessage>,
    ) -> Option<u64> {
        let store = self.store.as_ref()?;
        if !store.keeps(channel) {
            return None;
        }
        state.recent.push_back(encoded.clone());
        if state.recent.len() > REWIND_MAX {
            state.recent.pop_front();
        }
        state.last_message = Some(Instant::now());
        let name = ChannelName::parse(channel).ok()?;
        let ticket = store.append(&name, offset, encoded.protobuf());
        if ticket.is_none() {
            tracing::error!(%channel, offset, "history writer is gone; message not logged");
        }
        ticket
    }

    /// After a restart (a new origin epoch): sends this node's own messages of earlier epochs
    /// logged in the last `within` (at most `max` per channel) to the peers again, each
    /// keeping its original origin, epoch and sequence. What the peers already have they
    /// drop (by origin vector or id); what the crash kept from reaching them arrives now,
    /// ahead of the new epoch's messages. Returns the number relayed.
    pub fn relay_recent(&self, within: Duration, max: usize) -> usize {
        let (Some(store), Some(backbone)) = (self.store.as_ref(), self.backbone.get()) else {
            return 0;
        };
        let now = crate::store::now_ms();
        let since = now.saturating_sub(within.as_millis() as u64);
        let channels = store.channels().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot list the logged channels");
            Vec::new()
        });
        let mut relayed = 0;
        for name in channels.iter().filter(|c| store.keeps(c)) {
            let Ok(channel) = ChannelName::parse(name) else { continue };
            let q = crate::store::Query {
                from: None,
                to: None,
                since_ms: Some(since),
                until_ms: None,
                limit: max,
                backwards: true,
            };
            let rows = store.read(name, q).unwrap_or_default();
            let own: Vec<_> = rows
                .into_iter()
                .rev()
                .filter(|r| {
                    Message::decode(r.message.as_slice()).is_ok_and(|m| {
                        m.origin == self.node.as_str() && m.origin_epoch != self.epoch.0
                    })
                })
                .collect();
            if own.is_empty() {
                continue;
            }
            self.with_state(name, |state| {
                for r in &own {
                    state.seq += 1;
                    backbone.publish(channel.clone(), bytes::Bytes::from(r.message.clone()));
                }
            });
            relayed += own.len();
        }
        relayed
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
            let before = d.order.len() + d.remote_order.len();
            d.prune(now, &self.limits);
            let after = d.order.len() + d.remote_order.len();
            swept.ids += before - after;
            if after == 0 && before > 0 {
                *d = Dedupe::default();
            }
            let idle = state.subscribers.is_empty()
                && state.pending.is_empty()
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

    /// Looks a channel up by its (already validated) name, creating it if needed while the
    /// node holds fewer than `max` channels (`None` at the limit).
    fn channel(&self, name: &str, max: usize) -> Option<Arc<Channel>> {
        if let Some(c) = self.channels.read().unwrap_or_else(PoisonError::into_inner).get(name) {
            return Some(c.clone());
        }
        let mut map = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get(name) {
            return Some(c.clone());
        }
        if map.len() >= max {
            return None;
        }
        let key = ChannelName::parse(name).unwrap_or_else(|_| unvalidated(name));
        let mut state = ChannelState { name: Some(key.clone()), ..ChannelState::default() };
        // A logged channel continues its offsets after a restart.
        if let Some(store) = self.store.as_ref().filter(|s| s.keeps(name)) {
            match store.last_offset(name) {
                Ok(last) => state.offset = last,
                Err(e) => {
                    tracing::error!(channel = name, error = %e, "cannot read the history log")
                }
            }
            // And its newest messages, for rewinds.
            self.load_tail(name, &mut state, true);
        }
        let channel = Arc::new(Channel { state: Mutex::new(state) });
        map.insert(key, channel.clone());
        Some(channel)
    }

    /// Reads the channel's newest logged messages into its in-memory tail (`recent`), when
    /// its namespace keeps history. At creation (`seed`), also what they tell about other
    /// origins and the ids already sequenced, so a retry or a relayed copy after a restart
    /// is recognised; when the tail comes back after an idle spell, only the tail.
    fn load_tail(&self, name: &str, state: &mut ChannelState, seed: bool) {
        state.tail_evicted = false;
        let Some(store) = self.store.as_ref().filter(|s| s.keeps(name)) else { return };
        let newest = crate::store::Query {
            from: None,
            to: None,
            since_ms: None,
            until_ms: None,
            limit: REWIND_MAX,
            backwards: true,
        };
        let now = Instant::now();
        state.recent.clear();
        for m in store.read(name, newest).unwrap_or_default().into_iter().rev() {
            let Ok(msg) = Message::decode(m.message.as_slice()) else { continue };
            if seed {
                if msg.origin != self.node.as_str() {
                    note_origin(&mut state.remote, &msg.origin, msg.origin_epoch, msg.origin_seq);
                }
                if !msg.id.is_empty() && !state.dedupe.seen.contains_key(&msg.id) {
                    let accepted = Accepted {
                        message_id: msg.id.clone(),
                        seq: Seq(msg.origin_seq),
                        offset: Offset(m.offset),
                        timestamp_ms: msg.timestamp_ms,
                        duplicate: false,
                        epoch: self.log_epoch,
                        log_ticket: None,
                        own: msg.origin == self.node.as_str() && msg.origin_epoch == self.epoch.0,
                    };
                    state.dedupe.seen.insert(msg.id.clone(), accepted);
                    state.dedupe.order.push_back((now, msg.id.clone()));
                }
            }
            state.recent.push_back(Arc::new(EncodedMessage::new(msg)));
        }
    }

    /// Runs `f` on the live state of `name`, creating the channel if needed (whatever the
    /// channel limit: replication and existing subscriptions must not be refused).
    fn with_state<R>(&self, name: &str, f: impl FnMut(&mut ChannelState) -> R) -> R {
        self.with_state_within(name, usize::MAX, f)
            .unwrap_or_else(|| unreachable!("no limit, so the channel exists"))
    }

    /// Runs `f` on the live state of `name`, creating the channel only while the node holds
    /// fewer than `max` channels; `None` when it would be a new one beyond that.
    fn with_state_within<R>(
        &self,
        name: &str,
        max: usize,
        mut f: impl FnMut(&mut ChannelState) -> R,
    ) -> Option<R> {
        loop {
            let channel = self.channel(name, max)?;
            let mut state = lock(&channel.state);
            if !state.removed {
                if state.tail_evicted {
                    self.load_tail(name, &mut state, false);
                }
                return Some(f(&mut state));
            }
        }
    }

    /// The channel's vector: per origin (this node first), the last message delivered here.
    fn origins(&self, state: &ChannelState) -> Vec<OriginPosition> {
        let own = OriginPosition {
            origin: self.node.as_str().to_owned(),
            epoch: self.epoch.0,
            seq: state.seq,
        };
        std::iter::once(own).chain(state.remote.iter().cloned()).collect()
    }

    /// The `Subscribed` frame for a subscription whose live stream starts now.
    fn subscribed(&self, state: &ChannelState, request_id: u32, name: &ChannelName) -> Subscribed {
        Subscribed {
            request_id,
            channel: name.to_string(),
            position: Some(Position { epoch: self.log_epoch.0, offset: state.offset }),
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

    /// Adds a subscriber. Returns the `Subscribed` frame to send when its live stream starts
    /// at once.
    ///
    /// With a backbone, the first local subscriber of a channel makes the node ask its peers
    /// for it; the subscription then takes effect once they confirmed (or after the
    /// backbone's `interest_wait`), so that from its `Subscribed` reply on, everything
    /// published anywhere reaches it. Until then this returns `None`, and the `Subscribed`
    /// frame for `request_id` is queued to `outbox` when it takes effect.
    ///
    /// With `rewind` on a channel that keeps history, the `Subscribed` frame and the recent
    /// messages it asks for are queued to `outbox` at once, ahead of the live stream (so
    /// this returns `None` too): the seam has no gap and no duplicate.
    pub fn subscribe(
        &self,
        name: &ChannelName,
        conn: ConnectionId,
        outbox: Outbox,
        request_id: u32,
        rewind: Option<tern_proto::client::Rewind>,
    ) -> Option<Subscribed> {
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
                let mut ok = outbox
                    .push(Outgoing::Frame(Box::new(server_frame::Kind::Subscribed(subscribed))));
                for m in rewound(&state.recent, r) {
                    ok = ok && outbox.push(Outgoing::Message(m.clone()));
                }
                if ok {
                    state.subscribers.insert(conn, outbox.clone());
                }
                return None;
            }
            self.join(state, name, conn, &outbox, request_id)
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
    ) -> Option<Subscribed> {
        if !self.want(state, name) {
            state.pending.push(PendingSub { conn, outbox: outbox.clone(), request_id });
            return None;
        }
        state.subscribers.insert(conn, outbox.clone());
        Some(self.subscribed(state, request_id, name))
    }

    /// Adds a subscriber that continues where an earlier subscription left off (see
    /// [`crate::resume`]). Channels that keep history replay what the client missed; others
    /// can only tell it (with a `Discontinuity`) that it missed something.
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        &self,
        name: &ChannelName,
        conn: ConnectionId,
        outbox: Outbox,
        request_id: u32,
        resume: Resume,
        window: Duration,
        max_scan: usize,
    ) -> Resumed {
        let claimed = resume.node == self.node.as_str()
            && resume.position.is_some_and(|p| p.epoch == self.log_epoch.0);
        let after = resume.position.map_or(0, |p| p.offset);
        let history = self.store.as_ref().filter(|s| s.keeps(name.as_str()));
        self.with_state(name.as_str(), |state| {
            // A position on this node counts only if this node still has the client's last
            // message there: after a crash, offsets delivered but not yet logged are issued
            // again to other messages.
            let mut verify_at = None;
            let same_node = claimed
                && after <= state.offset
                && (after == 0
                    || match state.recent.iter().find(|m| offset_of(m) == after) {
                        Some(m) => crate::resume::covers(&resume.origins, m.message()),
                        None => {
                            verify_at = Some(after);
                            history.is_some()
                        }
                    });
            let Some(store) = history else {
                // No log: say whether anything was missed, then go live.
                let missed = if same_node {
                    state.offset > after
                } else {
                    let known = self.origins(state);
                    !resume.origins.iter().all(|v| {
                        known
                            .iter()
                            .any(|k| k.origin == v.origin && k.epoch == v.epoch && k.seq == v.seq)
                    }) || known
                        .iter()
                        .any(|k| k.seq > 0 && !resume.origins.iter().any(|v| v.origin == k.origin))
                };
                if missed {
                    let d = Discontinuity {
                        channel: name.to_string(),
                        reason: "this channel keeps no history: messages published while \
                                 disconnected cannot be replayed"
                            .into(),
                        origins: Vec::new(),
                    };
                    outbox.push(Outgoing::Frame(Box::new(server_frame::Kind::Discontinuity(d))));
                }
                return Resumed::Done(
                    self.join(state, name, conn, &outbox, request_id).map(|s| Subscribed {
                        resumed: true,
                        origins: Vec::new(),
                        ..s
                    }),
                );
            };
            self.want(state, name);
            let mut subscribed = self.subscribed(state, request_id, name);
            subscribed.resumed = true;
            subscribed.origins = Vec::new();
            // Same node, and the in-memory tail reaches back to the client's position: no
            // log read needed.
            let now = crate::store::now_ms();
            let cutoff_ms = now.saturating_sub(window.as_millis() as u64);
            if same_node
                && (after >= state.offset
                    || state.recent.front().is_some_and(|m| offset_of(m) <= after + 1))
            {
                let mut ok = outbox
                    .push(Outgoing::Frame(Box::new(server_frame::Kind::Subscribed(subscribed))));
                let missed = state.recent.iter().filter(|m| offset_of(m) > after);
                let stale = missed.clone().take_while(|m| m.message().timestamp_ms < cutoff_ms);
                let stale = stale.count();
                if stale > 0 {
                    let d = Discontinuity {
                        channel: name.to_string(),
                        reason: format!(
                            "{stale} message(s) are older than the resume window; fetch history"
                        ),
                        origins: Vec::new(),
                    };
                    ok = ok
                        && outbox
                            .push(Outgoing::Frame(Box::new(server_frame::Kind::Discontinuity(d))));
                }
                for m in missed.skip(stale) {
                    ok = ok && outbox.push(Outgoing::Message(m.clone()));
                }
                if ok {
                    state.subscribers.insert(conn, outbox.clone());
                }
                return Resumed::Done(None);
            }
            let catchup = crate::resume::Catchup {
                id: 0,
                channel: name.clone(),
                request_id,
                next: after + 1,
                head: state.offset,
                wait_ticket: store.last_ticket(),
                vector: resume.origins.clone(),
                found: same_node,
                verify_at,
                started: false,
                cutoff_ms,
                known: self.origins(state),
                max_scan,
            };
            Resumed::Catchup(Box::new(catchup), subscribed)
        })
    }

    /// Ends a replay that reached `next`: when the in-memory tail covers the rest, queues it
    /// (skipping what `vector` covers) and makes the subscription live; otherwise returns
    /// false (the log is behind; read more once it caught up).
    pub fn finish_catchup(
        &self,
        name: &ChannelName,
        conn: ConnectionId,
        outbox: &Outbox,
        next: u64,
        vector: &[OriginPosition],
        force: bool,
    ) -> bool {
        self.with_state(name.as_str(), |state| {
            let covered =
                next > state.offset || state.recent.front().is_some_and(|m| offset_of(m) <= next);
            if !covered && !force {
                return false;
            }
            let mut ok = true;
            for m in state.recent.iter().filter(|m| offset_of(m) >= next) {
                if !crate::resume::covers(vector, m.message()) {
                    ok = ok && outbox.push(Outgoing::Message(m.clone()));
                }
            }
            self.want(state, name);
            if ok {
                state.subscribers.insert(conn, outbox.clone());
            }
            true
        })
    }

    /// Tells the channel's subscribers that messages of `origin` were lost between regions
    /// (its log no longer held them when the link came back).
    pub fn discontinuity(&self, name: &ChannelName, origin: &str, epoch: u64, after: u64) {
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
        state.subscribers.retain(|_, outbox| {
            outbox.push(Outgoing::Frame(Box::new(server_frame::Kind::Discontinuity(frame.clone()))))
        });
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
            let subscribed = self.subscribed(&state, p.request_id, name);
            let frame = server_frame::Kind::Subscribed(subscribed);
            if p.outbox.push(Outgoing::Frame(Box::new(frame))) {
                state.subscribers.insert(p.conn, p.outbox);
            }
        }
    }

    /// Removes a subscriber. `then` is queued to its outbox after the last message of the
    /// channel it will get, so it arrives in order (e.g. the `Unsubscribed` frame).
    pub fn unsubscribe(&self, name: &ChannelName, conn: ConnectionId, then: Option<Outgoing>) {
        let Some(channel) =
            self.channels.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
        else {
            return;
        };
        let mut map = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        let mut state = lock(&channel.state);
        let removed = state.subscribers.remove(&conn).or_else(|| {
            let i = state.pending.iter().position(|p| p.conn == conn)?;
            Some(state.pending.remove(i).outbox)
        });
        if let (Some(outbox), Some(item)) = (removed, then) {
            outbox.push(item);
        }
        if state.subscribers.is_empty() && state.pending.is_empty() && state.interested {
            state.interested = false;
            if let Some(b) = self.backbone.get() {
                b.remove_interest(name);
            }
        }
        let unused = state.subscribers.is_empty()
            && state.pending.is_empty()
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
    /// it to every local subscriber. `None` when `name` would be a new channel and the node
    /// holds `max_channels` already.
    pub fn publish(&self, name: String, msg: NewMessage) -> Option<Accepted> {
        let now = Instant::now();
        let timestamp_ms = crate::store::now_ms();
        self.with_state_within(&name, self.limits.max_channels, |state| {
            state.dedupe.prune(now, &self.limits);
            if let Some(id) = &msg.id {
                if let Some(prev) = state.dedupe.seen.get(id) {
                    return Accepted { duplicate: true, ..prev.clone() };
                }
                if state.dedupe.remote.contains(&self.id_hash.hash_one(id)) {
                    // First sequenced by another origin (the publisher failed over here).
                    return Accepted {
                        message_id: id.clone(),
                        seq: Seq(0),
                        offset: Offset(state.offset),
                        timestamp_ms,
                        duplicate: true,
                        epoch: self.log_epoch,
                        log_ticket: None,
                        own: false,
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
            }));
            let offset = state.offset;
            let log_ticket = self.log(state, &name, offset, &encoded);
            let accepted = Accepted {
                message_id,
                seq: Seq(state.seq),
                offset: Offset(state.offset),
                timestamp_ms,
                duplicate: false,
                epoch: self.log_epoch,
                log_ticket,
                own: true,
            };
            if let Some(id) = &msg.id {
                state.dedupe.seen.insert(id.clone(), accepted.clone());
                state.dedupe.order.push_back((now, id.clone()));
            }
            // Overflowed subscribers are dropped here; their sessions close with 4001.
            state.subscribers.retain(|_, outbox| outbox.push(Outgoing::Message(encoded.clone())));
            // Still under the channel lock, so the backbone sees this channel's messages in
            // sequence order and numbers them the same way.
            if let Some(backbone) = self.backbone.get() {
                if let Some(channel) = state.name.clone() {
                    let seq = backbone.publish(channel, encoded.protobuf());
                    if seq.0 != state.seq {
                        tracing::error!(channel = %name, hub = state.seq, backbone = seq.0, "sequence mismatch");
                    }
                }
            }
            accepted
        })
    }
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
            HubLimits { dedupe_ids: 2, dedupe_window: Duration::from_secs(120), max_channels },
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
