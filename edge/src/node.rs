//! The node: shared state of one `tern edge` process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tern_proto::rate::TokenBucket;
use tern_proto::types::{ConnectionId, Epoch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::channel::{Hub, HubLimits};
use crate::config::Settings;

/// Shared state of a node, handed to every session and request handler.
#[derive(Debug)]
pub struct Node {
    settings: Settings,
    hub: Hub,
    presence: Arc<crate::presence::PresenceHub>,
    connections: AtomicUsize,
    next_connection: AtomicU64,
    shutdown: CancellationToken,
    /// Cancelled when the node drains its clients: a child of `shutdown`, or cancelled by
    /// [`Node::start_drain`] (`POST /admin/drain`); [`Node::end_drain`] puts a fresh one in.
    drain: std::sync::Mutex<CancellationToken>,
    tracker: TaskTracker,
    /// Open TCP connections per source address.
    per_ip: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// Permits for history reads running at once (`limits.history_reads`).
    history_reads: Arc<tokio::sync::Semaphore>,
    /// The memory history reads and replays may hold, in KiB (`limits.history_read_bytes`).
    read_bytes: Arc<tokio::sync::Semaphore>,
    /// The open HTTP sessions, by id.
    http_sessions: crate::session::http::Registry,
    /// HTTP API publish buckets per caller (`limits.http_publish_rate`), and per caller and
    /// namespace for namespaces with a rate of their own.
    #[allow(clippy::type_complexity)]
    http_publishes:
        std::sync::Mutex<std::collections::HashMap<(String, Option<usize>), TokenBucket>>,
    /// When the node started (readiness waits at most `backbone.ready_wait` from here).
    started: std::time::Instant,
    /// Set once the node was ready: it stays ready until it shuts down.
    ready: std::sync::atomic::AtomicBool,
    /// Prometheus metrics (`/metrics`).
    metrics: Arc<crate::metrics::Metrics>,
}

/// What a history read holds: a slot among `limits.history_reads` (while it reads the
/// disk) and its share of `limits.history_read_bytes` (until its page is written).
#[derive(Debug)]
pub struct ReadPermit {
    /// The read slot.
    pub count: tokio::sync::OwnedSemaphorePermit,
    /// The memory budget.
    pub bytes: tokio::sync::OwnedSemaphorePermit,
}

/// Whether the node serves clients with everything its peers had for it (`/readyz`).
#[derive(Debug, Clone)]
pub struct Readiness {
    /// Ready for traffic.
    pub ready: bool,
    /// Why not, or how it became ready.
    pub reason: &'static str,
    /// The backbone's peers: (node id, link up, caught up with).
    pub peers: Vec<(String, bool, bool)>,
}

/// Callers whose HTTP publish buckets are kept before idle (full) buckets are dropped.
const HTTP_CALLERS: usize = 10_000;

impl Node {
    /// Builds the node state. With a history `store`, channel positions keep the log epoch
    /// stored there (so offsets continue across restarts); the origin epoch of the
    /// backbone is always this start's.
    pub fn new(
        settings: Settings,
        shutdown: CancellationToken,
        store: Option<crate::store::Store>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Arc<Self>, crate::store::StoreError> {
        let limits = &settings.config.limits;
        let history_reads = limits.history_reads;
        let read_kib = (limits.history_read_bytes / 1024).clamp(1, u32::MAX as usize);
        let hub_limits = HubLimits {
            dedupe_ids: limits.dedupe_ids_per_channel,
            dedupe_window: limits.dedupe_window,
            max_channels: limits.max_channels,
            order_wait: settings
                .config
                .backbone
                .as_ref()
                .map_or_else(crate::config::default_order_wait, |b| b.order_wait),
        };
        // The start time in microseconds: it grows across restarts (peers tell a restart
        // without log by a newer epoch) and stays below 2^53 for JavaScript clients.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        // With a data directory the epoch also grows when the clock went back.
        let epoch = Epoch(match &store {
            Some(s) => s.start_epoch(now)?,
            None => now,
        });
        let log_epoch = match &store {
            Some(s) => Epoch(s.epoch_or(epoch.0)?),
            None => epoch,
        };
        let mut hub = Hub::new(settings.node.clone(), epoch, log_epoch, hub_limits, store);
        hub.replication_lag = metrics.replication_lag();
        let p = &settings.config.presence;
        let batching = crate::presence::Batching {
            over: p.batch_over,
            page_size: p.page_size,
            // Room for the frame's other fields.
            budget: settings.config.limits.max_frame_bytes.saturating_sub(512),
        };
        let presence =
            Arc::new(crate::presence::PresenceHub::new(settings.node.clone(), epoch, batching));
        Ok(Arc::new(Self {
            settings,
            hub,
            presence,
            connections: AtomicUsize::new(0),
            next_connection: AtomicU64::new(1),
            drain: std::sync::Mutex::new(shutdown.child_token()),
            shutdown,
            tracker: TaskTracker::new(),
            per_ip: std::sync::Mutex::new(std::collections::HashMap::new()),
            http_publishes: std::sync::Mutex::new(std::collections::HashMap::new()),
            http_sessions: crate::session::http::Registry::default(),
            history_reads: Arc::new(tokio::sync::Semaphore::new(history_reads)),
            read_bytes: Arc::new(tokio::sync::Semaphore::new(read_kib)),
            started: std::time::Instant::now(),
            ready: std::sync::atomic::AtomicBool::new(false),
            metrics,
        }))
    }

    /// Whether the node is ready for traffic. After a start it waits until it caught up
    /// with every peer (the link is up and the peer's catch-up after it acknowledged) or
    /// `backbone.ready_wait` passed (a peer that stays unreachable delays readiness that
    /// long); from then on it is ready until it shuts down. A node without a backbone is
    /// ready at once.
    pub fn readiness(&self) -> Readiness {
        let peers: Vec<_> = self.hub.backbone().map(|b| b.peers()).unwrap_or_default();
        let listed = peers.iter().map(|p| (p.peer.to_string(), p.up, p.caught_up)).collect();
        if self.shutdown.is_cancelled() {
            return Readiness { ready: false, reason: "shutting down", peers: listed };
        }
        if self.is_draining() {
            return Readiness { ready: false, reason: "draining", peers: listed };
        }
        let ready = |reason| Readiness { ready: true, reason, peers: listed.clone() };
        if self.ready.load(Ordering::Relaxed) {
            // Ready stays ready (local clients are served whatever the backbone does); the
            // reason tells how far the backbone reaches now.
            let linked = peers.iter().filter(|p| p.up).count();
            return ready(match linked {
                _ if peers.is_empty() => "ready",
                n if n == peers.len() => "ready",
                0 => "ready: no peer reachable; serving local clients",
                _ => "ready: some peers unreachable",
            });
        }
        let Some(b) = self.settings.config.backbone.as_ref() else {
            self.ready.store(true, Ordering::Relaxed);
            return ready("ready: no backbone");
        };
        if peers.iter().all(|p| p.caught_up) {
            self.ready.store(true, Ordering::Relaxed);
            return ready("ready: caught up with every peer");
        }
        if self.started.elapsed() >= b.ready_wait {
            self.ready.store(true, Ordering::Relaxed);
            return ready("ready: backbone.ready_wait passed before every peer caught up");
        }
        Readiness { ready: false, reason: "catching up with peers", peers: listed }
    }

    /// Validated settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Who is on which channel.
    pub fn presence(&self) -> &Arc<crate::presence::PresenceHub> {
        &self.presence
    }

    /// The channel hub.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Cancelled when the node shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Cancelled when the node drains its clients (at shutdown, or by
    /// [`Node::start_drain`]): sessions tell their clients to go elsewhere and close.
    pub fn drain_token(&self) -> CancellationToken {
        self.drain.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the node drains: new client connections are refused (503) and `/readyz`
    /// answers 503 `draining`.
    pub fn is_draining(&self) -> bool {
        self.shutdown.is_cancelled() || self.drain_token().is_cancelled()
    }

    /// Why sessions end when [`Node::drain_token`] fires (the `draining` frame's reason).
    pub fn drain_reason(&self) -> &'static str {
        if self.shutdown.is_cancelled() { "node shutting down" } else { "node draining" }
    }

    /// Drains the node without stopping it (`POST /admin/drain`): every session gets a
    /// `draining` frame and is closed `timeouts.drain` later; new connections are refused
    /// until [`Node::end_drain`]. Returns false when it was draining already.
    pub fn start_drain(&self) -> bool {
        let token = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        let was = token.is_cancelled();
        token.cancel();
        !was
    }

    /// Takes clients again after [`Node::start_drain`] (`DELETE /admin/drain`). Returns
    /// false when the node was not draining, or shuts down (that drain cannot end).
    pub fn end_drain(&self) -> bool {
        let mut token = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        if self.shutdown.is_cancelled() || !token.is_cancelled() {
            return false;
        }
        *token = self.shutdown.child_token();
        true
    }

    /// The open HTTP sessions (see `crate::session::http`).
    pub fn http_sessions(&self) -> &crate::session::http::Registry {
        &self.http_sessions
    }

    /// Tracks every connection task, so shutdown can wait for them.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Open client sessions (WebSocket, HTTP and SSE).
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Reserves a connection slot for a connection over `transport`, or `None` at
    /// `limits.max_connections`.
    pub fn admit(self: &Arc<Self>, transport: crate::metrics::Transport) -> Option<Admission> {
        let max = self.settings.config.limits.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()?;
        let id = ConnectionId(self.next_connection.fetch_add(1, Ordering::Relaxed));
        self.metrics.opened(transport);
        Some(Admission { node: self.clone(), id, transport })
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The metrics in the Prometheus text format, with what the node knows read now.
    pub fn render_metrics(&self) -> String {
        let backbone = self.hub.backbone();
        let states = backbone.map(|b| b.peers()).unwrap_or_default();
        let peers = backbone
            .map(|b| b.peer_stats())
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let state = states.iter().find(|s| s.peer.to_string() == p.peer);
                crate::metrics::PeerSnapshot {
                    up: state.is_some_and(|s| s.up),
                    caught_up: state.is_some_and(|s| s.caught_up),
                    rtt_seconds: p.rtt.as_secs_f64(),
                    frames_sent: p.frames_sent,
                    frames_received: p.frames_received,
                    bytes_sent: p.bytes_sent,
                    bytes_received: p.bytes_received,
                    frames_dropped: p.frames_dropped,
                    unacknowledged: state.map_or(0, |s| s.unacknowledged),
                    retransmitted: state.map_or(0, |s| s.retransmitted),
                    peer: p.peer,
                }
            })
            .collect();
        let snapshot = crate::metrics::Snapshot {
            channels: self.hub.channel_count(),
            history_log_bytes: self
                .hub
                .store()
                .and_then(|s| std::fs::metadata(s.path()).ok())
                .map(|m| m.len()),
            peers,
            subscriptions: self.hub.subscription_count(),
        };
        self.metrics.render(&snapshot)
    }
}

impl Node {
    /// Permits to run one history read that may hold `bytes` in memory, or `None` when
    /// `limits.history_reads` run already or `limits.history_read_bytes` are held.
    pub fn history_read(&self, bytes: usize) -> Option<ReadPermit> {
        let count = self.history_reads.clone().try_acquire_owned().ok()?;
        let bytes = self.read_bytes.clone().try_acquire_many_owned(self.kib(bytes)).ok()?;
        Some(ReadPermit { count, bytes })
    }

    /// [`Node::history_read`], waiting for the permits (replays are never refused for load).
    pub async fn history_read_wait(&self, bytes: usize) -> Option<ReadPermit> {
        let count = self.history_reads.clone().acquire_owned().await.ok()?;
        let bytes = self.read_bytes.clone().acquire_many_owned(self.kib(bytes)).await.ok()?;
        Some(ReadPermit { count, bytes })
    }

    /// `bytes` in the read budget's units (KiB), at most the whole budget.
    fn kib(&self, bytes: usize) -> u32 {
        let whole = self.settings.config.limits.history_read_bytes / 1024;
        u32::try_from(bytes.div_ceil(1024).clamp(1, whole.max(1))).unwrap_or(u32::MAX)
    }

    /// Takes an HTTP publish token for `caller` (an API key, a token's subject, or one
    /// bucket shared by anonymous callers in dev mode) on `channel`: from the caller's
    /// bucket for the channel's namespace when it has a rate of its own, else from the
    /// caller's bucket (`limits.http_publish_rate`) — as a WebSocket connection takes its
    /// namespace's token instead of its own. Otherwise says how long to wait, and the rate
    /// that refused.
    pub fn take_http_publish(
        &self,
        caller: &str,
        channel: &str,
    ) -> Result<(), (std::time::Duration, u32)> {
        let limits = &self.settings.config.limits;
        let now = std::time::Instant::now();
        let mut buckets =
            self.http_publishes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut take = |key: (String, Option<usize>), rate: u32, burst: u32| {
            if !buckets.contains_key(&key) && buckets.len() >= HTTP_CALLERS {
                // Idle callers (full buckets) are forgotten: they would start full anyway.
                buckets.retain(|_, b| !b.is_full(now));
            }
            let bucket = buckets.entry(key).or_insert_with(|| TokenBucket::new(rate, burst));
            bucket.take(now).map_err(|wait| (wait, rate))
        };
        let namespace = limits.namespace_index(channel).and_then(|i| {
            let ns = &limits.namespaces[i];
            Some((i, ns.publish_rate?, ns.publish_burst.or(ns.publish_rate)?))
        });
        match namespace {
            Some((i, rate, burst)) => take((caller.to_owned(), Some(i)), rate, burst),
            None => {
                take((caller.to_owned(), None), limits.http_publish_rate, limits.http_publish_burst)
            }
        }
    }

    /// Counts a TCP connection from `ip`, or `None` at `limits.max_connections_per_ip`.
    pub fn open_from(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<IpSlot> {
        let max = self.settings.config.limits.max_connections_per_ip;
        let mut map = self.per_ip.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot { node: self.clone(), ip })
    }
}

/// One TCP connection counted against its source address; released on drop.
#[derive(Debug)]
pub struct IpSlot {
    node: Arc<Node>,
    ip: std::net::IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.node.per_ip.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A reserved connection slot; released on drop.
#[derive(Debug)]
pub struct Admission {
    node: Arc<Node>,
    /// The connection's id.
    pub id: ConnectionId,
    transport: crate::metrics::Transport,
}

impl Admission {
    /// The node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.node.connections.fetch_sub(1, Ordering::AcqRel);
        self.node.metrics.closed(self.transport);
    }
}
