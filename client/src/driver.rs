//! The connection task: owns the connection (a WebSocket, or an HTTP session where one
//! cannot be opened), survives reconnects.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;

use tern_proto::client::{
    Ack, Connected, ErrorCode, Message, OriginPosition, Position, PresenceAction, PresenceMember,
    PresenceReply, PresenceRequest, Publish, Resume, Subscribe, Unsubscribe, client_frame,
    presence_request, server_frame,
};
use tern_proto::codec::Format;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, warn};

use crate::options::{ClientOptions, Transport};
use crate::presence::{MemberId, PresenceChange, PresenceWatch};
use crate::subscription::{Event, Subscription};
use crate::transport::{Failure, Link, Received};
use crate::{ClientError, ConnectionState};

/// Requests from [`crate::Client`] handles to the driver.
#[derive(Debug)]
pub enum Command {
    /// Subscribe to a channel.
    Subscribe {
        /// Channel name.
        channel: String,
        /// Recent messages to start with (only when this starts the channel's subscription
        /// on the connection).
        rewind: Option<tern_proto::client::Rewind>,
        /// Where the subscription goes.
        reply: oneshot::Sender<Result<Subscription, ClientError>>,
    },
    /// Publish; the request id is assigned by the driver.
    Publish {
        /// The frame.
        frame: Publish,
        /// Where the ack goes.
        reply: oneshot::Sender<Result<Ack, ClientError>>,
    },
    /// Read a page of a channel's history; the request id is assigned by the driver.
    History {
        /// The request.
        request: tern_proto::client::HistoryRequest,
        /// Where the page goes.
        reply: oneshot::Sender<Result<tern_proto::client::HistoryPage, ClientError>>,
    },
    /// A subscription was dropped.
    Drop {
        /// Its channel.
        channel: String,
        /// Its id.
        id: u64,
    },
    /// Replace the connection's token in-band (and for every reconnect after).
    Renew {
        /// The new token.
        token: String,
        /// Where the node's answer goes.
        reply: oneshot::Sender<Result<tern_proto::client::AuthRenewed, ClientError>>,
    },
    /// A presence request (enter, update, leave, get); the request id is assigned by the
    /// driver.
    Presence {
        /// The request.
        request: PresenceRequest,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<PresenceReply, ClientError>>,
    },
    /// Watch a channel's presence.
    Watch {
        /// Channel name.
        channel: String,
        /// Where the watch goes.
        reply: oneshot::Sender<Result<PresenceWatch, ClientError>>,
    },
    /// A presence watch was dropped.
    Unwatch {
        /// Its channel.
        channel: String,
        /// Its id.
        id: u64,
    },
    /// Close for good.
    Close {
        /// Signalled when closed.
        done: oneshot::Sender<()>,
    },
}

/// Normalises a base URL: `/v1/ws` is added when the path is empty, and the wire format
/// is selected with `?format=`.
pub fn normalize_url(url: &str, format: Format) -> Result<String, ClientError> {
    let url = url.trim();
    let (scheme, rest) =
        url.split_once("://").ok_or_else(|| ClientError::InvalidUrl(url.into()))?;
    let scheme = match scheme {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        _ => return Err(ClientError::InvalidUrl(url.into())),
    };
    let (rest, query) = rest.split_once('?').map_or((rest, None), |(r, q)| (r, Some(q)));
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| (&rest[..i], &rest[i..]));
    if authority.is_empty() {
        return Err(ClientError::InvalidUrl(url.into()));
    }
    let path = if path.is_empty() || path == "/" { "/v1/ws" } else { path };
    let fmt = match format {
        Format::Json => "json",
        Format::Protobuf => "proto",
    };
    let query = match query {
        Some(q) if q.split('&').any(|kv| kv.starts_with("format=")) => q.to_owned(),
        Some(q) if !q.is_empty() => format!("{q}&format={fmt}"),
        _ => format!("format={fmt}"),
    };
    Ok(format!("{scheme}://{authority}{path}?{query}"))
}

/// Per URL, which transport [`Transport::Auto`] tries first, and how often each failed in
/// a row.
#[derive(Debug, Default, Clone)]
struct Fallback {
    /// Index into [`AUTO`] of the transport that last worked, and since when (kept for
    /// [`Transport::FALLBACK_KEPT`]).
    level: usize,
    since: Option<Instant>,
    failures: [u32; 3],
}

/// What [`Transport::Auto`] tries, in order.
const AUTO: [Transport; 3] = [Transport::WebSocket, Transport::Stream, Transport::Poll];

impl Fallback {
    /// Where to start: the transport that worked, while kept; else the WebSocket.
    fn start(&mut self) -> usize {
        if self.since.is_none_or(|t| t.elapsed() >= Transport::FALLBACK_KEPT) {
            self.level = 0;
            self.since = None;
        }
        self.level
    }
}

