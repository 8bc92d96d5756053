//! The protocol state of one client session, whatever carries its frames.
//!
//! [`Session`] takes client frames ([`Session::on_input`]) and produces server frames
//! ([`Session::poll_transmit`]): connect and auth (renewal, expiry), subscriptions with
//! rewind and resume, publishes and their acks in order, history reads, limits and rate
//! limits, and the reason it ends ([`End`]). It owns no socket and reads no socket: a
//! transport (a WebSocket, an HTTP stream, long polls; see `super::driver`) moves the frames,
//! and the driver runs the timers (heartbeat, connect deadline, token expiry, the waits of
//! acks, parked publishes and replays) and calls the matching method.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tern_proto::client::{
    self, Connected, ErrorCode, Limits, Nack, Unsubscribed, client_frame, server_frame,
};
use tern_proto::close;
use tern_proto::codec::{self, EncodedMessage, Format};
use tern_proto::types::{ChannelName, ConnectionId};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::channel::order::OrderReady;
use crate::fanout::{Held, Outbox, OutboxReceiver, Outgoing};
use crate::node::Node;
use crate::publish::{self, PublishRequest};
use crate::resume::{Catchup, Step};
use tern_proto::rate::TokenBucket;

/// Why a session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// End with this close code (see `tern_proto::close`) and reason: a WebSocket's close
    /// frame, an HTTP session's final `close` frame.
    Close(u16, String),
    /// The peer is gone (closed, reset); nothing to send.
    Gone,
}

/// What a transport hands the session.
#[derive(Debug)]
pub enum Input {
    /// A client frame: its bytes, and whether it is text (JSON) or binary (protobuf).
    Frame(Bytes, bool),
    /// A transport-level frame (a WebSocket ping or pong): counts against the frame rate,
    /// answers nothing.
    Control,
    /// The client showed it is there without a frame (an HTTP poll or stream arrived).
    Alive,
    /// The session ends: the client left, or the transport saw a fault (a frame too big).
    End(End),
}

/// What the session sends next.
#[derive(Debug)]
pub enum Transmit {
    /// A liveness probe is due (a WebSocket ping; a keep-alive on HTTP streams).
    Ping,
    /// A server frame in the session's format, with what it keeps until written.
    Frame(Bytes, Option<Held>),
    /// Messages to deliver, for a wire that writes them itself (see
    /// [`Session::messages_apart`]).
    Messages(Vec<Arc<EncodedMessage>>),
}

/// One client session's protocol state (see the module docs).
pub struct Session {
    pub(super) node: Arc<Node>,
    pub(super) id: ConnectionId,
    pub(super) format: Format,
    pub(super) client_id: Option<String>,
    channels: HashSet<ChannelName>,
    outbox: Outbox,
    /// What the writer sends next, in order: items taken from the outbox, replies and
    /// replayed messages. Written a chunk per loop turn, framed as it is written.
    out: VecDeque<Outgoing>,
    /// The [`Outgoing::cost`] of `out`.
    pub(super) out_bytes: usize,
    /// A ping is due before `out`.
    pub(super) ping: bool,
    /// Reused between batches.
    batch: Vec<Arc<EncodedMessage>>,
    /// `websocket.max_batch_messages` and `max_batch_bytes`.
    batch_limits: (usize, usize),
    /// Deliveries leave as [`Transmit::Messages`], not as `Deliver` frames.
    messages_apart: bool,
    /// Acks waiting for their messages to reach the history log (store ticket, frame), in
    /// publish order.
    pub(super) acks: VecDeque<PendingAck>,
    /// The history store's committed ticket, when the node keeps history.
    pub(super) committed: Option<watch::Receiver<u64>>,
    /// Resumed subscriptions replaying from the log, one at a time (see `crate::resume`).
    pub(super) catchups: VecDeque<Catchup>,
    /// Serial for the next catch-up.
    next_catchup: u64,
    /// The token given in the upgrade URL.
    url_token: Option<String>,
    /// The verified token's claims (token mode), and when it expires.
    claims: Option<crate::auth::Claims>,
    pub(super) expires: Option<Instant>,
    /// Every frame received takes a token (`limits.frame_rate`).
    frames: TokenBucket,
    /// Publishes take a token here (`limits.publish_rate`), or in their namespace's bucket
    /// (by index into `limits.namespaces`; made on first use).
    publishes: TokenBucket,
    namespace_publishes: Vec<(usize, TokenBucket)>,
    /// History reads of this connection in flight (`limits.history_reads_per_connection`).
    history_reads: Arc<std::sync::atomic::AtomicUsize>,
    /// Publishes waiting until the node caught up with the node that sequenced the
    /// publisher's earlier messages (`Publish.after`, see `crate::channel::order`), in
    /// order; later publishes of the same channel wait behind them.
    pub(super) parked: VecDeque<Parked>,
    /// (channel, origin, the origin's head this node waited for) whose publishes on this
    /// connection were ordered after that origin already: later ones naming it carry that
    /// head without asking again (bounded).
    synced: Vec<(String, client::OriginPosition)>,
    order_blocks: Vec<OrderBlock>,
    /// The connection id this connection's members carry: its own, or that of the ended
    /// connection whose members it recovered (`Connect.recover`).
    member_id: String,
    /// Channels this connection is a member of.
    present: HashSet<ChannelName>,
    /// Channels whose presence this connection watches (`Subscribe.presence`).
    watching: HashSet<ChannelName>,
    /// Presence requests take a token here (`presence.rate`).
    presence_ops: TokenBucket,
}

/// A publish waiting for its publisher's order.
pub(super) struct Parked {
    publish: client::Publish,
    /// Refused with `UNAVAILABLE` past this.
    deadline: Instant,
    /// The question to the origin of `after` (see `crate::channel::order`).
    probe: Option<u64>,
    /// Not a publish to sequence: a later publish's refusal, answered in its turn.
    refused: Option<Nack>,
}

/// A channel whose publish was refused for its order on this connection: until that
/// publish (`id`) is retried, or `until`, later ones of the channel are refused too.
struct OrderBlock {
    channel: String,
    id: String,
    until: Instant,
}

/// Most channels a connection keeps blocked that way.
const ORDER_BLOCKS_MAX: usize = 64;

/// Most (channel, origin) pairs a connection remembers as ordered.
const SYNCED_MAX: usize = 256;

/// Most publishes one connection holds for their order; more are refused (`UNAVAILABLE`).
const PARKED_MAX: usize = 1024;

/// How often parked publishes check whether they can go.
pub(super) const PARKED_CHECK: Duration = Duration::from_millis(10);

/// An ack waiting for its message to be durable enough.
pub(super) struct PendingAck {
    /// Store ticket of the log write (0: none).
    ticket: u64,
    /// When it was queued: a log write not confirmed within [`LOG_WAIT`] is answered
    /// `INTERNAL` (checked with the heartbeat, so at most an interval later).
    queued: Instant,
    /// `DURABILITY_REPLICATED`: the channel and own sequence another region must have, and
    /// when to give up.
    pub(super) replicated: Option<(String, u64, Instant)>,
    ack: client::Ack,
    /// A refusal that must leave in order with the acks (a parked publish refused).
    refused: Option<Nack>,
}

