//! The listener: accepts TCP connections, serves HTTP/1.1 with upgrades, shuts down by token.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use std::time::Duration;
use tern_backbone::certs::TlsFiles;
use tern_backbone::transport::{Backbone, BackboneConfig, BackboneError, Sink};
use tern_proto::types::{ChannelName, Epoch, NodeId, Seq};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::http::router;
use crate::node::Node;

/// How often every channel's dedupe window is pruned (see `Hub::sweep`).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// A bound edge server.
pub struct Server {
    node: Arc<Node>,
    listener: TcpListener,
    tls: Option<crate::tls::ClientTls>,
    /// `listen.admin`, when set.
    admin: Option<TcpListener>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("node", &self.node)
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The client port is taken or not allowed; retrying helps once it is free.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The history store could not open.
    #[error(transparent)]
    History(#[from] crate::store::StoreError),
    /// The backbone could not start (certificates, UDP port).
    #[error("backbone: {0}")]
    Backbone(#[from] BackboneError),
    /// The `[tls]` certificate or key could not be loaded.
    #[error("tls: {0}")]
    Tls(String),
}

/// Longest a shutdown waits for the peers to acknowledge this node's messages: most of
/// `timeouts.shutdown_grace`, so the rest of the shutdown fits in it.
fn drain_time(grace: Duration) -> Duration {
    grace * 9 / 10
}

/// At shutdown, once the client connections are gone (no more publishes), keeps the
/// backbone running until every reachable peer acknowledged the messages this node accepted
/// — a rolling restart loses nothing it acknowledged to a publisher — or until the drain
/// time is over; then stops it.
async fn drain_backbone(node: Arc<Node>, stop: CancellationToken) {
    node.shutdown().cancelled().await;
    let grace = node.settings().config.timeouts.shutdown_grace;
    let deadline = tokio::time::Instant::now() + drain_time(grace);
    loop {
        // Messages still waiting for their log write reach the backbone once written.
        let pending = node.hub().backbone_unacknowledged() + node.hub().unreleased() as u64;
        if node.connection_count() == 0 && pending == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(pending, "shutdown: peers did not acknowledge everything in time");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
}

/// Serves HTTP/1.1 (with upgrades) on one client connection until it ends or the node
/// shuts down.
async fn serve_http<I>(
    io: I,
    service: TowerToHyperService<axum::Router>,
    timeouts: &crate::config::TimeoutsConfig,
    shutdown: CancellationToken,
    peer: SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Handlers that count per address (HTTP sessions) read the peer from the request.
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            hyper::service::Service::call(&service, req)
        });
    // A connection that arrives while the node drains gets its one answer (503 with
    // `Retry-After`, see `http`), then closes.
    let draining = shutdown.is_cancelled();
    let io = WriteDeadline::new(io, timeouts.http_write);
    let deadline_on = io.on.clone();
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.http_header)
        .keep_alive(!draining)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled(), if !draining => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    // After an upgrade the socket belongs to a WebSocket session, with its own cut-offs.
    deadline_on.store(false, std::sync::atomic::Ordering::Relaxed);
    if let Err(e) = result {
        debug!(%peer, error = %e, "http connection ended with an error");
    }
}

/// A client socket whose writes fail (`TimedOut`) once one has waited `limit` for the
/// client to take more (`timeouts.http_write`): an HTTP client that stops reading its
/// answer is let go, and the answer's memory with it. Switched off (`on`) when the socket
/// passes to a WebSocket session.
struct WriteDeadline<I> {
    io: I,
    limit: Duration,
    on: Arc<std::sync::atomic::AtomicBool>,
    /// Armed while a write waits for the client.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteDeadline<I> {
    fn new(io: I, limit: Duration) -> Self {
        let on = Arc::new(std::sync::atomic::AtomicBool::new(true));
        Self { io, limit, on, timer: None }
    }

    /// Passes on what the socket said, arming the timer while it waits and failing the
    /// write once the timer has run out.
    fn watch<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        use std::task::Poll;
        if polled.is_ready() || !self.on.load(std::sync::atomic::Ordering::Relaxed) {
            self.timer = None;
            return polled;
        }
        let limit = self.limit;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading (timeouts.http_write)",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // A TLS shutdown writes too (what is buffered, then close_notify).
        let polled = std::pin::Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

/// A client socket counted against its source address for as long as it is open.
struct Counted {
    stream: tokio::net::TcpStream,
    _slot: crate::node::IpSlot,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Hands replicated messages to the hub (weakly: the node owns the backbone).
struct HubSink(Weak<Node>);

impl Sink for HubSink {
    fn presence(&self, event: tern_backbone::core::PresenceEvent, members: usize) {
        if let Some(node) = self.0.upgrade() {
            node.presence().fan_out(event, members);
        }
    }