/// Opens `url`: over the pinned transport, or for [`Transport::Auto`] over the first that
/// works of the WebSocket, HTTP streaming and long polling (see [`Transport::Auto`]; on the
/// first connection, a stall moves on at once, as the caller waits).
async fn open(
    url: &str,
    fallback: &mut Fallback,
    options: &ClientOptions,
    token: Option<&str>,
    recover: &str,
    first: bool,
) -> Result<(Link, Connected), ClientError> {
    if options.transport != Transport::Auto {
        let opened = crate::transport::open(url, options.transport, options, token, recover).await;
        return opened.map_err(|e| e.error);
    }
    let mut errors: Vec<(Transport, ClientError)> = Vec::new();
    for (i, &transport) in AUTO.iter().enumerate().skip(fallback.start()) {
        match crate::transport::open(url, transport, options, token, recover).await {
            Ok(opened) => {
                fallback.failures[i] = 0;
                if i > 0 && fallback.level != i {
                    warn!(%url, transport = transport.name(), "fell back from the WebSocket");
                }
                if i > 0 {
                    fallback.since.get_or_insert_with(Instant::now);
                }
                fallback.level = i;
                return Ok(opened);
            }
            Err(e) => {
                fallback.failures[i] += 1;
                let next = match e.kind {
                    Failure::Other => false,
                    Failure::Refused => true,
                    Failure::Stalled => first || fallback.failures[i] >= 2,
                };
                debug!(%url, transport = transport.name(), error = %e.error, next, "open failed");
                errors.push((transport, e.error));
                if !next {
                    break;
                }
            }
        }
    }
    if errors.len() == 1 {
        return Err(errors.remove(0).1);
    }
    let each: Vec<String> = errors.iter().map(|(t, e)| format!("{}: {e}", t.name())).collect();
    Err(ClientError::Connect(each.join("; ").into()))
}

/// Opens the first connection (to the first of `urls` that answers, in order) and starts
/// the driver. Later reconnects fail over along the same list.
pub(crate) async fn start(
    urls: &[String],
    options: Arc<ClientOptions>,
    transport: InUse,
) -> Result<(mpsc::Sender<Command>, watch::Receiver<ConnectionState>), ClientError> {
    let urls: Vec<String> =
        urls.iter().map(|u| normalize_url(u, options.format)).collect::<Result<_, _>>()?;
    let mut first = None;
    let mut last_err = ClientError::InvalidUrl("no URL given".into());
    let mut fallback = vec![Fallback::default(); urls.len()];
    for (i, url) in urls.iter().enumerate() {
        match open(url, &mut fallback[i], &options, options.token.as_deref(), "", true).await {
            Ok(c) => {
                first = Some((i, c));
                break;
            }
            Err(e) => last_err = e,
        }
    }
    let Some((current, (link, connected))) = first else { return Err(last_err) };
    *transport.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.transport());
    // Commands wait here while the driver writes; 256 bounds a burst of API calls.
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (state_tx, state_rx) = watch::channel(ConnectionState::Connected(connected.clone()));
    let token = options.token.clone();
    let driver = Driver {
        urls,
        fallback,
        transport: transport.clone(),
        current,
        options,
        cmd_weak: cmd_tx.downgrade(),
        state: state_tx,
        next_request: 0,
        next_sub: 0,
        channels: HashMap::new(),
        sub_requests: HashMap::new(),
        publishes: BTreeMap::new(),
        history: HashMap::new(),
        node: connected.node.clone(),
        resume_window: resume_window(&connected),
        lost_at: None,
        token,
        renewing: None,
        pacer: crate::pacer::Pacer::new(connected.limits.as_ref()),
        unsent: std::collections::VecDeque::new(),
        send_at: None,
        acked: HashMap::new(),
        connection_id: connected.connection_id.clone(),
        presence_requests: HashMap::new(),
        entered: BTreeMap::new(),
        snapshots: HashMap::new(),
    };
    tokio::spawn(driver.run(link, cmd_rx));
    Ok((cmd_tx, state_rx))
}

/// The transport of the current connection (`None` while reconnecting), shared with the
/// client handles.
pub(crate) type InUse = Arc<std::sync::Mutex<Option<Transport>>>;

type SubReply = oneshot::Sender<Result<Subscription, ClientError>>;
type RenewReply = oneshot::Sender<Result<tern_proto::client::AuthRenewed, ClientError>>;

/// The node's resume window (2 minutes when it does not say).
fn resume_window(c: &Connected) -> std::time::Duration {
    match c.resume_window_ms {
        0 => std::time::Duration::from_secs(120),
        ms => std::time::Duration::from_millis(u64::from(ms)),
    }
}

#[derive(Default)]
struct ChannelSubs {
    confirmed: bool,
    sinks: Vec<(u64, mpsc::Sender<Event>)>,
    waiting: Vec<(u64, mpsc::Sender<Event>, mpsc::Receiver<Event>, SubReply)>,
    /// Where the application is: the node that delivered the last message (or confirmed
    /// the subscription) and the position there.
    node: String,
    position: Option<Position>,
    /// Per origin, the last message received (from `Subscribed.origins`, then messages).
    /// Resuming on another node presents it; messages it covers are dropped as repeats.
    vector: Vec<OriginPosition>,
    /// Whether `vector` is known (the channel was confirmed at least once).
    resumable: bool,
    /// Presence watches of the channel (the subscription asks for presence while any).
    watchers: Vec<(u64, mpsc::Sender<PresenceChange>)>,
    /// The channel's members, as the node's snapshot and events after it say.
    roster: BTreeMap<MemberId, PresenceMember>,
    /// Whether `roster` holds a snapshot (a later watch starts from it).
    roster_live: bool,
    /// Ids of the messages delivered within the dedupe window: a publish retried after a
    /// failover or an origin's crash can come again as a new message with the same id
    /// (its first copy was delivered but its ack lost), possibly much later on a busy
    /// channel.
    recent: RecentIds,
}