/// How long a `DURABILITY_REPLICATED` publish waits for another region.
const REPLICATION_WAIT: Duration = Duration::from_secs(10);

/// One replay step in flight: the catch-up's id, whether waiting for the log timed out,
/// and the step.
pub(super) type StepFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = (u64, bool, Result<Step, String>)> + Send>>;

/// How long a replay waits for the log to catch up with the messages it must replay, and
/// an ack for its message's log write.
pub(super) const LOG_WAIT: Duration = Duration::from_secs(10);

/// A history read on a connection: it counts against the connection's limit, and holds its
/// share of the node's read memory, until its page is written (or dropped with the
/// connection), so a client that does not read its pages cannot make the node hold more.
struct ReadSlot {
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    _bytes: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for ReadSlot {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Room a `history` frame leaves its messages under `max_frame_bytes`: the frame's other
/// fields (request id, channel, `nextFrom`, the JSON around them) take less than this.
fn history_page_budget(max_frame_bytes: usize, channel: &str) -> usize {
    const FRAME_FIELDS: usize = 256;
    max_frame_bytes.saturating_sub(FRAME_FIELDS + channel.len())
}

/// A `history` frame of `page`, ended early where its messages would take more than
/// `budget` bytes in `format` (always at least one message: any message fits a frame, see
/// `crate::config::min_frame_bytes`); `nextFrom` then names the first one left out.
fn history_page(
    mut page: crate::store::Page,
    request_id: u32,
    channel: String,
    format: Format,
    budget: usize,
) -> client::HistoryPage {
    let mut messages = Vec::with_capacity(page.messages.len());
    let mut bytes = 0usize;
    let mut cut = None;
    for (i, stored) in page.messages.iter().enumerate() {
        let Ok(m) = <client::Message as prost::Message>::decode(stored.message.as_slice()) else {
            continue;
        };
        bytes = bytes.saturating_add(codec::message_entry_len(&m, format));
        if bytes > budget && !messages.is_empty() {
            cut = Some(i);
            break;
        }
        messages.push(m);
    }
    if let Some(i) = cut {
        page.truncate(i);
    }
    client::HistoryPage { request_id, channel, messages, next_from: page.next_from }
}

impl Session {
    /// A session of connection `id` in `format`, delivering through `outbox`; `url_token` is
    /// a token given with the transport's request (`Connect.token` takes precedence).
    pub fn new(
        node: Arc<Node>,
        id: ConnectionId,
        format: Format,
        url_token: Option<String>,
        outbox: Outbox,
    ) -> Self {
        let cfg = &node.settings().config;
        let frames = TokenBucket::new(cfg.limits.frame_rate, cfg.limits.frame_burst);
        let publishes = TokenBucket::new(cfg.limits.publish_rate, cfg.limits.publish_burst);
        let committed = node.hub().store().map(|s| s.committed());
        Session {
            id,
            format,
            client_id: None,
            channels: HashSet::new(),
            outbox,
            out: VecDeque::new(),
            out_bytes: 0,
            ping: false,
            batch: Vec::new(),
            batch_limits: (cfg.websocket.max_batch_messages, cfg.websocket.max_batch_bytes),
            messages_apart: false,
            acks: VecDeque::new(),
            committed,
            catchups: VecDeque::new(),
            next_catchup: 1,
            url_token,
            claims: None,
            expires: None,
            frames,
            publishes,
            namespace_publishes: Vec::new(),
            history_reads: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            parked: VecDeque::new(),
            synced: Vec::new(),
            order_blocks: Vec::new(),
            member_id: id.to_string(),
            present: HashSet::new(),
            watching: HashSet::new(),
            presence_ops: TokenBucket::new(cfg.presence.rate, cfg.presence.burst),
            node,
        }
    }

    /// Whether the client sent its `Connect`.
    pub fn connected(&self) -> bool {
        self.client_id.is_some()
    }

    /// Handles what the transport received.
    pub fn on_input(&mut self, input: Input) -> Result<(), End> {
        let (payload, text) = match input {
            Input::Frame(payload, text) => (payload, text),
            Input::Control => return self.take_frame(),
            Input::Alive => return Ok(()),
            Input::End(end) => return Err(end),
        };
        self.take_frame()?;
        match codec::decode_client(&payload, text) {
            Ok(kind) => self.handle(kind),
            // Before `connect`, anything but a `connect` ends the connection (4002), a
            // frame that does not decode too.
            Err(e) if self.client_id.is_none() => {
                Err(End::Close(close::PROTOCOL_VIOLATION, format!("send Connect first ({e})")))
            }
            Err(e) => {
                // A request that does not decode is still answered as that request.
                let request = codec::request_of(&payload, text).unwrap_or_default();
                if request.kind == "publish" {
                    // Publishes are answered by ack or nack, in publish order.
                    self.refuse(Nack {
                        request_id: request.request_id,
                        channel: request.channel,
                        code: e.code() as i32,
                        reason: e.to_string(),
                        ..Nack::default()
                    });
                } else {
                    self.error(request.request_id, e.code(), e.to_string(), request.channel);
                }
                Ok(())
            }
        }
    }

    /// Every frame received takes a token (`limits.frame_rate`).
    fn take_frame(&mut self) -> Result<(), End> {
        if self.frames.take(std::time::Instant::now()).is_ok() {
            return Ok(());
        }
        let l = &self.cfg().limits;
        Err(End::Close(
            close::RATE_LIMITED,
            format!("more than {} frames/s (burst {})", l.frame_rate, l.frame_burst),
        ))
    }

    /// The next thing to send, framed in the session's format: consecutive messages share
    /// one `Deliver` frame up to `websocket.max_batch_messages` / `max_batch_bytes`.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if std::mem::take(&mut self.ping) {
            return Some(Transmit::Ping);
        }
        let format = self.format;
        let (max_msgs, max_bytes) = self.batch_limits;
        let item = self.out.pop_front()?;
        self.out_bytes = self.out_bytes.saturating_sub(item.cost());
        Some(match item {
            Outgoing::Message(m) => {
                let mut bytes = m.piece_len(format);
                self.batch.push(m);
                while self.batch.len() < max_msgs && bytes < max_bytes {
                    let Some(Outgoing::Message(m)) = self.out.front() else { break };
                    bytes += m.piece_len(format);
                    let Some(item) = self.out.pop_front() else { break };
                    self.out_bytes = self.out_bytes.saturating_sub(item.cost());
                    if let Outgoing::Message(m) = item {
                        self.batch.push(m);
                    }
                }
                self.node.metrics().delivered(self.batch.len());
                if self.messages_apart {
                    return Some(Transmit::Messages(std::mem::take(&mut self.batch)));
                }
                let frame = codec::deliver_frame(self.batch.iter().map(|m| &**m), format);
                self.batch.clear();
                Transmit::Frame(frame, None)
            }
            Outgoing::Frame(kind) => Transmit::Frame(codec::encode_server(*kind, format), None),
            Outgoing::Encoded(bytes) => Transmit::Frame(bytes, None),
            Outgoing::Shared(f) => Transmit::Frame(f.encoded(format), None),
            Outgoing::Held(h) => {
                let (kind, keep) = *h;
                Transmit::Frame(codec::encode_server(kind, format), Some(keep))
            }
        })
    }

