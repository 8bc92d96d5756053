//! Presence on the edge: this node's members of each channel (entered by its connections),
//! the members its peers replicate to it, and the connections that watch a channel's
//! presence.
//!
//! The state is one [`Presence`] (`tern_backbone::core::presence`): the backbone's when it
//! runs (replicated to the peers), else the node's own. Every change and every event is made
//! and handed out under that state's lock, and a watcher's snapshot is read and queued under
//! it too, so a watcher sees its snapshot and then every change after it, none twice and
//! none missed.
//!
//! ```text
//!  PresenceRequest ─▶ enter / update / leave ─┐
//!  peer deltas (backbone driver) ─────────────┼─▶ Presence (locked) ─▶ events ─▶ watchers' outboxes
//!  Subscribe { presence } ─▶ watch: snapshot ─┘
//!  connection ends ─▶ its members linger `presence.grace` ─▶ leave (or `Connect.recover`)
//! ```
//!
//! Lock order: the presence state, then `watchers`, then an outbox. `lingering` is never
//! held while taking the presence state.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tern_backbone::core::{Action, MemberKey, Presence, PresenceConfig, PresenceEvent};
use tern_backbone::transport::Backbone;
use tern_proto::client::{
    self, PresenceAction, PresenceMember, PresenceReply, presence_member, presence_request,
    server_frame,
};
use tern_proto::types::{ChannelName, ConnectionId, Epoch, NodeId};

use crate::fanout::{Outbox, Outgoing, SharedFrame};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Member data as the core keeps it: empty (none), or a tag byte (1: text, 2: binary) and
/// the bytes.
pub fn data_to_bytes(data: Option<presence_request::Data>) -> Bytes {
    let (tag, bytes) = match data {
        None => return Bytes::new(),
        Some(presence_request::Data::Text(t)) => (1u8, Bytes::from(t)),
        Some(presence_request::Data::Binary(b)) => (2u8, b),
    };
    let mut out = BytesMut::with_capacity(1 + bytes.len());
    out.put_u8(tag);
    out.put_slice(&bytes);
    out.freeze()
}

fn data_of(bytes: &Bytes) -> Option<presence_member::Data> {
    match bytes.first() {
        Some(1) => {
            Some(presence_member::Data::Text(String::from_utf8_lossy(&bytes[1..]).into_owned()))
        }
        Some(2) => Some(presence_member::Data::Binary(bytes.slice(1..))),
        _ => None,
    }
}

/// A member as the protocol shows it.
pub fn member(owner: &NodeId, key: &MemberKey, data: &Bytes) -> PresenceMember {
    PresenceMember {
        client_id: key.client_id.clone(),
        connection_id: key.connection_id.clone(),
        node: owner.to_string(),
        data: data_of(data),
    }
}

/// About the bytes a member takes in a frame, in either encoding: base64 for binary data
/// in JSON, escapes for text (up to 6 bytes a character, `\u0001`), field names.
fn member_len(owner: &NodeId, key: &MemberKey, data: &Bytes) -> usize {
    let data = match data.first() {
        Some(1) => (data.len() - 1) * 6,
        _ => data.len() * 4 / 3,
    };
    64 + owner.as_str().len() + (key.client_id.len() + key.connection_id.len()) * 6 + data
}

/// Pages order members by (client id, connection id, node); `next` names the last one a
/// page holds (an opaque string to clients).
fn cursor(owner: &NodeId, key: &MemberKey) -> String {
    format!("{}\u{1f}{}\u{1f}{}", key.client_id, key.connection_id, owner)
}

/// The member a cursor names.
fn parse_cursor(s: &str) -> Option<(MemberKey, NodeId)> {
    let mut parts = s.split('\u{1f}');
    let (client_id, connection_id, node) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let key = MemberKey { client_id: client_id.into(), connection_id: connection_id.into() };
    Some((key, NodeId::parse(node).ok()?))
}

type Members = Vec<(NodeId, MemberKey, Bytes)>;