/// Message ids delivered recently, as keyed 64-bit hashes (a false match among 100,000 ids
/// has odds near 1 in 10^9), forgotten after `ClientOptions::dedupe_window` or beyond
/// `ClientOptions::dedupe_ids`.
#[derive(Default)]
struct RecentIds {
    hasher: std::hash::RandomState,
    set: std::collections::HashSet<u64>,
    order: std::collections::VecDeque<(Instant, u64)>,
}

impl RecentIds {
    #[cfg(test)]
    fn contains(&self, id: &str) -> bool {
        self.set.contains(&self.hasher.hash_one(id))
    }

    /// Remembers `id`; false when it was remembered already.
    fn insert(&mut self, id: &str, now: Instant, options: &ClientOptions) -> bool {
        let h = self.hasher.hash_one(id);
        let fresh = self.set.insert(h);
        if fresh {
            self.order.push_back((now, h));
        }
        while let Some(&(at, old)) = self.order.front() {
            if self.order.len() <= options.dedupe_ids
                && now.duration_since(at) < options.dedupe_window
            {
                break;
            }
            self.order.pop_front();
            self.set.remove(&old);
        }
        fresh
    }
}

impl ChannelSubs {
    /// Whether the vector covers `m` (a repeat after a resume or failover).
    fn covers(&self, m: &Message) -> bool {
        tern_proto::vector::covers(&self.vector, m)
    }

    /// Records `m` as received from `node`. False when its id was delivered already (a
    /// retried publish's other copy: the application has it).
    fn note(&mut self, node: &str, m: &Message, options: &ClientOptions) -> bool {
        let fresh = m.id.is_empty() || self.recent.insert(&m.id, Instant::now(), options);
        if self.node != node {
            node.clone_into(&mut self.node);
        }
        self.position = m.position;
        match self.vector.iter_mut().find(|v| v.origin == m.origin) {
            Some(v) => {
                v.epoch = m.origin_epoch;
                v.seq = m.origin_seq;
            }
            None => self.vector.push(OriginPosition {
                origin: m.origin.clone(),
                epoch: m.origin_epoch,
                seq: m.origin_seq,
            }),
        }
        fresh
    }

    /// What to present when subscribing again after a reconnect.
    fn resume(&self) -> Option<Resume> {
        self.resumable.then(|| Resume {
            node: self.node.clone(),
            position: self.position,
            origins: self.vector.clone(),
        })
    }
}

struct Driver {
    /// Where to connect, in order of preference; reconnects fail over along it.
    urls: Vec<String>,
    /// The one in use.
    current: usize,
    /// Per URL, the transport fallback's state.
    fallback: Vec<Fallback>,
    /// The transport in use.
    transport: InUse,
    options: Arc<ClientOptions>,
    cmd_weak: mpsc::WeakSender<Command>,
    state: watch::Sender<ConnectionState>,
    next_request: u32,
    next_sub: u64,
    channels: HashMap<String, ChannelSubs>,
    /// Subscribe requests in flight on the current connection.
    sub_requests: HashMap<u32, String>,
    /// Unacknowledged publishes, in the order they were made (re-sent after a reconnect).
    publishes: BTreeMap<u32, (Publish, oneshot::Sender<Result<Ack, ClientError>>)>,
    /// History requests in flight on the current connection (a lost connection fails them
    /// with [`ClientError::Closed`]; history is read again on the next).
    history: HashMap<u32, oneshot::Sender<Result<tern_proto::client::HistoryPage, ClientError>>>,
    /// The connected node's id and resume window.
    node: String,
    resume_window: std::time::Duration,
    /// When the last connection was lost.
    lost_at: Option<Instant>,
    /// The token presented on (re)connect: `ClientOptions::token`, then the latest renewal.
    token: Option<String>,
    /// A renewal in flight: its request id, the token, and where the answer goes.
    renewing: Option<(u32, String, RenewReply)>,
    /// Keeps publishes under the node's announced rate.
    pacer: crate::pacer::Pacer,
    /// Publishes (request ids) not yet written on the current connection, in order.
    unsent: std::collections::VecDeque<u32>,
    /// When the first of `unsent` may go (the pacer's or a `retry_after_ms`'s wait).
    send_at: Option<Instant>,
    /// Per channel, this client's last acknowledged message (origin, epoch, sequence):
    /// every publish carries it as `after`, so a node this client moves to keeps its order.
    acked: HashMap<String, OriginPosition>,
    /// The current (or last) connection's id: a reconnect to the same node presents it
    /// (`Connect.recover`), so this client's presence members stay.
    connection_id: String,
    /// Presence requests in flight on the current connection: the channel, what `entered`
    /// held for it before (restored when the node refuses), and where the answer goes.
    presence_requests: HashMap<u32, PresenceInFlight>,
    /// This client's members, by channel, with their data: entered again after every
    /// reconnect (no event when the node kept them).
    entered: BTreeMap<String, Option<presence_request::Data>>,
    /// Presence snapshots arriving in pages, by subscribe request id.
    snapshots: HashMap<u32, (String, BTreeMap<MemberId, PresenceMember>)>,
}

type PresenceReplyTo = oneshot::Sender<Result<PresenceReply, ClientError>>;

struct PresenceInFlight {
    channel: String,
    /// `Some(before)` for enter, update and leave: `entered`'s value before.
    before: Option<Option<Option<presence_request::Data>>>,
    reply: Option<PresenceReplyTo>,
}

enum Flow {
    Continue,
    Lost(String),
    Stop,
}