    /// Deliveries leave as [`Transmit::Messages`] (the shared encoded messages), for a wire
    /// that writes each message itself instead of `Deliver` frames (server-sent events).
    pub fn messages_apart(&mut self) {
        self.messages_apart = true;
    }

    /// Gives back the write queue's memory after a burst: an idle session keeps none.
    pub fn compact(&mut self) {
        if self.out.is_empty() && self.out.capacity() > 1024 {
            self.out = VecDeque::new();
        }
    }

    fn cfg(&self) -> &crate::config::Config {
        &self.node.settings().config
    }

    /// Tells the client the node drains (it shuts down, or was told to drain): go to another
    /// node now (the other regions' URLs as a hint); the node closes the connection
    /// `close_in` later.
    pub fn drain_notice(&mut self, close_in: Duration) {
        let settings = self.node.settings();
        let urls = settings
            .config
            .regions
            .iter()
            .filter(|r| r.name != settings.region.as_str())
            .map(|r| r.url.clone())
            .collect();
        let frame = server_frame::Kind::Draining(client::Draining {
            reason: self.node.drain_reason().into(),
            urls,
            close_in_ms: u32::try_from(close_in.as_millis()).unwrap_or(u32::MAX),
        });
        // Ahead of any backlog: a client that is behind learns it first.
        let item = Outgoing::Encoded(codec::encode_server(frame, self.format));
        self.out_bytes += item.cost();
        self.out.push_front(item);
    }

    fn reply(&mut self, kind: server_frame::Kind) {
        if let server_frame::Kind::Nack(n) = &kind {
            let code = ErrorCode::try_from(n.code).unwrap_or(ErrorCode::Unspecified);
            self.node.metrics().refused(code);
        }
        let bytes = codec::encode_server(kind, self.format);
        self.queue(Outgoing::Encoded(bytes));
    }

    /// Queues `item` behind everything queued for this connection so far (in the outbox or
    /// taken from it), so answers keep the order of the requests and deliveries before them.
    fn queue(&mut self, item: Outgoing) {
        if self.outbox.is_empty() {
            self.out_bytes += item.cost();
            self.out.push_back(item);
        } else {
            self.outbox.push_replay(item);
        }
    }

    /// Moves what the outbox holds to the writer.
    pub fn take_outbox(&mut self, rx: &mut OutboxReceiver) {
        self.out_bytes += rx.drain(&mut self.out);
    }

    /// What waits to be written: taken from the outbox, and replays still in it. Live
    /// messages in the outbox are bounded by its limits instead.
    pub fn backlog(&self) -> usize {
        self.out_bytes + self.outbox.replay_bytes()
    }

    /// Whether anything waits to be sent.
    pub fn has_output(&self) -> bool {
        self.ping || !self.out.is_empty()
    }

    fn error(&mut self, request_id: u32, code: ErrorCode, reason: String, channel: String) {
        self.reply(server_frame::Kind::Error(client::Error {
            request_id,
            code: code as i32,
            reason,
            channel,
        }));
    }

    fn handle(&mut self, kind: client_frame::Kind) -> Result<(), End> {
        use client_frame::Kind;
        let Some(client_id) = self.client_id.clone() else {
            return match kind {
                Kind::Connect(c) => self.connect(c),
                _ => Err(End::Close(close::PROTOCOL_VIOLATION, "send Connect first".into())),
            };
        };
        match kind {
            Kind::Connect(_) => self.error(
                0,
                ErrorCode::AlreadyConnected,
                "this connection already sent Connect".into(),
                String::new(),
            ),
            Kind::Subscribe(s) => self.subscribe(s),
            Kind::Unsubscribe(u) => self.unsubscribe(u),
            Kind::Publish(p) => self.publish(p, &client_id),
            Kind::Heartbeat(h) => self.reply(server_frame::Kind::Heartbeat(h)),
            Kind::History(h) => self.history(h),
            Kind::Auth(a) => self.renew(a, &client_id),
            Kind::Presence(p) => self.presence(p, &client_id),
        }
        Ok(())
    }

    fn connect(&mut self, c: client::Connect) -> Result<(), End> {
        // Who is asking first (4003), then what they ask.
        let verifier = &self.node.settings().auth;
        let claims = if verifier.mode() == crate::auth::AuthMode::Token {
            let token = if c.token.is_empty() {
                self.url_token.clone().unwrap_or_default()
            } else {
                c.token.clone()
            };
            let claims = verifier
                .verify(&token)
                .map_err(|e| End::Close(close::UNAUTHORIZED, e.to_string()))?;
            Some(claims)
        } else {
            None
        };
        if c.protocol > tern_proto::PROTOCOL_VERSION {
            self.error(
                0,
                ErrorCode::Unsupported,
                format!("protocol {} is not supported; this node speaks 1", c.protocol),
                String::new(),
            );
            return Ok(());
        }
        let client_id = if let Some(claims) = claims {
            self.url_token = None;
            self.expires = Some(Instant::now() + claims.remaining(verifier.leeway()));
            let sub = claims.sub.clone();
            self.claims = Some(claims);
            sub
        } else if c.client_id.is_empty() {
            format!("anon-{}", self.id)
        } else {
            c.client_id
        };
        if self.claims.is_none() && client_id.starts_with(crate::auth::API_KEY_PREFIX) {
            // Only an API key's messages carry `key:ID`.
            let reason = format!(
                "client id: {:?} starts the client id of an API key",
                crate::auth::API_KEY_PREFIX
            );
            self.error(0, ErrorCode::InvalidArgument, reason, String::new());
            return Ok(());
        }
        if let Err(reason) = tern_proto::types::check_message_id(&client_id) {
            self.error(
                0,
                ErrorCode::InvalidArgument,
                format!("client id: {reason}"),
                String::new(),
            );
            return Ok(());
        }
        let settings = self.node.settings();
        let cfg = &settings.config;
        let connected = Connected {
            connection_id: self.id.to_string(),
            node: settings.node.to_string(),
            region: settings.region.to_string(),
            heartbeat_interval_ms: cfg.heartbeat.interval.as_millis() as u32,
            idle_timeout_ms: cfg.heartbeat.idle_timeout.as_millis() as u32,
            limits: Some(Limits {
                max_message_bytes: cfg.limits.max_message_bytes as u32,
                max_frame_bytes: cfg.limits.max_frame_bytes as u32,
                max_channels: cfg.limits.max_channels_per_connection as u32,
                send_queue: cfg.limits.send_queue_messages as u32,
                publish_rate: cfg.limits.publish_rate,
                publish_burst: cfg.limits.publish_burst,
                frame_rate: cfg.limits.frame_rate,
                frame_burst: cfg.limits.frame_burst,
                namespaces: cfg
                    .limits
                    .namespaces
                    .iter()
                    .map(|n| client::NamespaceLimits {
                        namespace: n.name.clone(),
                        publish_rate: n.publish_rate.unwrap_or(0),
                        publish_burst: n.publish_burst.or(n.publish_rate).unwrap_or(0),
                        max_message_bytes: n.max_message_bytes.map_or(0, |m| m as u32),
                    })
                    .collect(),
            }),
            client_id: client_id.clone(),
            protocol: tern_proto::PROTOCOL_VERSION,
            resume_window_ms: u32::try_from(cfg.resume.window.as_millis()).unwrap_or(u32::MAX),
        };
        if !c.recover.is_empty() {
            // The members of this client's ended connection, if they still linger.
            if let Some((member_id, channels)) =
                self.node.presence().recover(&client_id, &c.recover)
            {
                // Members of channels this connection's token does not allow leave now.
                let key = tern_backbone::core::MemberKey {
                    client_id: client_id.clone(),
                    connection_id: member_id.clone(),
                };
                let backbone = self.node.hub().backbone();
                for channel in channels {
                    if self.allowed(crate::auth::Operation::Presence, channel.as_str()) {
                        self.present.insert(channel);
                    } else {
                        self.node.presence().leave(backbone, &channel, &key);
                    }
                }
                self.member_id = member_id;
            }
        }
        self.client_id = Some(client_id);
        self.reply(server_frame::Kind::Connected(connected));
        Ok(())
    }