/// How many of `members` make the first page: at most `max` members and `budget` bytes (at
/// least one member).
fn page_len(members: &[(NodeId, MemberKey, Bytes)], max: usize, budget: usize) -> usize {
    let mut bytes = 0usize;
    for (n, (owner, key, data)) in members.iter().enumerate() {
        bytes += member_len(owner, key, data);
        if n > 0 && (n == max || bytes > budget) {
            return n;
        }
    }
    members.len()
}

/// Why a presence change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The channel holds `presence.max_members`.
    Full(usize),
}

/// Members of an ended connection, kept for `presence.grace`.
struct Lingering {
    member_id: String,
    channels: Vec<ChannelName>,
    /// Tells this record from a later one of the same key.
    serial: u64,
}

/// A channel's watchers, and its events waiting to be sent to them in one batch.
#[derive(Default)]
struct Watched {
    watchers: HashMap<ConnectionId, Outbox>,
    pending: Vec<client::PresenceEvent>,
}

/// How events are framed.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Channels with more members than this get their events in batches.
    pub over: usize,
    /// Most events (and snapshot members) per frame.
    pub page_size: usize,
    /// Most bytes of members per frame.
    pub budget: usize,
}

/// The node's presence (see the module docs).
pub struct PresenceHub {
    me: NodeId,
    batching: Batching,
    /// The node's own state, when no backbone runs.
    local: Mutex<Presence>,
    watchers: Mutex<HashMap<ChannelName, Watched>>,
    /// Some channel has events waiting for the next batch.
    batched: std::sync::atomic::AtomicBool,
    /// (client id, ended connection id) → its members, until recovered or `grace` passed.
    lingering: Mutex<HashMap<(String, String), Lingering>>,
    next_serial: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for PresenceHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceHub").field("me", &self.me).finish_non_exhaustive()
    }
}