    fn deliver(
        &self,
        origin: &NodeId,
        _channel: &ChannelName,
        epoch: Epoch,
        seq: Seq,
        payload: Bytes,
    ) {
        if let Some(node) = self.0.upgrade() {
            node.hub().deliver_remote(origin, epoch, seq, &payload);
        }
    }

    fn ready(&self, channel: &ChannelName) {
        if let Some(node) = self.0.upgrade() {
            node.hub().interest_ready(channel);
        }
    }

    fn replicated(&self, channel: &ChannelName, seq: Seq) {
        if let Some(node) = self.0.upgrade() {
            node.hub().note_replicated(channel, seq.0);
        }
    }

    fn epoch_ended(&self, origin: &NodeId, channel: &ChannelName, epoch: Epoch) {
        if let Some(node) = self.0.upgrade() {
            node.hub().epoch_ended(channel, origin.as_str(), epoch.0);
        }
    }

    fn head_requested(&self, peer: &NodeId, channel: &ChannelName, nonce: u64) {
        let Some(node) = self.0.upgrade() else { return };
        let head = node.hub().own_head(channel);
        if let Some(b) = node.hub().backbone() {
            b.answer_head(peer, channel.clone(), nonce, head);
        }
    }

    fn discontinuity(
        &self,
        origin: &NodeId,
        channel: &ChannelName,
        epoch: Epoch,
        after: Seq,
        through: Option<Seq>,
    ) {
        let Some(node) = self.0.upgrade() else { return };
        warn!(%origin, %channel, %epoch, %after, ?through, "replication discontinuity");
        node.hub().discontinuity(channel, origin.as_str(), epoch.0, after.0, through.map(|s| s.0));
    }
}

/// What the durable log tells the backbone after a restart (see
/// [`tern_backbone::core::Replica::restore`]): this node's newest messages of each history
/// channel from its last epoch with any (at most `retention` per channel, and
/// `retention_bytes` in all), and how far it got in every other origin's.
fn restored(
    store: &crate::store::Store,
    me: &NodeId,
    retention: usize,
    retention_bytes: usize,
) -> tern_backbone::core::Restored {
    use tern_backbone::core::{OwnLog, Restored};
    let mut out = Restored::default();
    let positions = store.all_positions().unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read the logged positions; peers resend what they hold");
        Vec::new()
    });
    let mut bytes = 0;
    for p in positions.into_iter().filter(|p| store.keeps(&p.channel)) {
        let Ok(channel) = ChannelName::parse(&p.channel) else { continue };
        if p.origin == me.as_str() {
            let entries = if bytes < retention_bytes {
                // Other origins' messages lie in between: read up to 100 times as many
                // rows as own messages wanted (this is the start, not the hot path).
                let rows = retention.saturating_mul(100).min(10_000_000);
                store
                    .origin_tail(&p.channel, me.as_str(), (p.epoch, p.seq), retention, rows)
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            bytes += entries.iter().map(|(_, b)| b.len()).sum::<usize>();
            out.own.push(OwnLog {
                channel,
                epoch: Epoch(p.epoch),
                last: Seq(p.seq),
                entries: entries.into_iter().map(|(s, b)| (Seq(s), b)).collect(),
            });
        } else if let Ok(origin) = NodeId::parse(&p.origin) {
            out.positions.push((origin, channel, Epoch(p.epoch), Seq(p.seq)));
        }
    }
    out
}

/// The node without its sockets: its history store opened (when namespaces keep history)
/// and its messages released as their log writes commit. [`Server::bind`] adds the client
/// port and the backbone; the session fuzz target (`crate::fuzzing::session`) drives
/// sessions against it directly.
pub fn open_node(settings: Settings, shutdown: CancellationToken) -> Result<Arc<Node>, BindError> {
    let metrics = Arc::new(crate::metrics::Metrics::new(&settings.config));
    let history = &settings.config.history;
    let store = if history.namespaces.is_empty() {
        None
    } else {
        let options = crate::store::StoreOptions {
            dir: history.data_dir.clone(),
            sync: match history.sync {
                crate::config::SyncMode::Group => crate::store::SyncPolicy::Group,
                crate::config::SyncMode::Interval => {
                    crate::store::SyncPolicy::Interval(history.sync_interval)
                }
            },
            namespaces: history
                .namespaces
                .iter()
                .map(|n| {
                    let r = crate::store::Retention {
                        max_messages: n.max_messages,
                        max_age: n.max_age,
                    };
                    (n.name.clone(), r)
                })
                .collect(),
            queue: history.queue,
            write_seconds: metrics.history_handles().0,
            writes: metrics.history_handles().1,
        };
        let store = crate::store::Store::open(options)?;
        info!(path = %store.path().display(), "history: durable channel log");
        Some(store)
    };
    let node = Node::new(settings, shutdown, store, metrics)?;
    if let Some(store) = node.hub().store().cloned() {
        // Messages of history channels are delivered once their log write is committed.
        // Not tracked: it ends when the store closes, after the connections.
        let weak = Arc::downgrade(&node);
        let mut committed = store.committed();
        tokio::spawn(async move {
            while committed.changed().await.is_ok() {
                let ticket = *committed.borrow_and_update();
                let Some(node) = weak.upgrade() else { break };
                node.hub().release(ticket);
            }
        });
    }
    Ok(node)
}

/// How often messages held for their publisher's order are checked for `order_wait`.
const HOLD_CHECK: Duration = Duration::from_millis(200);

impl Server {
    /// Binds the client port, and starts the backbone when configured. `shutdown` stops the
    /// server when cancelled.
    pub async fn bind(settings: Settings, shutdown: CancellationToken) -> Result<Self, BindError> {
        let addr = settings.config.listen.client;
        // Certificates first: a bad file is reported before anything is opened.
        let tls = settings
            .config
            .tls
            .as_ref()
            .map(crate::tls::ClientTls::new)
            .transpose()
            .map_err(BindError::Tls)?;
        let listener =
            TcpListener::bind(addr).await.map_err(|source| BindError::Listen { addr, source })?;
        let admin = match settings.config.listen.admin {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| BindError::Listen { addr, source })?,
            ),
            None => None,
        };
        let node = open_node(settings, shutdown)?;
        if let Some(b) = node.settings().config.backbone.clone() {
            let config = BackboneConfig {
                listen: b.listen,
                peers: node.settings().peers.clone(),
                tls: TlsFiles { ca: b.ca, cert: b.cert, key: b.key, crl: b.crl },
                lanes: b.lanes,
                lane_queue: b.lane_queue,
                presence: tern_backbone::core::PresenceConfig {
                    down_after: node.settings().config.presence.down_after,
                    ..Default::default()
                },
                core: tern_backbone::core::Config {
                    retention: b.retention,
                    retention_bytes: b.retention_bytes,
                    send_window: b.send_window,
                    // Namespaces with history go to every node, so history and resume are
                    // served locally and survive a region loss.
                    replicate_all: b
                        .replicate_all
                        .iter()
                        .cloned()
                        .chain(
                            node.settings()
                                .config
                                .history
                                .namespaces
                                .iter()
                                .map(|n| n.name.clone()),
                        )
                        .collect(),
                    // History namespaces keep a log on every node: a node that restarts with
                    // it continues where it left off (see `Replica::restore`).
                    durable: node
                        .settings()
                        .config
                        .history
                        .namespaces
                        .iter()
                        .map(|n| n.name.clone())
                        .collect(),
                    interest_grace: b.interest_grace,
                    interest_wait: b.interest_wait,
                    ..Default::default()
                },
            };
            let me = node.settings().node.clone();
            let restored = node.hub().store().map_or_else(Default::default, |s| {
                restored(s, &me, b.retention, b.retention_bytes)
            });
            if !restored.own.is_empty() || !restored.positions.is_empty() {
                info!(
                    channels = restored.own.len(),
                    positions = restored.positions.len(),
                    "backbone continues from the log"
                );
            }
            let sink = Arc::new(HubSink(Arc::downgrade(&node)));
            // The backbone outlives the client connections at shutdown: it stops once the
            // peers have what this node acknowledged (see `drain_backbone`).
            let backbone_stop = CancellationToken::new();
            let backbone = Backbone::start(
                me,
                node.hub().epoch(),
                restored,
                config,
                sink,
                backbone_stop.clone(),
                node.tracker(),
            )?;
            node.tracker().spawn(drain_backbone(node.clone(), backbone_stop));
            node.hub().set_backbone(backbone);
        }
        // Presence events of large channels go out in batches.
        let (weak, every) = (Arc::downgrade(&node), node.settings().config.presence.batch_interval);
        let stop = node.shutdown().clone();
        node.tracker().spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let Some(node) = weak.upgrade() else { break };
                node.presence().flush(node.hub().backbone());
            }
        });
        Ok(Self { node, listener, tls, admin })
    }

    /// The backbone's bound UDP address, when the backbone runs.
    pub fn backbone_addr(&self) -> Option<SocketAddr> {
        self.node.hub().backbone_addr()
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has an address.
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The admin listener's bound address, when `listen.admin` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The node state.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Serves until the shutdown token is cancelled, then closes every WebSocket with 1001
    /// and waits up to `timeouts.shutdown_grace` for the connections to finish.
    pub async fn run(self) {
        let Self { node, listener, tls, admin } = self;
        let shutdown = node.shutdown().clone();
        if let Some(admin) = admin {
            info!(addr = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                "admin listening");
            // Not tracked: the shutdown does not wait for a scrape. It stops taking requests
            // when the node shuts down.
            let serve = axum::serve(admin, crate::http::admin_router(node.clone()))
                .with_graceful_shutdown(shutdown.clone().cancelled_owned());
            tokio::spawn(async move {
                if let Err(e) = serve.await {
                    warn!(error = %e, "admin listener failed");
                }
            });
        }
        // A renewed certificate is picked up from its files while the node runs.
        let tls = tls.map(|t| {
            let acceptor = t.acceptor.clone();
            node.tracker().spawn(t.reload(shutdown.clone()));
            acceptor
        });
        let service = TowerToHyperService::new(router(node.clone()));
        let header_timeout = node.settings().config.timeouts.http_header;
        info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            node = %node.settings().node, "listening");
        // Message ids, and the tails of idle history channels, leave with their window.
        let sweeper = node.clone();
        let stop = shutdown.clone();
        node.tracker().spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        let swept = sweeper.hub().sweep(std::time::Instant::now());
                        if swept != Default::default() {
                            debug!(ids = swept.ids, tails = swept.tails, "idle channel memory released");
                        }
                    }
                }
            }
        });
        // Replicated messages held for their publisher's order go after `order_wait`.
        let holder = node.clone();
        let stop = shutdown.clone();
        node.tracker().spawn(async move {
            let mut tick = tokio::time::interval(HOLD_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => holder.hub().release_expired(std::time::Instant::now()),
                }
            }
        });
        // Until the connections drained (or the grace passed), the listener stays open:
        // what arrives meanwhile is answered 503 with `Retry-After`, not refused.
        let tracker = node.tracker().clone();
        let grace = node.settings().config.timeouts.shutdown_grace;
        let drained = async {
            shutdown.cancelled().await;
            tracker.close();
            info!(open = node.connection_count(), ?grace, "shutting down: closing connections");
            // Answering newcomers during the drain is not tracked: it does not prolong it.
            tokio::time::timeout(grace, tracker.wait()).await.is_ok()
        };
        tokio::pin!(drained);
        loop {
            let (stream, peer) = tokio::select! {
                done = &mut drained => {
                    if !done {
                        warn!(left = tracker.len(), "shutdown grace period over; dropping the rest");
                    }
                    break;
                }
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Usually EMFILE: back off briefly instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = node.open_from(peer.ip()) else {
                debug!(%peer, "connection limit for this address reached; closed");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let service = service.clone();
            let shutdown = shutdown.clone();
            // The slot travels with the socket, into the WebSocket session after an upgrade.
            let stream = Counted { stream, _slot: slot };
            let tls = tls.clone();
            let timeouts = node.settings().config.timeouts.clone();
            let serve = async move {
                let Some(acceptor) = tls else {
                    return serve_http(stream, service, &timeouts, shutdown, peer).await;
                };
                // The TLS handshake gets the same time as the request headers.
                match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => serve_http(stream, service, &timeouts, shutdown, peer).await,
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            };
            if node.shutdown().is_cancelled() {
                tokio::spawn(serve);
            } else {
                node.tracker().spawn(serve);
            }
        }
        drop(listener);
        if let Some(store) = node.hub().store().cloned() {
            // Everything logged so far made durable; the file released.
            let _ = tokio::task::spawn_blocking(move || store.close()).await;
        }
    }
}