    /// Replaces the token in force (see `Auth` in the protocol).
    fn renew(&mut self, a: client::Auth, client_id: &str) {
        let verifier = &self.node.settings().auth;
        if verifier.mode() == crate::auth::AuthMode::Dev {
            let renewed = client::AuthRenewed {
                request_id: a.request_id,
                client_id: client_id.to_owned(),
                expires_at_ms: 0,
            };
            return self.reply(server_frame::Kind::AuthRenewed(renewed));
        }
        let claims = match verifier.verify(&a.token) {
            Ok(c) => c,
            Err(e) => {
                return self.error(
                    a.request_id,
                    ErrorCode::Unauthorized,
                    e.to_string(),
                    String::new(),
                );
            }
        };
        if claims.sub != client_id {
            let reason =
                format!("the new token names {:?}, this connection is {client_id:?}", claims.sub);
            return self.error(a.request_id, ErrorCode::InvalidArgument, reason, String::new());
        }
        self.expires = Some(Instant::now() + claims.remaining(verifier.leeway()));
        let renewed = client::AuthRenewed {
            request_id: a.request_id,
            client_id: client_id.to_owned(),
            expires_at_ms: claims.exp.saturating_mul(1000),
        };
        self.claims = Some(claims);
        self.reply(server_frame::Kind::AuthRenewed(renewed));
        // Subscriptions the new token no longer allows end here, each with a FORBIDDEN
        // error for its channel (queued behind the channel's last delivery).
        let revoked: Vec<ChannelName> = self
            .channels
            .iter()
            .filter(|c| !self.allowed(crate::auth::Operation::Subscribe, c.as_str()))
            .cloned()
            .collect();
        for channel in revoked {
            self.channels.remove(&channel);
            if self.watching.remove(&channel) {
                self.node.presence().unwatch(&channel, self.id);
            }
            self.catchups.retain(|c| c.channel != channel);
            let error = server_frame::Kind::Error(client::Error {
                request_id: 0,
                code: ErrorCode::Forbidden as i32,
                reason: format!(
                    "the renewed token does not allow subscribe on {channel}: unsubscribed"
                ),
                channel: channel.to_string(),
            });
            self.node.hub().unsubscribe(&channel, self.id, Some(Outgoing::Frame(Box::new(error))));
        }
        // Presence the new token no longer allows: its watches end, its members leave, each
        // with a FORBIDDEN error for the channel.
        let unwatched: Vec<ChannelName> =
            self.watching.iter().filter(|c| !self.reads_presence(c.as_str())).cloned().collect();
        for channel in unwatched {
            self.watching.remove(&channel);
            self.node.presence().unwatch(&channel, self.id);
            let reason = format!(
                "the renewed token does not allow reading presence on {channel}: its events end"
            );
            self.error(0, ErrorCode::Forbidden, reason, channel.to_string());
        }
        let left: Vec<ChannelName> = self
            .present
            .iter()
            .filter(|c| !self.allowed(crate::auth::Operation::Presence, c.as_str()))
            .cloned()
            .collect();
        let key = tern_backbone::core::MemberKey {
            client_id: client_id.to_owned(),
            connection_id: self.member_id.clone(),
        };
        for channel in left {
            self.present.remove(&channel);
            self.node.presence().leave(self.node.hub().backbone(), &channel, &key);
            let reason =
                format!("the renewed token does not allow presence on {channel}: the member left");
            self.error(0, ErrorCode::Forbidden, reason, channel.to_string());
        }
    }

    /// Whether the connection's token allows `op` on `channel` (always, in dev mode).
    fn allowed(&self, op: crate::auth::Operation, channel: &str) -> bool {
        self.claims.as_ref().is_none_or(|c| c.allows(op, channel))
    }

    fn forbidden(op: crate::auth::Operation, channel: &str) -> String {
        format!("the token does not allow {op:?} on {channel}").to_lowercase()
    }