impl PresenceHub {
    /// Presence for node `me` in `epoch`.
    pub fn new(me: NodeId, epoch: Epoch, batching: Batching) -> Self {
        Self {
            local: Mutex::new(Presence::new(me.clone(), epoch, &[], PresenceConfig::default())),
            me,
            batching,
            batched: std::sync::atomic::AtomicBool::new(false),
            watchers: Mutex::new(HashMap::new()),
            lingering: Mutex::new(HashMap::new()),
            next_serial: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Runs `f` on the presence state (the backbone's, when it runs), locked, then hands the
    /// events it made to the watchers, still locked.
    fn with<R>(&self, backbone: Option<&Backbone>, f: impl FnOnce(&mut Presence) -> R) -> R {
        let run = |p: &mut Presence| {
            let out = f(p);
            while let Some(e) = p.poll_event() {
                let members = p.member_count(&e.channel);
                self.fan_out(e, members);
            }
            out
        };
        match backbone {
            Some(b) => b.with_presence(run),
            None => run(&mut lock(&self.local)),
        }
    }

    /// Hands `event` to the channel's watchers (called with the presence state locked: by
    /// [`PresenceHub::with`], and by the backbone's driver through its sink). On a channel
    /// of more than `batching.over` members it waits for the next batch
    /// ([`PresenceHub::flush`]).
    pub fn fan_out(&self, event: PresenceEvent, members: usize) {
        let mut watchers = lock(&self.watchers);
        let Some(watched) = watchers.get_mut(&event.channel) else { return };
        let action = match event.action {
            Action::Enter => PresenceAction::Enter,
            Action::Update => PresenceAction::Update,
            Action::Leave => PresenceAction::Leave,
        };
        let event_pb = client::PresenceEvent {
            action: action as i32,
            member: Some(member(&event.owner, &event.key, &event.data)),
        };
        watched.pending.push(event_pb);
        if members > self.batching.over && watched.pending.len() < self.batching.page_size {
            self.batched.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        self.send(&event.channel, watched);
        if watched.watchers.is_empty() {
            watchers.remove(&event.channel);
        }
    }

    /// Sends `watched`'s pending events, in frames of at most `page_size` events and about
    /// `budget` bytes, each encoded once per format for all its watchers.
    fn send(&self, channel: &ChannelName, watched: &mut Watched) {
        let pending = std::mem::take(&mut watched.pending);
        let mut frames = Vec::new();
        let mut events = Vec::new();
        let mut bytes = 0;
        for e in pending {
            let len = e.member.as_ref().map_or(64, |m| {
                let data = match &m.data {
                    Some(presence_member::Data::Text(t)) => t.len() * 6,
                    Some(presence_member::Data::Binary(b)) => b.len() * 4 / 3,
                    None => 0,
                };
                64 + (m.client_id.len() + m.connection_id.len()) * 6 + m.node.len() + data
            });
            if !events.is_empty()
                && (events.len() >= self.batching.page_size || bytes + len > self.batching.budget)
            {
                frames.push(std::mem::take(&mut events));
                bytes = 0;
            }
            bytes += len;
            events.push(e);
        }
        if !events.is_empty() {
            frames.push(events);
        }
        for events in frames {
            let frame = client::PresenceEvents { channel: channel.to_string(), events };
            let shared = SharedFrame::new(server_frame::Kind::Presence(frame));
            // A watcher whose queue overflowed is dropped; its session closes (slow
            // consumer).
            watched.watchers.retain(|_, outbox| outbox.push(Outgoing::Shared(shared.clone())));
        }
    }

    /// Sends the events waiting for their batch (every `presence.batch_interval`).
    pub fn flush(&self, backbone: Option<&Backbone>) {
        if !self.batched.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        // Under the presence lock, as events are made: nothing overtakes them.
        self.with(backbone, |_| {
            let mut watchers = lock(&self.watchers);
            let channels: Vec<ChannelName> = watchers
                .iter()
                .filter(|(_, w)| !w.pending.is_empty())
                .map(|(c, _)| c.clone())
                .collect();
            for channel in channels {
                if let Some(watched) = watchers.get_mut(&channel) {
                    self.send(&channel, watched);
                    if watched.watchers.is_empty() {
                        watchers.remove(&channel);
                    }
                }
            }
        });
    }

    /// Enters `key` on `channel` with `data`, or changes its data. Refused when the channel
    /// is full (only for a member not yet present).
    pub fn put(
        &self,
        backbone: Option<&Backbone>,
        channel: &ChannelName,
        key: MemberKey,
        data: Bytes,
        max_members: usize,
    ) -> Result<(), Refused> {
        self.with(backbone, |p| {
            if !p.is_member(channel, &key) && p.member_count(channel) >= max_members {
                return Err(Refused::Full(max_members));
            }
            p.put(channel, key, data);
            Ok(())
        })
    }

    /// `key` leaves `channel` (nothing happens when it is not present).
    pub fn leave(&self, backbone: Option<&Backbone>, channel: &ChannelName, key: &MemberKey) {
        self.with(backbone, |p| {
            let _ = p.leave(channel, key);
        });
    }

    /// A page of `channel`'s members after `after` (a page's `next`; empty: from the
    /// first), at most `limit` members and `budget` bytes.
    /// An `after` that is not a page's `next` is refused.
    pub fn get(
        &self,
        backbone: Option<&Backbone>,
        channel: &ChannelName,
        after: &str,
        limit: usize,
        budget: usize,
    ) -> Result<(Vec<PresenceMember>, String), String> {
        let after = match after {
            "" => None,
            s => Some(parse_cursor(s).ok_or("after: not the next of a presence page")?),
        };
        // Read in order from the owners' sorted sets: the lock is held for the page only.
        let page: Members = self.with(backbone, |p| {
            p.page(channel, after.as_ref().map(|(k, o)| (k, o)), limit.saturating_add(1))
        });
        let end = page_len(&page, limit, budget);
        let members = page[..end].iter().map(|(n, k, d)| member(n, k, d)).collect();
        let next = match end < page.len() {
            true => cursor(&page[end - 1].0, &page[end - 1].1),
            false => String::new(),
        };
        Ok((members, next))
    }

    /// `conn` watches `channel`: its outbox gets the channel's members now (PresenceReply
    /// pages with `request_id`, the last with no `next`) and every change after.
    pub fn watch(
        &self,
        backbone: Option<&Backbone>,
        channel: &ChannelName,
        conn: ConnectionId,
        outbox: &Outbox,
        request_id: u32,
        (page_size, budget): (usize, usize),
    ) {
        self.with(backbone, |p| {
            // Events waiting for their batch go to the watchers before: the snapshot
            // already holds them.
            let mut watchers = lock(&self.watchers);
            if let Some(watched) = watchers.get_mut(channel) {
                self.send(channel, watched);
            }
            drop(watchers);
            let all = p.page(channel, None, usize::MAX);
            let mut rest = &all[..];
            loop {
                let end = page_len(rest, page_size, budget);
                let members = rest[..end].iter().map(|(n, k, d)| member(n, k, d)).collect();
                let next = match end < rest.len() {
                    true => cursor(&rest[end - 1].0, &rest[end - 1].1),
                    false => String::new(),
                };
                let last = next.is_empty();
                rest = &rest[end..];
                let reply =
                    PresenceReply { request_id, channel: channel.to_string(), members, next };
                // Charged its size (the session stops reading requests while it waits to
                // be written); bounded by `presence.max_members`.
                let frame = SharedFrame::new(server_frame::Kind::PresenceReply(reply));
                outbox.push_replay(Outgoing::Shared(frame));
                if last {
                    break;
                }
            }
            let mut watchers = lock(&self.watchers);
            watchers.entry(channel.clone()).or_default().watchers.insert(conn, outbox.clone());
        });
    }

    /// `conn` no longer watches `channel`.
    pub fn unwatch(&self, channel: &ChannelName, conn: ConnectionId) {
        let mut watchers = lock(&self.watchers);
        if let Some(watched) = watchers.get_mut(channel) {
            watched.watchers.remove(&conn);
            if watched.watchers.is_empty() {
                watchers.remove(channel);
            }
        }
    }

    /// Connection `conn` of `client_id` ended, a member (as `member_id`) of `channels`: they
    /// stay for `grace`, then leave, unless a connection of the same client recovers them.
    pub fn linger(
        self: &Arc<Self>,
        node: &Arc<crate::node::Node>,
        client_id: String,
        conn: ConnectionId,
        member_id: String,
        channels: Vec<ChannelName>,
        grace: Duration,
    ) {
        if channels.is_empty() {
            return;
        }
        let serial = self.next_serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = (client_id, conn.to_string());
        lock(&self.lingering).insert(key.clone(), Lingering { member_id, channels, serial });
        let (this, weak) = (self.clone(), Arc::downgrade(node));
        let shutdown = node.shutdown().clone();
        node.tracker().spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                // At shutdown the members go with the node (its peers drop them).
                _ = shutdown.cancelled() => return,
            }
            let gone = {
                let mut lingering = lock(&this.lingering);
                match lingering.get(&key) {
                    Some(l) if l.serial == serial => lingering.remove(&key),
                    _ => None,
                }
            };
            let (Some(l), Some(node)) = (gone, weak.upgrade()) else { return };
            let member = MemberKey { client_id: key.0.clone(), connection_id: l.member_id };
            for channel in &l.channels {
                this.leave(node.hub().backbone(), channel, &member);
            }
        });
    }

    /// A connection of `client_id` takes over the members of its ended connection
    /// `previous`, if they still linger: their member id and channels.
    pub fn recover(&self, client_id: &str, previous: &str) -> Option<(String, Vec<ChannelName>)> {
        let l = lock(&self.lingering).remove(&(client_id.to_owned(), previous.to_owned()))?;
        Some((l.member_id, l.channels))
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.me
    }

    /// Members of channels this node knows of, for tests and metrics: (channel, count).
    pub fn counts(&self, backbone: Option<&Backbone>) -> BTreeMap<ChannelName, usize> {
        self.with(backbone, |p| {
            p.channels().into_iter().map(|c| (c.clone(), p.member_count(&c))).collect()
        })
    }
}
