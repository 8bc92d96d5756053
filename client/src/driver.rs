//! The connection task: owns the WebSocket, survives reconnects.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tern_proto::client::{
    Ack, Connect, Connected, ErrorCode, Message, OriginPosition, Position, Publish, Resume,
    Subscribe, Unsubscribe, client_frame, server_frame,
};
use tern_proto::codec::{self, Format};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, warn};

use crate::options::ClientOptions;
use crate::subscription::{Event, Subscription};
use crate::{ClientError, ConnectionState};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

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

async fn open(
    url: &str,
    options: &ClientOptions,
    token: Option<&str>,
) -> Result<(Ws, Connected), ClientError> {
    let attempt = async {
        // The library's default 128 KiB read buffer is zero-filled on every read; 8 KiB
        // holds a typical Deliver batch.
        let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
        let connector = tokio_tungstenite::Connector::Rustls(options.tls_config());
        let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(
            url,
            Some(config),
            true,
            Some(connector),
        )
        .await
        .map_err(|e| ClientError::Connect(Box::new(e)))?;
        let connect = Connect {
            protocol: tern_proto::PROTOCOL_VERSION,
            client_id: options.client_id.clone().unwrap_or_default(),
            token: token.unwrap_or_default().to_owned(),
            agent: concat!("tern-rust/", env!("CARGO_PKG_VERSION")).into(),
            ..Default::default()
        };
        send(&mut ws, options.format, client_frame::Kind::Connect(connect))
            .await
            .map_err(|e| ClientError::Connect(Box::new(e)))?;
        loop {
            let frame = ws.next().await;
            match frame {
                Some(Ok(m @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => match decode(&m) {
                    Some(server_frame::Kind::Connected(c)) => return Ok((ws, c)),
                    Some(server_frame::Kind::Error(e)) => {
                        return Err(ClientError::Handshake(e.reason));
                    }
                    other => {
                        return Err(ClientError::Handshake(format!("unexpected frame {other:?}")));
                    }
                },
                Some(Ok(WsMessage::Close(f))) => {
                    return Err(ClientError::Handshake(format!("closed: {f:?}")));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(ClientError::Connect(Box::new(e))),
                None => return Err(ClientError::Handshake("connection closed".into())),
            }
        }
    };
    tokio::time::timeout(options.connect_timeout, attempt)
        .await
        .map_err(|_| ClientError::Timeout)?
}

async fn send(
    ws: &mut Ws,
    format: Format,
    kind: client_frame::Kind,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let bytes = codec::encode_client(kind, format);
    let msg = match format {
        Format::Protobuf => WsMessage::Binary(bytes),
        Format::Json => WsMessage::Text(bytes.try_into().unwrap_or_default()),
    };
    ws.send(msg).await
}

fn decode(msg: &WsMessage) -> Option<server_frame::Kind> {
    let r = match msg {
        WsMessage::Text(t) => codec::decode_server(t.as_bytes(), true),
        WsMessage::Binary(b) => codec::decode_server(b, false),
        _ => return None,
    };
    r.map_err(|e| warn!(error = %e, "undecodable frame from node")).ok()
}

/// Opens the first connection (to the first of `urls` that answers, in order) and starts
/// the driver. Later reconnects fail over along the same list.
pub(crate) async fn start(
    urls: &[String],
    options: Arc<ClientOptions>,
) -> Result<(mpsc::Sender<Command>, watch::Receiver<ConnectionState>), ClientError> {
    let urls: Vec<String> =
        urls.iter().map(|u| normalize_url(u, options.format)).collect::<Result<_, _>>()?;
    let mut first = None;
    let mut last_err = ClientError::InvalidUrl("no URL given".into());
    for (i, url) in urls.iter().enumerate() {
        match open(url, &options, options.token.as_deref()).await {
            Ok(c) => {
                first = Some((i, c));
                break;
            }
            Err(e) => last_err = e,
        }
    }
    let Some((current, (ws, connected))) = first else { return Err(last_err) };
    // Commands wait here while the driver writes; 256 bounds a burst of API calls.
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (state_tx, state_rx) = watch::channel(ConnectionState::Connected(connected.clone()));
    let token = options.token.clone();
    let driver = Driver {
        urls,
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
    };
    tokio::spawn(driver.run(ws, cmd_rx));
    Ok((cmd_tx, state_rx))
}

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
}

enum Flow {
    Continue,
    Lost(String),
    Stop,
}

impl Driver {
    fn request_id(&mut self) -> u32 {
        self.next_request = self.next_request.wrapping_add(1).max(1);
        self.next_request
    }

    async fn run(mut self, mut ws: Ws, mut cmds: mpsc::Receiver<Command>) {
        loop {
            let why = match self.serve(&mut ws, &mut cmds).await {
                Flow::Lost(why) => why,
                Flow::Continue | Flow::Stop => break,
            };
            debug!(%why, "connection lost");
            if !self.options.reconnect.enabled {
                break;
            }
            let _ = self.state.send(ConnectionState::Connecting);
            self.lost_at = Some(Instant::now());
            // Their answers would have come on the lost connection: the callers see Closed.
            self.history.clear();
            // Unconfirmed, the new token is still the better one for the reconnect (the old
            // one is about to expire); the caller learns the link dropped.
            if let Some((_, token, reply)) = self.renewing.take() {
                self.token = Some(token);
                let _ = reply.send(Err(ClientError::Closed));
            }
            match self.reconnect(&mut cmds).await {
                Some(new_ws) => ws = new_ws,
                None => break,
            }
        }
        let _ = self.state.send(ConnectionState::Closed);
    }

    /// Reconnects with back-off, taking commands meanwhile. `None` when closed instead.
    async fn reconnect(&mut self, cmds: &mut mpsc::Receiver<Command>) -> Option<Ws> {
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
            match open(&self.urls[idx], &self.options, self.token.as_deref()).await {
                Ok((mut ws, c)) => {
                    if idx != self.current {
                        debug!(from = %self.urls[self.current], to = %self.urls[idx], "failed over");
                        self.current = idx;
                    }
                    self.node = c.node.clone();
                    self.resume_window = resume_window(&c);
                    self.pacer = crate::pacer::Pacer::new(c.limits.as_ref());
                    let _ = self.state.send(ConnectionState::Connected(c));
                    match self.resume(&mut ws).await {
                        Ok(()) => return Some(ws),
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
    async fn resume(&mut self, ws: &mut Ws) -> Result<(), tokio_tungstenite::tungstenite::Error> {
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
            let frame = Subscribe { request_id, channel, rewind: None, resume };
            send(ws, self.options.format, client_frame::Kind::Subscribe(frame)).await?;
        }
        // Unacknowledged publishes go again, paced, from the serve loop.
        self.unsent = self.publishes.keys().copied().collect();
        self.send_at = None;
        Ok(())
    }

    /// Serves one connection; returns `Lost` or `Stop`.
    async fn serve(&mut self, ws: &mut Ws, cmds: &mut mpsc::Receiver<Command>) -> Flow {
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
                        let _ = ws.close(None).await;
                        Flow::Stop
                    }
                    Some(cmd) => self.command(Some(ws), cmd).await,
                },
                frame = ws.next() => {
                    last_seen = Instant::now();
                    match frame {
                        Some(Ok(WsMessage::Close(f))) => Flow::Lost(format!("closed by node: {f:?}")),
                        Some(Ok(m)) => match decode(&m) {
                            Some(kind) => self.on_frame(ws, kind).await,
                            None => Flow::Continue,
                        },
                        Some(Err(e)) => Flow::Lost(e.to_string()),
                        None => Flow::Lost("connection closed".into()),
                    }
                }
                _ = sleep_until(self.send_at.unwrap_or_else(Instant::now)), if !self.unsent.is_empty() => {
                    self.send_at = None;
                    self.pump(Some(ws)).await
                }
                _ = sleep_until(last_seen + idle) => Flow::Lost(format!("nothing received for {idle:?}")),
            };
            match flow {
                Flow::Continue => {}
                other => return other,
            }
        }
    }

    async fn write(&mut self, ws: Option<&mut Ws>, kind: client_frame::Kind) -> Flow {
        let Some(ws) = ws else { return Flow::Continue };
        match send(ws, self.options.format, kind).await {
            Ok(()) => Flow::Continue,
            Err(e) => Flow::Lost(e.to_string()),
        }
    }

    /// Writes the unsent publishes the pacer allows now, in order; the rest wait for
    /// `send_at` (or for the next connection).
    async fn pump(&mut self, mut ws: Option<&mut Ws>) -> Flow {
        if ws.is_none() || self.send_at.is_some_and(|at| at > Instant::now()) {
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
            let flow = self.write(ws.as_deref_mut(), client_frame::Kind::Publish(frame)).await;
            if !matches!(flow, Flow::Continue) {
                return flow;
            }
        }
        Flow::Continue
    }

    async fn command(&mut self, ws: Option<&mut Ws>, cmd: Command) -> Flow {
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
                let request_id = self.request_id();
                self.sub_requests.insert(request_id, channel.clone());
                let frame = Subscribe { request_id, channel, rewind, resume: None };
                self.write(ws, client_frame::Kind::Subscribe(frame)).await
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
                self.pump(ws).await
            }
            Command::History { mut request, reply } => {
                request.request_id = self.request_id();
                self.history.insert(request.request_id, reply);
                self.write(ws, client_frame::Kind::History(request)).await
            }
            Command::Drop { channel, id } => {
                let Some(entry) = self.channels.get_mut(&channel) else { return Flow::Continue };
                entry.sinks.retain(|(sid, _)| *sid != id);
                if entry.sinks.is_empty() && entry.waiting.is_empty() {
                    self.channels.remove(&channel);
                    let request_id = self.request_id();
                    return self
                        .write(
                            ws,
                            client_frame::Kind::Unsubscribe(Unsubscribe { request_id, channel }),
                        )
                        .await;
                }
                Flow::Continue
            }
            Command::Renew { token, reply } => {
                let request_id = self.request_id();
                // Without a connection the new token is simply used for the next one.
                let Some(ws) = ws else {
                    self.token = Some(token);
                    let _ = reply.send(Ok(tern_proto::client::AuthRenewed::default()));
                    return Flow::Continue;
                };
                // In force once the node accepts it.
                self.renewing = Some((request_id, token.clone(), reply));
                let frame = tern_proto::client::Auth { request_id, token };
                self.write(Some(ws), client_frame::Kind::Auth(frame)).await
            }
            Command::Close { done } => {
                if let Some(ws) = ws {
                    let _ = ws.close(None).await;
                    // Read until the node's close reply so it sees a clean close.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                        while ws.next().await.is_some() {}
                    })
                    .await;
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

    async fn on_frame(&mut self, ws: &mut Ws, kind: server_frame::Kind) -> Flow {
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
                    if entry.sinks.is_empty() && entry.waiting.is_empty() && entry.confirmed {
                        let channel = m.channel.clone();
                        self.channels.remove(&channel);
                        let request_id = self.request_id();
                        let flow = self
                            .write(
                                Some(ws),
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
                if let Some(channel) = self.sub_requests.remove(&e.request_id) {
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
            // (`session` and `close` come over HTTP transports only.)
            Kind::Unsubscribed(_)
            | Kind::Heartbeat(_)
            | Kind::Connected(_)
            | Kind::Session(_)
            | Kind::Close(_) => {}
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