    fn subscribe(&mut self, s: client::Subscribe) {
        use crate::auth::Operation;
        // A malformed name is INVALID_CHANNEL whatever the token allows.
        let channel = match ChannelName::parse(&s.channel) {
            Ok(c) => c,
            Err(e) => {
                return self.error(
                    s.request_id,
                    ErrorCode::InvalidChannel,
                    e.to_string(),
                    s.channel,
                );
            }
        };
        if let Some(r) = &s.resume {
            if let Err(reason) = crate::resume::check_vector(&r.origins) {
                return self.error(s.request_id, ErrorCode::InvalidArgument, reason, s.channel);
            }
        }
        if !self.allowed(Operation::Subscribe, &s.channel) {
            let reason = Self::forbidden(Operation::Subscribe, &s.channel);
            return self.error(s.request_id, ErrorCode::Forbidden, reason, s.channel);
        }
        if s.presence && !self.reads_presence(&s.channel) {
            let reason = Self::forbidden(Operation::Presence, &s.channel);
            return self.error(s.request_id, ErrorCode::Forbidden, reason, s.channel);
        }
        let max = self.cfg().limits.max_channels_per_connection;
        if !self.channels.contains(&channel) && self.channels.len() >= max {
            return self.error(
                s.request_id,
                ErrorCode::TooManyChannels,
                format!("this connection is subscribed to {max} channels, the limit"),
                s.channel,
            );
        }
        if !self.node.hub().admits(channel.as_str()) {
            let max = self.cfg().limits.max_channels;
            let reason = format!("the node holds its limit of {max} channels");
            return self.error(s.request_id, ErrorCode::TooManyChannels, reason, s.channel);
        }
        if self.catchups.iter().any(|c| c.channel == channel) {
            return self.error(
                s.request_id,
                ErrorCode::InvalidArgument,
                "this channel is still being resumed on this connection".into(),
                s.channel,
            );
        }
        let hub = self.node.hub();
        let subscribed = match s.resume {
            Some(resume) => {
                let r = &self.cfg().resume;
                let (window, max_scan) = (r.window, r.max_scan);
                match hub.resume(
                    &channel,
                    self.id,
                    self.outbox.clone(),
                    s.request_id,
                    resume,
                    window,
                    max_scan,
                ) {
                    crate::channel::Resumed::Done => None,
                    crate::channel::Resumed::Catchup(mut catchup, subscribed) => {
                        catchup.id = self.next_catchup;
                        self.next_catchup += 1;
                        self.catchups.push_back(*catchup);
                        Some(subscribed)
                    }
                }
            }
            None => {
                hub.subscribe(&channel, self.id, self.outbox.clone(), s.request_id, s.rewind);
                None
            }
        };
        if s.presence {
            let budget = self.presence_budget(&channel);
            let page = self.cfg().presence.page_size;
            let backbone = hub.backbone();
            let presence = self.node.presence();
            presence.watch(backbone, &channel, self.id, &self.outbox, s.request_id, (page, budget));
            self.watching.insert(channel.clone());
        } else if self.watching.remove(&channel) {
            self.node.presence().unwatch(&channel, self.id);
        }
        self.channels.insert(channel);
        // `None`: the hub queued `Subscribed` itself, under the channel's lock.
        if let Some(subscribed) = subscribed {
            self.reply(server_frame::Kind::Subscribed(subscribed));
        }
    }