impl Driver {
    fn set_transport(&self, t: Option<Transport>) {
        *self.transport.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    fn request_id(&mut self) -> u32 {
        self.next_request = self.next_request.wrapping_add(1).max(1);
        self.next_request
    }

    async fn run(mut self, mut link: Link, mut cmds: mpsc::Receiver<Command>) {
        loop {
            let why = match self.serve(&mut link, &mut cmds).await {
                Flow::Lost(why) => why,
                Flow::Continue | Flow::Stop => break,
            };
            debug!(%why, "connection lost");
            if !self.options.reconnect.enabled {
                break;
            }
            let _ = self.state.send(ConnectionState::Connecting);
            self.set_transport(None);
            self.lost_at = Some(Instant::now());
            // Their answers would have come on the lost connection: the callers see Closed
            // (members asked for are entered again on the next connection).
            self.history.clear();
            self.presence_requests.clear();
            self.snapshots.clear();
            // Unconfirmed, the new token is still the better one for the reconnect (the old
            // one is about to expire); the caller learns the link dropped.
            if let Some((_, token, reply)) = self.renewing.take() {
                self.token = Some(token);
                let _ = reply.send(Err(ClientError::Closed));
            }
            match self.reconnect(&mut cmds).await {
                Some(new_link) => link = new_link,
                None => break,
            }
        }
        let _ = self.state.send(ConnectionState::Closed);
    }

    /// Reconnects with back-off, taking commands meanwhile. `None` when closed instead.
    async fn reconnect(&mut self, cmds: &mut mpsc::Receiver<Command>) -> Option<Link> {
        let mut attempt = 0;
        loop {
            let wake = Instant::now() + self.options.reconnect.delay(attempt);
            attempt += 1;
            loop {
                tokio::select! {
                    _ = sleep_until(wake) => break,
                    cmd = cmds.recv() => match cmd {
                        None => return None,
                        Some(cmd) => if let Flow::Stop = self.command(None, cmd).await { return None },
                    }
                }
            }
            // Two tries per URL, then the next one (failover to the next-nearest edge).
            let idx = (self.current + (attempt as usize - 1) / 2) % self.urls.len();
            // The same node keeps this client's members for its presence grace.
            let recover =
                if idx == self.current { self.connection_id.clone() } else { String::new() };
            let opened = open(
                &self.urls[idx],
                &mut self.fallback[idx],
                &self.options,
                self.token.as_deref(),
                &recover,
                false,
            )
            .await;
            match opened {
                Ok((mut link, c)) => {
                    self.set_transport(Some(link.transport()));
                    if idx != self.current {
                        debug!(from = %self.urls[self.current], to = %self.urls[idx], "failed over");
                        self.current = idx;
                    }
                    self.node = c.node.clone();
                    self.connection_id = c.connection_id.clone();
                    self.resume_window = resume_window(&c);
                    self.pacer = crate::pacer::Pacer::new(c.limits.as_ref());
                    let _ = self.state.send(ConnectionState::Connected(c));
                    match self.resume(&mut link).await {
                        Ok(()) => return Some(link),
                        Err(e) => debug!(error = %e, attempt, "lost again while resubscribing"),
                    }
                }
                Err(e) => debug!(error = %e, attempt, "reconnect failed"),
            }
        }
    }

    /// After a reconnect: subscribe again where each channel left off (within the resume
    /// window; beyond it, the application is told it missed messages), then re-send
    /// unacknowledged publishes in order.
    async fn resume(&mut self, link: &mut Link) -> Result<(), String> {
        self.sub_requests.clear();
        let expired = self.lost_at.is_some_and(|t| t.elapsed() > self.resume_window);
        let channels: Vec<String> = self.channels.keys().cloned().collect();
        for channel in channels {
            let request_id = self.request_id();
            self.sub_requests.insert(request_id, channel.clone());
            let Some(entry) = self.channels.get_mut(&channel) else { continue };
            let resume = if expired && entry.resumable {
                let reason = format!(
                    "disconnected longer than the resume window ({:?}): messages were missed",
                    self.resume_window
                );
                entry.resumable = false;
                entry.vector.clear();
                for (_, sink) in &entry.sinks {
                    let _ = sink.send(Event::Discontinuity { reason: reason.clone() }).await;
                }
                None
            } else {
                entry.resume()
            };
            let presence = !entry.watchers.is_empty();
            if presence {
                self.snapshots.insert(request_id, (channel.clone(), BTreeMap::new()));
            }
            let frame = Subscribe { request_id, channel, rewind: None, resume, presence };
            link.send(client_frame::Kind::Subscribe(frame)).await?;
        }
        // This client's members, entered again (unchanged when the node kept them).
        let entered: Vec<_> = self.entered.iter().map(|(c, d)| (c.clone(), d.clone())).collect();
        for (channel, data) in entered {
            let request_id = self.request_id();
            let request = PresenceRequest {
                request_id,
                channel: channel.clone(),
                action: PresenceAction::Enter as i32,
                data,
                ..Default::default()
            };
            let pending = PresenceInFlight { channel, before: None, reply: None };
            self.presence_requests.insert(request_id, pending);
            link.send(client_frame::Kind::Presence(request)).await?;
        }
        // Unacknowledged publishes go again, paced, from the serve loop.
        self.unsent = self.publishes.keys().copied().collect();
        self.send_at = None;
        Ok(())
    }

    /// Serves one connection; returns `Lost` or `Stop`.
    async fn serve(&mut self, link: &mut Link, cmds: &mut mpsc::Receiver<Command>) -> Flow {
        let idle = match &*self.state.borrow() {
            ConnectionState::Connected(c) if c.idle_timeout_ms > 0 => {
                std::time::Duration::from_millis(u64::from(c.idle_timeout_ms))
            }
            _ => std::time::Duration::from_secs(60),
        };
        let mut last_seen = Instant::now();
        loop {
            let flow = tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None => {
                        link.close().await;
                        Flow::Stop
                    }
                    Some(cmd) => self.command(Some(link), cmd).await,
                },
                got = link.recv() => {
                    last_seen = Instant::now();
                    match got {
                        Received::Frame(kind) => self.on_frame(link, kind).await,
                        Received::Alive => Flow::Continue,
                        Received::Closed(code, reason) => {
                            Flow::Lost(format!("closed by node: {code} {reason}"))
                        }
                        Received::Lost(why) => Flow::Lost(why),
                    }
                }
                _ = sleep_until(self.send_at.unwrap_or_else(Instant::now)), if !self.unsent.is_empty() => {
                    self.send_at = None;
                    self.pump(Some(link)).await
                }
                _ = sleep_until(last_seen + idle) => Flow::Lost(format!("nothing received for {idle:?}")),
            };
            match flow {
                Flow::Continue => {}
                other => return other,
            }
        }
    }

    async fn write(&mut self, link: Option<&mut Link>, kind: client_frame::Kind) -> Flow {
        let Some(link) = link else { return Flow::Continue };
        match link.send(kind).await {
            Ok(()) => Flow::Continue,
            Err(e) => Flow::Lost(e),
        }
    }

    /// Writes the unsent publishes the pacer allows now, in order; the rest wait for
    /// `send_at` (or for the next connection).
    async fn pump(&mut self, mut link: Option<&mut Link>) -> Flow {
        if link.is_none() || self.send_at.is_some_and(|at| at > Instant::now()) {
            return Flow::Continue;
        }
        while let Some(&request_id) = self.unsent.front() {
            let Some((frame, _)) = self.publishes.get(&request_id) else {
                self.unsent.pop_front();
                continue;
            };
            if let Err(wait) = self.pacer.take(&frame.channel, std::time::Instant::now()) {
                self.send_at = Some(Instant::now() + wait);
                break;
            }
            let mut frame = frame.clone();
            frame.after = self.acked.get(&frame.channel).cloned();
            self.unsent.pop_front();
            let flow = self.write(link.as_deref_mut(), client_frame::Kind::Publish(frame)).await;
            if !matches!(flow, Flow::Continue) {
                return flow;
            }
        }
        Flow::Continue
    }

    async fn command(&mut self, link: Option<&mut Link>, cmd: Command) -> Flow {
        match cmd {
            Command::Subscribe { channel, rewind, reply } => {
                let (tx, rx) = mpsc::channel(self.options.subscription_buffer.max(1));
                self.next_sub += 1;
                let id = self.next_sub;
                let entry = self.channels.entry(channel.clone()).or_default();
                if entry.confirmed {
                    entry.sinks.push((id, tx));
                    let _ = reply.send(Ok(self.subscription(channel, id, rx)));
                    return Flow::Continue;
                }
                let first = entry.waiting.is_empty();
                entry.waiting.push((id, tx, rx, reply));
                if !first {
                    return Flow::Continue;
                }
                // Watched already: the subscribe keeps asking for presence (one without it
                // would end the watch).
                let presence = !entry.watchers.is_empty();
                let request_id = self.request_id();
                self.sub_requests.insert(request_id, channel.clone());
                if presence {
                    self.snapshots.insert(request_id, (channel.clone(), BTreeMap::new()));
                }
                let frame = Subscribe { request_id, channel, rewind, resume: None, presence };
                self.write(link, client_frame::Kind::Subscribe(frame)).await
            }
            Command::Publish { mut frame, reply } => {
                // The pacing queue is bounded by time: a publish that would wait for more
                // than half the request timeout is refused at once, and not sent later
                // behind the caller's back.
                if let Some(rate) = self.pacer.rate(&frame.channel) {
                    let wait = self.unsent.len() as f64 / rate;
                    if wait > self.options.request_timeout.as_secs_f64() / 2.0 {
                        let reason = format!(
                            "{} publishes already wait for the node's rate ({rate:.0}/s): \
                             publishing faster than the node allows",
                            self.unsent.len()
                        );
                        let _ = reply.send(Err(ClientError::Refused {
                            code: ErrorCode::RateLimited,
                            reason,
                        }));
                        return Flow::Continue;
                    }
                }
                frame.request_id = self.request_id();
                self.unsent.push_back(frame.request_id);
                self.publishes.insert(frame.request_id, (frame, reply));
                self.pump(link).await
            }
            Command::History { mut request, reply } => {
                request.request_id = self.request_id();
                self.history.insert(request.request_id, reply);
                self.write(link, client_frame::Kind::History(request)).await
            }
            Command::Drop { channel, id } => {
                let Some(entry) = self.channels.get_mut(&channel) else { return Flow::Continue };
                entry.sinks.retain(|(sid, _)| *sid != id);
                if entry.sinks.is_empty() && entry.waiting.is_empty() && entry.watchers.is_empty() {
                    self.channels.remove(&channel);
                    let request_id = self.request_id();
                    return self
                        .write(
                            link,
                            client_frame::Kind::Unsubscribe(Unsubscribe { request_id, channel }),
                        )
                        .await;
                }
                Flow::Continue
            }
            Command::Renew { token, reply } => {
                let request_id = self.request_id();
                // Without a connection the new token is simply used for the next one.
                let Some(link) = link else {
                    self.token = Some(token);
                    let _ = reply.send(Ok(tern_proto::client::AuthRenewed::default()));
                    return Flow::Continue;
                };
                // In force once the node accepts it.
                self.renewing = Some((request_id, token.clone(), reply));
                let frame = tern_proto::client::Auth { request_id, token };
                self.write(Some(link), client_frame::Kind::Auth(frame)).await
            }
            Command::Presence { mut request, reply } => {
                request.request_id = self.request_id();
                let channel = request.channel.clone();
                let before = match PresenceAction::try_from(request.action) {
                    Ok(PresenceAction::Enter | PresenceAction::Update) => {
                        Some(self.entered.insert(channel.clone(), request.data.clone()))
                    }
                    Ok(PresenceAction::Leave) => Some(self.entered.remove(&channel)),
                    _ => None,
                };
                let pending = PresenceInFlight { channel, before, reply: Some(reply) };
                self.presence_requests.insert(request.request_id, pending);
                self.write(link, client_frame::Kind::Presence(request)).await
            }
            Command::Watch { channel, reply } => {
                self.next_sub += 1;
                let id = self.next_sub;
                let buffer = self.options.subscription_buffer.max(1);
                let entry = self.channels.entry(channel.clone()).or_default();
                let (tx, rx) = mpsc::channel(buffer.max(entry.roster.len() + 1));
                if entry.roster_live {
                    // A later watch starts from the members known.
                    for m in entry.roster.values() {
                        let change =
                            PresenceChange { action: PresenceAction::Enter, member: m.clone() };
                        let _ = tx.try_send(change);
                    }
                }
                let first = entry.watchers.is_empty();
                entry.watchers.push((id, tx));
                // Live on this connection: a fresh subscribe (its `subscribed` comes behind the
                // deliveries in flight); else continue where the channel left off.
                let resume = if entry.confirmed { None } else { entry.resume() };
                let cmd = self.cmd_weak.upgrade().unwrap_or_else(|| mpsc::channel(1).0);
                let _ = reply.send(Ok(PresenceWatch { channel: channel.clone(), id, rx, cmd }));
                if !first {
                    return Flow::Continue;
                }
                let request_id = self.request_id();
                self.sub_requests.insert(request_id, channel.clone());
                self.snapshots.insert(request_id, (channel.clone(), BTreeMap::new()));
                let frame = Subscribe { request_id, channel, rewind: None, resume, presence: true };
                self.write(link, client_frame::Kind::Subscribe(frame)).await
            }
            Command::Unwatch { channel, id } => {
                let Some(entry) = self.channels.get_mut(&channel) else { return Flow::Continue };
                entry.watchers.retain(|(wid, _)| *wid != id);
                if !entry.watchers.is_empty() {
                    return Flow::Continue;
                }
                entry.roster.clear();
                entry.roster_live = false;
                let alone = entry.sinks.is_empty() && entry.waiting.is_empty();
                let resume = if entry.confirmed { None } else { entry.resume() };
                let request_id = self.request_id();
                if alone {
                    self.channels.remove(&channel);
                    let frame = Unsubscribe { request_id, channel };
                    return self.write(link, client_frame::Kind::Unsubscribe(frame)).await;
                }
                // Still subscribed to its messages: subscribe again, without presence.
                self.sub_requests.insert(request_id, channel.clone());
                let frame =
                    Subscribe { request_id, channel, rewind: None, resume, presence: false };
                self.write(link, client_frame::Kind::Subscribe(frame)).await
            }
            Command::Close { done } => {
                if let Some(link) = link {
                    // Members leave at once (not after the node's presence grace).
                    for channel in std::mem::take(&mut self.entered).into_keys() {
                        let request_id = self.request_id();
                        let leave = PresenceRequest {
                            request_id,
                            channel,
                            action: PresenceAction::Leave as i32,
                            ..Default::default()
                        };
                        if link.send(client_frame::Kind::Presence(leave)).await.is_err() {
                            break;
                        }
                    }
                    link.close().await;
                }
                let _ = self.state.send(ConnectionState::Closed);
                let _ = done.send(());
                Flow::Stop
            }
        }
    }

    fn subscription(&self, channel: String, id: u64, rx: mpsc::Receiver<Event>) -> Subscription {
        // The driver is alive, so some strong sender exists (the caller's).
        let cmd = self.cmd_weak.upgrade();
        Subscription { channel, id, rx, cmd: cmd.unwrap_or_else(|| mpsc::channel(1).0) }
    }

    async fn on_frame(&mut self, link: &mut Link, kind: server_frame::Kind) -> Flow {
        use server_frame::Kind;
        match kind {
            Kind::Deliver(d) => {
                for m in d.messages {
                    let Some(entry) = self.channels.get_mut(&m.channel) else { continue };
                    if entry.covers(&m) {
                        // Already delivered to the application (before a resume).
                        continue;
                    }
                    if !entry.note(&self.node, &m, &self.options) {
                        continue;
                    }
                    let mut live = Vec::with_capacity(entry.sinks.len());
                    for (id, sink) in entry.sinks.drain(..) {
                        // Waiting here is the back-pressure: see ClientOptions::subscription_buffer.
                        if sink.send(Event::Message(m.clone())).await.is_ok() {
                            live.push((id, sink));
                        }
                    }
                    entry.sinks = live;
                    if entry.sinks.is_empty()
                        && entry.waiting.is_empty()
                        && entry.watchers.is_empty()
                        && entry.confirmed
                    {
                        let channel = m.channel.clone();
                        self.channels.remove(&channel);
                        let request_id = self.request_id();
                        let flow = self
                            .write(
                                Some(link),
                                client_frame::Kind::Unsubscribe(Unsubscribe {
                                    request_id,
                                    channel,
                                }),
                            )
                            .await;
                        if !matches!(flow, Flow::Continue) {
                            return flow;
                        }
                    }
                }
            }
            Kind::History(page) => {
                if let Some(reply) = self.history.remove(&page.request_id) {
                    let _ = reply.send(Ok(page));
                }
            }
            Kind::Discontinuity(d) => {
                if let Some(entry) = self.channels.get_mut(&d.channel) {
                    for (_, sink) in &entry.sinks {
                        let _ = sink.send(Event::Discontinuity { reason: d.reason.clone() }).await;
                    }
                }
            }
            Kind::Subscribed(s) => {
                if let Some(channel) = self.sub_requests.remove(&s.request_id) {
                    let waiting = match self.channels.get_mut(&channel) {
                        Some(entry) => {
                            entry.confirmed = true;
                            if !s.resumed {
                                // A fresh start: the stream begins at the node's vector.
                                entry.vector = s.origins;
                                entry.position = s.position;
                                entry.node.clone_from(&self.node);
                                entry.resumable = true;
                            }
                            std::mem::take(&mut entry.waiting)
                        }
                        None => Vec::new(),
                    };
                    for (id, tx, rx, reply) in waiting {
                        if let Some(entry) = self.channels.get_mut(&channel) {
                            entry.sinks.push((id, tx));
                        }
                        let _ = reply.send(Ok(self.subscription(channel.clone(), id, rx)));
                    }
                }
            }
            Kind::Ack(a) => {
                if !a.origin.is_empty() {
                    let last = OriginPosition {
                        origin: a.origin.clone(),
                        epoch: a.origin_epoch,
                        seq: a.origin_seq,
                    };
                    self.acked.insert(a.channel.clone(), last);
                }
                if let Some((_, reply)) = self.publishes.remove(&a.request_id) {
                    let _ = reply.send(Ok(a));
                }
            }
            Kind::Nack(n)
                if n.code == ErrorCode::RateLimited as i32
                    || n.code == ErrorCode::Unavailable as i32 =>
            {
                // Over the node's rate despite the pacing (the network bunched publishes
                // up), or the node is not yet caught up with where this client's earlier
                // messages were sequenced: the same publish goes again after the node's
                // hint, first in line (until the caller's request timeout).
                if self.publishes.contains_key(&n.request_id) {
                    self.unsent.push_front(n.request_id);
                    let wait = std::time::Duration::from_millis(u64::from(n.retry_after_ms.max(1)));
                    self.send_at = Some(Instant::now() + wait);
                }
            }
            Kind::Nack(n) => {
                if let Some((_, reply)) = self.publishes.remove(&n.request_id) {
                    let code = ErrorCode::try_from(n.code).unwrap_or(ErrorCode::Unspecified);
                    let _ = reply.send(Err(ClientError::Refused { code, reason: n.reason }));
                }
            }
            Kind::Error(e) => {
                let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
                if let Some((channel, _)) = self.snapshots.remove(&e.request_id) {
                    // A subscribe with presence refused (the node refuses it whole): the
                    // watches end; message subscriptions of the channel subscribe again
                    // without presence, or end with the error when that was their subscribe.
                    self.sub_requests.remove(&e.request_id);
                    warn!(%channel, ?code, reason = %e.reason, "presence watch refused");
                    let Some(entry) = self.channels.get_mut(&channel) else {
                        return Flow::Continue;
                    };
                    entry.watchers.clear();
                    entry.roster.clear();
                    entry.roster_live = false;
                    if !entry.waiting.is_empty() || !entry.sinks.is_empty() {
                        let resume = entry.resume();
                        let request_id = self.request_id();
                        self.sub_requests.insert(request_id, channel.clone());
                        let frame = Subscribe {
                            request_id,
                            channel,
                            rewind: None,
                            resume,
                            presence: false,
                        };
                        return self.write(Some(link), client_frame::Kind::Subscribe(frame)).await;
                    }
                    self.channels.remove(&channel);
                } else if let Some(p) = self.presence_requests.remove(&e.request_id) {
                    // Refused: this client's member is as it was before.
                    match p.before {
                        Some(Some(data)) => {
                            self.entered.insert(p.channel, data);
                        }
                        Some(None) => {
                            self.entered.remove(&p.channel);
                        }
                        None => {}
                    }
                    match p.reply {
                        Some(reply) => {
                            let _ =
                                reply.send(Err(ClientError::Refused { code, reason: e.reason }));
                        }
                        None => {
                            warn!(?code, reason = %e.reason, "entering again after a reconnect was refused")
                        }
                    }
                } else if let Some(channel) = self.sub_requests.remove(&e.request_id) {
                    if let Some(entry) = self.channels.remove(&channel) {
                        for (_, _, _, reply) in entry.waiting {
                            let _ = reply
                                .send(Err(ClientError::Refused { code, reason: e.reason.clone() }));
                        }
                    }
                } else if let Some(reply) = self.history.remove(&e.request_id) {
                    let _ = reply.send(Err(ClientError::Refused { code, reason: e.reason }));
                } else if self.renewing.as_ref().is_some_and(|(id, ..)| *id == e.request_id) {
                    if let Some((_, _, reply)) = self.renewing.take() {
                        let _ = reply.send(Err(ClientError::Refused { code, reason: e.reason }));
                    }
                } else if e.request_id == 0
                    && code == ErrorCode::Forbidden
                    && self.channels.contains_key(&e.channel)
                {
                    // A renewed token no longer allows the channel: the node unsubscribed
                    // it, and its subscriptions end (their streams return None).
                    warn!(channel = %e.channel, reason = %e.reason, "subscription revoked");
                    self.channels.remove(&e.channel);
                } else {
                    warn!(?code, reason = %e.reason, "error from node");
                }
            }
            Kind::AuthRenewed(r) => {
                if let Some((_, token, reply)) =
                    self.renewing.take_if(|(id, ..)| *id == r.request_id)
                {
                    self.token = Some(token);
                    let _ = reply.send(Ok(r));
                }
            }
            Kind::Draining(d) => {
                // The node is shutting down: the reconnect goes to the next URL first (its
                // members cannot be recovered there: nothing to present).
                debug!(reason = %d.reason, "node draining; moving on");
                if self.urls.len() > 1 {
                    self.current = (self.current + 1) % self.urls.len();
                    self.connection_id.clear();
                }
                return Flow::Lost(format!("node draining: {}", d.reason));
            }
            // (`session` and `close` come over HTTP transports only.)
            Kind::Unsubscribed(_)
            | Kind::Heartbeat(_)
            | Kind::Connected(_)
            | Kind::Session(_)
            | Kind::Close(_) => {}
            Kind::PresenceReply(r) => {
                if let Some((channel, mut set)) = self.snapshots.remove(&r.request_id) {
                    for m in r.members {
                        set.insert(crate::presence::id_of(&m), m);
                    }
                    if !r.next.is_empty() {
                        self.snapshots.insert(r.request_id, (channel, set));
                    } else if let Some(entry) = self.channels.get_mut(&channel) {
                        // Only what changed since the set this client had (none when
                        // members stayed through a reconnect).
                        let changes = crate::presence::diff(&entry.roster, &set);
                        entry.roster = set;
                        entry.roster_live = true;
                        for change in changes {
                            for (_, w) in &entry.watchers {
                                let _ = w.send(change.clone()).await;
                            }
                        }
                    }
                } else if let Some(p) = self.presence_requests.remove(&r.request_id) {
                    if let Some(reply) = p.reply {
                        let _ = reply.send(Ok(r));
                    }
                }
            }
            Kind::Presence(ev) => {
                // Events before the snapshot they follow (or after the last watch ended)
                // are not applied: the next snapshot holds them.
                if let Some(entry) = self
                    .channels
                    .get_mut(&ev.channel)
                    .filter(|e| e.roster_live && !e.watchers.is_empty())
                {
                    for e in ev.events {
                        let Some(member) = e.member else { continue };
                        let action = PresenceAction::try_from(e.action)
                            .unwrap_or(PresenceAction::Unspecified);
                        let id = crate::presence::id_of(&member);
                        match action {
                            PresenceAction::Leave => {
                                entry.roster.remove(&id);
                            }
                            PresenceAction::Enter | PresenceAction::Update => {
                                entry.roster.insert(id, member.clone());
                            }
                            _ => continue,
                        }
                        let change = PresenceChange { action, member };
                        for (_, w) in &entry.watchers {
                            let _ = w.send(change.clone()).await;
                        }
                    }
                }
            }
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let n = |u| normalize_url(u, Format::Protobuf);
        assert_eq!(n("ws://127.0.0.1:7400").unwrap(), "ws://127.0.0.1:7400/v1/ws?format=proto");
        assert_eq!(n("ws://h:1/").unwrap(), "ws://h:1/v1/ws?format=proto");
        assert_eq!(n("http://h:1/v1/ws?x=1").unwrap(), "ws://h:1/v1/ws?x=1&format=proto");
        assert_eq!(n("ws://h:1/v1/ws?format=json").unwrap(), "ws://h:1/v1/ws?format=json");
        assert!(n("h:1").is_err());
        assert!(n("ftp://h").is_err());
    }

    #[test]
    fn delivered_ids_are_remembered_for_the_window_and_up_to_the_count() {
        let options = ClientOptions {
            dedupe_window: std::time::Duration::from_secs(120),
            dedupe_ids: 3,
            ..ClientOptions::default()
        };
        let t0 = Instant::now();
        let mut r = RecentIds::default();
        r.insert("a", t0, &options);
        for id in ["b", "c"] {
            r.insert(id, t0, &options);
        }
        assert!(r.contains("a") && r.contains("b") && r.contains("c"));
        r.insert("d", t0, &options);
        assert!(!r.contains("a"), "beyond the count, the oldest goes");
        assert!(r.contains("d"));
        r.insert("e", t0 + std::time::Duration::from_secs(121), &options);
        assert!(!r.contains("b") && !r.contains("c") && !r.contains("d"), "past the window");
        assert!(r.contains("e"));
    }
}