    /// The next replay step of the first catch-up, if there is one.
    pub fn start_step(&self) -> Option<StepFuture> {
        let c = self.catchups.front()?.clone();
        let store = self.node.hub().store()?.clone();
        let r = &self.cfg().resume;
        let page = crate::resume::PageSize { messages: r.page, bytes: r.page_bytes };
        let tracker = self.node.tracker().clone();
        let mut committed = self.committed.clone();
        let node = self.node.clone();
        Some(Box::pin(async move {
            let id = c.id;
            let wait = async {
                if let Some(w) = committed.as_mut() {
                    while *w.borrow_and_update() < c.wait_ticket {
                        if w.changed().await.is_err() {
                            break;
                        }
                    }
                }
            };
            let timed_out = tokio::time::timeout(LOG_WAIT, wait).await.is_err();
            // Replay steps share the node's history-read permits with history requests, but
            // wait for them instead of failing: a resume is never refused for load.
            let permit = node.history_read_wait(2 * page.bytes).await;
            let result = tracker
                .spawn_blocking(move || {
                    let _permit = permit;
                    crate::resume::step(&store, &c, page)
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            (id, timed_out, result)
        }))
    }

    /// Applies a replay step: queues its messages (written before anything the outbox
    /// holds for later), and makes the subscription live once the replay reached the
    /// channel's in-memory tail.
    pub fn on_step(&mut self, id: u64, timed_out: bool, result: Result<Step, String>) {
        let Some(c) = self.catchups.front_mut().filter(|c| c.id == id) else { return };
        let (forward, force) = match result {
            Ok(step) => {
                let forward = !step.scanned;
                c.found = true;
                c.started = forward;
                if step.scanned {
                    c.verify_at = None;
                }
                c.next = step.next;
                // The replay read what the log holds, which may run ahead of what the
                // channel delivered yet (written, not yet released): the client's vector now
                // covers it, so the live stream skips it (see `Hub::finish_catchup`).
                for m in &step.messages {
                    let m = m.message();
                    match c.vector.iter_mut().find(|p| p.origin == m.origin) {
                        Some(p) if (m.origin_epoch, m.origin_seq) > (p.epoch, p.seq) => {
                            (p.epoch, p.seq) = (m.origin_epoch, m.origin_seq);
                        }
                        Some(_) => {}
                        None => c.vector.push(client::OriginPosition {
                            origin: m.origin.clone(),
                            epoch: m.origin_epoch,
                            seq: m.origin_seq,
                        }),
                    }
                }
                if let Some(d) = step.discontinuity {
                    self.reply(server_frame::Kind::Discontinuity(d));
                }
                for m in step.messages {
                    self.queue(Outgoing::Message(m));
                }
                (forward && step.at_end, timed_out)
            }
            Err(e) => {
                let d = client::Discontinuity {
                    channel: c.channel.to_string(),
                    reason: format!("replay failed: {e}"),
                    origins: Vec::new(),
                };
                self.reply(server_frame::Kind::Discontinuity(d));
                (true, true)
            }
        };
        if !forward {
            return;
        }
        let Some(c) = self.catchups.front_mut() else { return };
        let hub = self.node.hub();
        if hub.finish_catchup(&c.channel, self.id, &self.outbox, c.next, &c.vector, force) {
            self.catchups.pop_front();
        } else {
            // The log is behind the live tail: read on once it caught up.
            c.wait_ticket = hub.store().map_or(0, |s| s.last_ticket());
        }
    }

    fn unsubscribe(&mut self, u: client::Unsubscribe) {
        let channel = match ChannelName::parse(&u.channel) {
            Ok(c) => c,
            Err(e) => {
                return self.error(
                    u.request_id,
                    ErrorCode::InvalidChannel,
                    e.to_string(),
                    u.channel,
                );
            }
        };
        let done = server_frame::Kind::Unsubscribed(Unsubscribed {
            request_id: u.request_id,
            channel: u.channel,
        });
        // No presence event after `Unsubscribed`.
        if self.watching.remove(&channel) {
            self.node.presence().unwatch(&channel, self.id);
        }
        if let Some(i) = self.catchups.iter().position(|c| c.channel == channel) {
            // Not live yet: nothing of it is queued.
            self.catchups.remove(i);
            self.channels.remove(&channel);
            self.node.hub().unsubscribe(&channel, self.id, None);
            self.reply(done);
        } else if self.channels.remove(&channel) {
            // Queued behind the channel's last delivery to this connection.
            self.node.hub().unsubscribe(&channel, self.id, Some(Outgoing::Frame(Box::new(done))));
        } else {
            self.reply(done);
        }
    }

    fn publish(&mut self, p: client::Publish, client_id: &str) {
        let (request_id, channel, id) = (p.request_id, p.channel.clone(), p.id.clone());
        let nack = |code: ErrorCode, reason: String, retry_after_ms: u32| Nack {
            request_id,
            channel: channel.clone(),
            message_id: id.clone(),
            code: code as i32,
            reason,
            retry_after_ms,
        };
        // The one order of checks (see `publish::check`): the request, then the token's
        // capabilities, then what this node supports, then the rate.
        if let Err(e) = publish::check(&self.node, &p) {
            return self.refuse(nack(e.code(), e.to_string(), 0));
        }
        if !self.allowed(crate::auth::Operation::Publish, &channel) {
            let reason = Self::forbidden(crate::auth::Operation::Publish, &channel);
            return self.refuse(nack(ErrorCode::Forbidden, reason, 0));
        }
        if let Err(e) = publish::supported(&self.node, p.durability) {
            return self.refuse(nack(e.code(), e.to_string(), 0));
        }
        if let Err(wait) = self.take_publish(&channel) {
            let rate = self.publish_rate(&channel);
            let reason = format!("more than {rate} publishes/s; retry after {wait:?}");
            let retry = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1);
            return self.refuse(nack(ErrorCode::RateLimited, reason, retry));
        }
        // An earlier publish of this channel was refused for its order: later ones wait for
        // its retry (or `publish_order_wait`), or they would overtake it.
        let now = Instant::now();
        self.order_blocks.retain(|b| b.until > now);
        if let Some(i) = self.order_blocks.iter().position(|b| b.channel == channel) {
            if self.order_blocks[i].id == id {
                self.order_blocks.swap_remove(i); // the retry: the channel goes on
            } else {
                let reason = format!(
                    "an earlier publish on this channel ({:?}) was refused for its order; \
                     retry it first",
                    self.order_blocks[i].id
                );
                return self.refuse(nack(ErrorCode::Unavailable, reason, 1000));
            }
        }
        // A publisher that moved here: its earlier messages come first (see
        // `crate::channel::order`). Behind a parked publish, wait too (acks keep order).
        let mut probe = None;
        let ready = match p.after.clone() {
            _ if !self.parked.is_empty() => None,
            Some(a) => match self.order_ready(&channel, &a, &mut probe) {
                OrderReady::Ready(verified) => Some(verified),
                OrderReady::Wait(_) => None,
            },
            None => Some(None),
        };
        if let Some(verified) = ready {
            self.node.hub().forget_probe_opt(probe);
            return self.sequence(p, client_id, verified);
        }
        if self.parked.len() >= PARKED_MAX {
            self.node.hub().forget_probe_opt(probe);
            let reason = format!("{PARKED_MAX} publishes already wait for their order");
            return self.refuse_parked(p, reason, false);
        }
        let deadline = Instant::now() + self.cfg().limits.publish_order_wait;
        self.parked.push_back(Parked { publish: p, deadline, probe, refused: None });
    }

    /// Answers a publish with a refusal, in publish order: behind the parked publishes and
    /// the acks still waiting, if any.
    fn refuse(&mut self, nack: Nack) {
        // (Past twice the parked limit a flood is answered at once, order or not.)
        if !self.parked.is_empty() && self.parked.len() < 2 * PARKED_MAX {
            let publish = client::Publish::default();
            let deadline = Instant::now();
            self.parked.push_back(Parked { publish, deadline, probe: None, refused: Some(nack) });
        } else if !self.acks.is_empty() {
            let ack = client::Ack::default();
            self.acks.push_back(PendingAck {
                queued: Instant::now(),
                ticket: 0,
                replicated: None,
                ack,
                refused: Some(nack),
            });
        } else {
            self.reply(server_frame::Kind::Nack(nack));
        }
    }

    /// Publishes a validated publish that may be sequenced now (carrying `after`, see
    /// `crate::channel::order`), and queues its ack.
    fn sequence(
        &mut self,
        p: client::Publish,
        client_id: &str,
        after: Option<client::OriginPosition>,
    ) {
        let (request_id, channel) = (p.request_id, p.channel.clone());
        let replicated = p.durability == client::Durability::Replicated as i32;
        let req = PublishRequest {
            channel: p.channel,
            id: p.id.clone(),
            name: p.name,
            data: p.data,
            after,
        };
        match publish::publish(&self.node, req, client_id) {
            Ok(a) => {
                // The ack waits until the message is in the history log, if it goes there,
                // and in another region if asked; acks leave in publish order.
                let wait = (replicated && a.own)
                    .then(|| (channel.clone(), a.seq.0, Instant::now() + REPLICATION_WAIT));
                self.acks.push_back(PendingAck {
                    queued: Instant::now(),
                    ticket: a.log_ticket.unwrap_or(0),
                    replicated: wait,
                    ack: a.into_ack(request_id, channel),
                    refused: None,
                });
                self.flush_acks();
            }
            Err(e) => self.refuse(Nack {
                request_id,
                channel,
                message_id: p.id,
                code: e.code() as i32,
                reason: e.to_string(),
                retry_after_ms: 0,
            }),
        }
    }

    /// Publishes the parked publishes that may go now, in order (acks keep publish order,
    /// so everything behind one still waiting waits too); refuses with `UNAVAILABLE` those
    /// that waited `limits.publish_order_wait`, and the later ones of their channel, which
    /// must not overtake them.
    pub fn retry_parked(&mut self) {
        let Some(client_id) = self.client_id.clone() else { return };
        let now = Instant::now();
        while let Some(w) = self.parked.pop_front() {
            if let Some(nack) = w.refused {
                // A refusal queued behind earlier parked publishes: its turn now.
                self.acks.push_back(PendingAck {
                    queued: Instant::now(),
                    ticket: 0,
                    replicated: None,
                    ack: client::Ack::default(),
                    refused: Some(nack),
                });
                self.flush_acks();
                continue;
            }
            let channel = w.publish.channel.clone();
            if self.order_blocks.iter().any(|b| b.channel == channel && b.id != w.publish.id) {
                self.node.hub().forget_probe_opt(w.probe);
                let reason = "an earlier publish on this channel was refused for its order; \
                              retry it first"
                    .to_owned();
                self.refuse_parked(w.publish, reason, true);
                continue;
            }
            let mut probe = w.probe;
            let ready = match w.publish.after.clone() {
                Some(a) => self.order_ready(&channel, &a, &mut probe),
                None => OrderReady::Ready(None),
            };
            match ready {
                OrderReady::Ready(verified) => {
                    self.node.hub().forget_probe_opt(probe);
                    self.sequence(w.publish, &client_id, verified);
                }
                OrderReady::Wait(reason) if now >= w.deadline => {
                    self.node.hub().forget_probe_opt(probe);
                    self.refuse_parked(w.publish, reason, true);
                }
                OrderReady::Wait(_) => {
                    self.parked.push_front(Parked { probe, ..w });
                    break;
                }
            }
        }
    }

    /// [`crate::channel::Hub::order_ready`] for this connection: a (channel, origin) it
    /// already ordered after carries the head it waited for then, without asking again
    /// (the publish that asked may have been a duplicate, so every later one naming that
    /// origin carries it); one newly ordered is remembered.
    fn order_ready(
        &mut self,
        channel: &str,
        after: &client::OriginPosition,
        probe: &mut Option<u64>,
    ) -> OrderReady {
        let synced = self.synced.iter().find(|(c, h)| c == channel && h.origin == after.origin);
        if let Some((_, head)) = synced {
            return OrderReady::Ready((head.seq > 0).then(|| head.clone()));
        }
        let ready = self.node.hub().order_ready(channel, after, probe);
        if let OrderReady::Ready(verified) = &ready {
            if probe.is_some() {
                if self.synced.len() >= SYNCED_MAX {
                    self.synced.clear();
                }
                let head = verified.clone().unwrap_or_else(|| client::OriginPosition {
                    origin: after.origin.clone(),
                    ..Default::default()
                });
                self.synced.push((channel.to_owned(), head));
            }
        }
        ready
    }

    /// Refuses a parked publish with `UNAVAILABLE`, after the acks of earlier publishes;
    /// later publishes of its channel are refused too until it is retried (or
    /// `publish_order_wait` passed), so none overtakes it.
    /// `in_turn`: it is the parked publish whose turn it is (else a new one, answered behind
    /// whatever waits).
    fn refuse_parked(&mut self, p: client::Publish, reason: String, in_turn: bool) {
        let wait = self.cfg().limits.publish_order_wait;
        if !self.order_blocks.iter().any(|b| b.channel == p.channel) {
            if self.order_blocks.len() >= ORDER_BLOCKS_MAX {
                self.order_blocks.remove(0);
            }
            let until = Instant::now() + wait;
            self.order_blocks.push(OrderBlock {
                channel: p.channel.clone(),
                id: p.id.clone(),
                until,
            });
        }
        let nack = Nack {
            request_id: p.request_id,
            channel: p.channel,
            message_id: p.id,
            code: ErrorCode::Unavailable as i32,
            reason: format!("not sequenced within {wait:?}: {reason}; retry with the same id"),
            retry_after_ms: 1000,
        };
        if in_turn {
            let ack = client::Ack::default();
            self.acks.push_back(PendingAck {
                queued: Instant::now(),
                ticket: 0,
                replicated: None,
                ack,
                refused: Some(nack),
            });
            self.flush_acks();
        } else {
            self.refuse(nack);
        }
    }

    /// Takes a publish token for `channel` (its namespace's bucket, if it has its own rate).
    fn take_publish(&mut self, channel: &str) -> Result<(), Duration> {
        let now = std::time::Instant::now();
        let limits = &self.node.settings().config.limits;
        let own = limits.namespace_index(channel).and_then(|i| {
            let ns = &limits.namespaces[i];
            Some((i, TokenBucket::new(ns.publish_rate?, ns.publish_burst.or(ns.publish_rate)?)))
        });
        let Some((i, fresh)) = own else { return self.publishes.take(now) };
        let at = match self.namespace_publishes.iter().position(|(n, _)| *n == i) {
            Some(at) => at,
            None => {
                self.namespace_publishes.push((i, fresh));
                self.namespace_publishes.len() - 1
            }
        };
        self.namespace_publishes[at].1.take(now)
    }

    /// The publish rate that applies to `channel`.
    fn publish_rate(&self, channel: &str) -> u32 {
        let limits = &self.cfg().limits;
        limits.namespace(channel).and_then(|n| n.publish_rate).unwrap_or(limits.publish_rate)
    }

    /// A history page: read off the session task (the page follows in the outbox, in order
    /// with deliveries queued after the request).
    fn history(&mut self, h: client::HistoryRequest) {
        if let Err(e) = ChannelName::validate(&h.channel) {
            return self.error(h.request_id, ErrorCode::InvalidChannel, e.to_string(), h.channel);
        }
        let limit = if h.limit == 0 { 100 } else { h.limit as usize };
        if limit > crate::http::MAX_HISTORY_PAGE {
            let reason = format!("limit must be at most {}", crate::http::MAX_HISTORY_PAGE);
            return self.error(h.request_id, ErrorCode::InvalidArgument, reason, h.channel);
        }
        if !self.allowed(crate::auth::Operation::History, &h.channel) {
            let reason = Self::forbidden(crate::auth::Operation::History, &h.channel);
            return self.error(h.request_id, ErrorCode::Forbidden, reason, h.channel);
        }
        let Some(store) = self.node.hub().store().filter(|s| s.keeps(&h.channel)).cloned() else {
            let reason = "history is not kept for this channel's namespace".to_owned();
            return self.error(h.request_id, ErrorCode::Unsupported, reason, h.channel);
        };
        let backwards = !h.forwards;
        let query = crate::store::Query {
            from: h.from,
            to: h.to,
            since_ms: (h.since_ms > 0).then_some(h.since_ms),
            until_ms: (h.until_ms > 0).then_some(h.until_ms),
            limit,
            max_bytes: usize::MAX,
            max_scan: crate::store::PAGE_SCAN_MAX,
            backwards,
        };
        let per_connection = self.cfg().limits.history_reads_per_connection;
        if self.history_reads.load(std::sync::atomic::Ordering::Relaxed) >= per_connection {
            let reason = format!("{per_connection} history reads in flight on this connection");
            return self.error(h.request_id, ErrorCode::RateLimited, reason, h.channel);
        }
        let l = &self.cfg().limits;
        let frame_budget = history_page_budget(l.max_frame_bytes, &h.channel);
        let page_bytes = frame_budget.min(l.history_page_bytes);
        // The page's messages and its frame.
        let Some(permit) = self.node.history_read(2 * page_bytes) else {
            let reason = "the node is serving its limit of history reads; retry shortly".into();
            return self.error(h.request_id, ErrorCode::RateLimited, reason, h.channel);
        };
        let in_flight = self.history_reads.clone();
        in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let crate::node::ReadPermit { count: permit, bytes } = permit;
        let slot = ReadSlot { in_flight, _bytes: bytes };
        let outbox = self.outbox.clone();
        let format = self.format;
        let query = crate::store::Query { max_bytes: page_bytes, ..query };
        self.node.tracker().spawn_blocking(move || {
            let read = store.page(&h.channel, query);
            drop(permit);
            let frame = match read {
                Ok(page) => server_frame::Kind::History(history_page(
                    page,
                    h.request_id,
                    h.channel,
                    format,
                    frame_budget,
                )),
                Err(e) => server_frame::Kind::Error(client::Error {
                    request_id: h.request_id,
                    code: ErrorCode::Internal as i32,
                    reason: e.to_string(),
                    channel: h.channel,
                }),
            };
            let keep = crate::fanout::Held(Box::new(slot));
            outbox.push_replay(Outgoing::Held(Box::new((frame, keep))));
        });
    }

    /// Sends the acks whose messages are durable enough, in order; a replicated publish
    /// that no other region acknowledged in time is answered with `NOT_REPLICATED`, one
    /// whose log write failed with `INTERNAL`.
    pub fn flush_acks(&mut self) {
        let logged = self.committed.as_ref().map_or(u64::MAX, |c| *c.borrow());
        let now = Instant::now();
        while let Some(front) = self.acks.front() {
            let waiting = front.ticket > logged;
            if waiting && now < front.queued + LOG_WAIT {
                break;
            }
            let unlogged =
                front.ticket > 0 && self.node.hub().store().is_some_and(|s| s.failed(front.ticket));
            let refusal = match &front.replicated {
                _ if waiting => Some((
                    ErrorCode::Internal,
                    format!("delivered, but not confirmed in the history log within {LOG_WAIT:?}"),
                )),
                _ if unlogged => Some((
                    ErrorCode::Internal,
                    "delivered, but the history log could not be written".to_owned(),
                )),
                None => None,
                Some((ch, seq, _)) if self.node.hub().is_replicated(ch, *seq) => None,
                Some((_, _, deadline)) if now >= *deadline => Some((
                    ErrorCode::NotReplicated,
                    format!(
                        "no other region acknowledged the message within {REPLICATION_WAIT:?}; \
                         it was delivered here and is replicated once a region is reachable"
                    ),
                )),
                Some(_) => break,
            };
            let Some(done) = self.acks.pop_front() else { break };
            if let Some(nack) = done.refused {
                self.reply(server_frame::Kind::Nack(nack));
                continue;
            }
            if done.ticket > 0 {
                // An ack says the message went out: a subscriber the publisher tells after
                // its ack finds it in the channel (the release task may not have run yet).
                self.node.hub().release_channel(&done.ack.channel, logged);
            }
            if refusal.is_none() {
                let after = now.saturating_duration_since(done.queued);
                self.node.metrics().acked(done.replicated.is_some(), after);
            }
            let frame = match refusal {
                None => server_frame::Kind::Ack(done.ack),
                Some((code, reason)) => server_frame::Kind::Nack(Nack {
                    request_id: done.ack.request_id,
                    channel: done.ack.channel,
                    message_id: done.ack.message_id,
                    code: code as i32,
                    reason,
                    retry_after_ms: 0,
                }),
            };
            self.reply(frame);
        }
    }

    /// Leaves every channel and forgets every question asked for this connection (also on a
    /// panic, through `Drop`).
    pub fn leave_all(&mut self) {
        for w in std::mem::take(&mut self.parked) {
            self.node.hub().forget_probe_opt(w.probe);
        }
        for channel in self.watching.drain() {
            self.node.presence().unwatch(&channel, self.id);
        }
        for channel in self.channels.drain() {
            self.node.hub().unsubscribe(&channel, self.id, None);
        }
        // Its members stay for `presence.grace` (a reconnect can recover them).
        if let Some(client_id) = self.client_id.clone() {
            let channels: Vec<ChannelName> = self.present.drain().collect();
            let grace = self.cfg().presence.grace.min(self.cfg().resume.window);
            let member_id = std::mem::take(&mut self.member_id);
            let node = self.node.clone();
            node.presence().linger(&node, client_id, self.id, member_id, channels, grace);
        }
    }

    /// Whether the connection may read `channel`'s presence: with `presence`, or with
    /// `subscribe` on a namespace listed in `presence.subscribe_reads`.
    fn reads_presence(&self, channel: &str) -> bool {
        use crate::auth::Operation;
        self.allowed(Operation::Presence, channel)
            || (self.allowed(Operation::Subscribe, channel)
                && self.cfg().presence.subscribe_reads(channel))
    }

    /// Bytes of members a presence page of `channel` may hold in one frame.
    fn presence_budget(&self, channel: &ChannelName) -> usize {
        const FRAME_FIELDS: usize = 256;
        self.cfg().limits.max_frame_bytes.saturating_sub(FRAME_FIELDS + channel.as_str().len())
    }

    /// A presence request: enter, update, leave or get.
    fn presence(&mut self, p: client::PresenceRequest, client_id: &str) {
        use crate::auth::Operation;
        use client::PresenceAction;
        let (request_id, name) = (p.request_id, p.channel.clone());
        let channel = match ChannelName::parse(&p.channel) {
            Ok(c) => c,
            Err(e) => {
                return self.error(request_id, ErrorCode::InvalidChannel, e.to_string(), name);
            }
        };
        let action = match PresenceAction::try_from(p.action) {
            Ok(a) if a != PresenceAction::Unspecified => a,
            _ => {
                let reason = "action: ENTER, UPDATE, LEAVE or GET".to_owned();
                return self.error(request_id, ErrorCode::InvalidArgument, reason, name);
            }
        };
        let cfg = &self.node.settings().config.presence;
        let data = crate::presence::data_to_bytes(p.data);
        let data_len = data.len().saturating_sub(1);
        if data_len > cfg.max_data_bytes {
            let reason = format!(
                "presence data is {data_len} bytes; the limit is {} (presence.max_data_bytes)",
                cfg.max_data_bytes
            );
            return self.error(request_id, ErrorCode::MessageTooLarge, reason, name);
        }
        let allowed = match action {
            PresenceAction::Get => self.reads_presence(&name),
            _ => self.allowed(Operation::Presence, &name),
        };
        if !allowed {
            let reason = Self::forbidden(Operation::Presence, &name);
            return self.error(request_id, ErrorCode::Forbidden, reason, name);
        }
        // The connection's limits, then its rate (the order of "Error codes").
        let max = cfg.max_channels_per_connection;
        let entering = matches!(action, PresenceAction::Enter | PresenceAction::Update);
        if entering && !self.present.contains(&channel) && self.present.len() >= max {
            let reason = format!(
                "this connection is a member of {max} channels, the limit \
                 (presence.max_channels_per_connection)"
            );
            return self.error(request_id, ErrorCode::TooManyChannels, reason, name);
        }
        if self.presence_ops.take(std::time::Instant::now()).is_err() {
            let reason = format!(
                "more than {} presence requests/s (burst {}; presence.rate)",
                cfg.rate, cfg.burst
            );
            return self.error(request_id, ErrorCode::RateLimited, reason, name);
        }
        let presence = self.node.presence().clone();
        let backbone = self.node.hub().backbone();
        let key = tern_backbone::core::MemberKey {
            client_id: client_id.to_owned(),
            connection_id: self.member_id.clone(),
        };
        let mut reply =
            client::PresenceReply { request_id, channel: name.clone(), ..Default::default() };
        match action {
            PresenceAction::Enter | PresenceAction::Update => {
                if let Err(crate::presence::Refused::Full(n)) =
                    presence.put(backbone, &channel, key, data, cfg.max_members)
                {
                    let reason = format!(
                        "the channel's presence set holds {n} members, the limit \
                         (presence.max_members)"
                    );
                    return self.error(request_id, ErrorCode::ChannelFull, reason, name);
                }
                self.present.insert(channel);
            }
            PresenceAction::Leave => {
                presence.leave(backbone, &channel, &key);
                self.present.remove(&channel);
            }
            PresenceAction::Get | PresenceAction::Unspecified => {
                let page = cfg.page_size;
                let limit = if p.limit == 0 { page } else { (p.limit as usize).min(page) };
                let budget = self.presence_budget(&channel);
                match presence.get(backbone, &channel, &p.after, limit, budget) {
                    Ok((members, next)) => {
                        reply.members = members;
                        reply.next = next;
                    }
                    Err(reason) => {
                        return self.error(request_id, ErrorCode::InvalidArgument, reason, name);
                    }
                }
            }
        }
        self.reply(server_frame::Kind::PresenceReply(reply));
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.leave_all();
    }
}
