//! The QUIC shell around the replication core: mutual-TLS links to every peer, a control
//! lane and a few data lanes per link (a channel always on the same lane), and one driver
//! task that moves frames, link events and time into the [`Replica`] and its output out.
//!
//! ```text
//!  Backbone::publish ──▶ Mutex<Replica> ◀── driver task ◀── link readers (per stream)
//!                              │ poll_transmit          ◀── link up / down
//!                              ▼                         ◀── timer
//!                     lane queues (bounded) ──▶ writer tasks ──▶ QUIC uni streams
//!                              │ poll_event
//!                              ▼
//!                         Sink (the edge hub)
//! ```
//!
//! Overflow policy: a lane queue that is full drops the frame. That is safe by design: the
//! core retransmits anything unacknowledged, and a slow link costs retransmissions, never
//! unbounded memory. Inbound frames wait for room in the driver's queue, which pushes back
//! on the peer through QUIC flow control.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tern_proto::types::{ChannelName, Epoch, NodeId, Seq};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::certs::{self, CertError, TlsFiles};
use crate::core::{self, Event, Frame, MemberKey, Presence, PresenceEvent, PresenceFrame, Replica};
use crate::wire;

/// A peer node.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its node id.
    pub id: NodeId,
    /// Its backbone address, `host:port`: an IP address, or a DNS name resolved again at
    /// every dial (a Kubernetes pod or a container that came back with another address is
    /// found under its name).
    pub addr: String,
}

/// Backbone settings.
#[derive(Debug, Clone)]
pub struct BackboneConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The other nodes.
    pub peers: Vec<Peer>,
    /// TLS material.
    pub tls: TlsFiles,
    /// Data lanes per link (plus one control lane).
    pub lanes: usize,
    /// Frames queued per lane before new ones are dropped (and later retransmitted).
    pub lane_queue: usize,
    /// Replication settings.
    pub core: core::Config,
    /// Presence replication settings.
    pub presence: core::PresenceConfig,
}

/// Where replicated messages go (the edge's channel hub).
pub trait Sink: Send + Sync + 'static {
    /// A message from another origin, in that origin's order.
    fn deliver(
        &self,
        origin: &NodeId,
        channel: &ChannelName,
        epoch: Epoch,
        seq: Seq,
        payload: Bytes,
    );
    /// Every reachable peer confirmed this node's new interest in `channel` (see
    /// [`Backbone::add_interest`]).
    fn ready(&self, channel: &ChannelName);
    /// A hole that cannot be repaired.
    fn discontinuity(
        &self,
        origin: &NodeId,
        channel: &ChannelName,
        epoch: Epoch,
        after: Seq,
        through: Option<Seq>,
    );
    /// A node of another region acknowledged this node's messages of `channel` up to `seq`.
    fn replicated(&self, channel: &ChannelName, seq: Seq) {
        let _ = (channel, seq);
    }
    /// A member entered, changed or left: one of this node's own (made through
    /// [`Backbone::with_presence`]) or a peer's.
    ///
    /// Called with the presence state locked, so that events reach their watchers in the
    /// order of the changes, with nothing between a snapshot read under that lock (see
    /// [`Backbone::with_presence`]) and the events after it: it must not block, nor take a
    /// lock that is held while calling into the backbone.
    /// `members`: how many members the event's channel has now.
    fn presence(&self, event: PresenceEvent, members: usize) {
        let _ = (event, members);
    }
    /// `peer` asks for the newest message of this node's `channel` it sequenced: answer with
    /// [`Backbone::answer_head`].
    fn head_requested(&self, peer: &NodeId, channel: &ChannelName, nonce: u64) {
        let _ = (peer, channel, nonce);
    }
    /// `origin`'s `epoch` of `channel` ended, every message of it delivered (see
    /// [`Event::EpochEnded`]).
    fn epoch_ended(&self, origin: &NodeId, channel: &ChannelName, epoch: Epoch) {
        let _ = (origin, channel, epoch);
    }
}

/// Why the backbone could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// TLS material could not be loaded.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The QUIC crypto configuration was refused.
    #[error("quic tls: {0}")]
    Quic(String),
}

struct Shared {
    replica: Mutex<Replica>,
    /// Locked after `replica` when both are held.
    presence: Mutex<Presence>,
    wake: Notify,
    /// Per configured peer: traffic counters (for metrics), fixed at start.
    stats: HashMap<NodeId, Arc<PeerCounters>>,
}

/// Traffic with one peer since the start (atomics: counted on the frame path, read by
/// metrics scrapes).
#[derive(Debug, Default)]
struct PeerCounters {
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
    frames_dropped: AtomicU64,
    /// QUIC round-trip time, microseconds (0: no link yet).
    rtt_micros: AtomicU64,
}

/// Traffic with one backbone peer since the node started (see [`Backbone::peer_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer.
    pub peer: String,
    /// Frames sent to it (messages, acks, repairs, presence).
    pub frames_sent: u64,
    /// Bytes of those frames.
    pub bytes_sent: u64,
    /// Frames received from it.
    pub frames_received: u64,
    /// Bytes of those frames.
    pub bytes_received: u64,
    /// Frames to it dropped on a full lane queue (the core retransmits them).
    pub frames_dropped: u64,
    /// The link's QUIC round-trip time (zero before the first link).
    pub rtt: Duration,
}

/// A running backbone.
#[derive(Clone)]
pub struct Backbone {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl std::fmt::Debug for Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backbone").field("addr", &self.addr).finish()
    }
}

enum LinkEvent {
    Up {
        peer: NodeId,
        conn: usize,
        lanes: Vec<mpsc::Sender<Bytes>>,
        quic: quinn::Connection,
    },
    Down {
        peer: NodeId,
        conn: usize,
    },
    /// The revocation list changed: close links whose peer certificate has one of these
    /// serial numbers.
    Revoked(std::collections::HashSet<Vec<u8>>),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Re-reads the revocation list every [`CRL_RELOAD`]; when its content changed, new
/// handshakes use it and links to peers it revokes close. A list that no longer loads is
/// reported and the previous one stays in force.
struct CrlWatch {
    files: TlsFiles,
    transport: Arc<quinn::TransportConfig>,
    endpoint: quinn::Endpoint,
    client: Arc<Mutex<quinn::ClientConfig>>,
    events: mpsc::Sender<LinkEvent>,
}

impl CrlWatch {
    async fn run(self, shutdown: CancellationToken) {
        let Some(path) = self.files.crl.clone() else { return };
        let mut last = std::fs::read(&path).ok();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(CRL_RELOAD) => {}
            }
            let now = std::fs::read(&path).ok();
            if now == last {
                continue;
            }
            last = now;
            let reloaded = quic_configs(&self.files, &self.transport)
                .and_then(|c| Ok((c, certs::revoked(&path)?)));
            match reloaded {
                Ok(((server, client), revoked)) => {
                    self.endpoint.set_server_config(Some(server));
                    *lock(&self.client) = client;
                    info!(path = %path.display(), revoked = revoked.len(), "revocation list reloaded");
                    if self.events.send(LinkEvent::Revoked(revoked)).await.is_err() {
                        return;
                    }
                }
                Err(e) => warn!(
                    path = %path.display(),
                    error = %e,
                    "cannot reload the revocation list; the previous one stays in force"
                ),
            }
        }
    }
}

/// How often a node re-reads its certificate revocation list (`TlsFiles::crl`). A changed
/// list applies to new handshakes, and links to peers it revokes are closed.
pub const CRL_RELOAD: Duration = Duration::from_secs(5);

/// QUIC server and client configurations from the node's TLS material.
fn quic_configs(
    files: &TlsFiles,
    transport: &Arc<quinn::TransportConfig>,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), BackboneError> {
    let (server_tls, client_tls) = certs::tls_configs(files)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server_tls).map_err(|e| BackboneError::Quic(e.to_string()))?,
    ));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls).map_err(|e| BackboneError::Quic(e.to_string()))?,
    ));
    client.transport_config(transport.clone());
    Ok((server, client))
}

impl Backbone {
    /// Starts the backbone for node `me` in `epoch`, from what its durable log holds
    /// (`restored`, see [`Replica::restore`]; empty for a node without one). Tasks run on
    /// `tracker` until `shutdown` is cancelled.
    pub fn start(
        me: NodeId,
        epoch: Epoch,
        restored: core::Restored,
        config: BackboneConfig,
        sink: Arc<dyn Sink>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Self, BackboneError> {
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_millis(500)));
        transport.max_idle_timeout(Some(Duration::from_secs(3).try_into().expect("small")));
        let transport = Arc::new(transport);
        let (server, client) = quic_configs(&config.tls, &transport)?;
        let endpoint = quinn::Endpoint::server(server, config.listen)
            .map_err(|source| BackboneError::Bind { addr: config.listen, source })?;
        let addr = endpoint.local_addr().unwrap_or(config.listen);
        // Dialers read the current client configuration at each attempt: a reloaded
        // revocation list replaces it.
        let client = Arc::new(Mutex::new(client));

        let peer_ids: Vec<NodeId> = config.peers.iter().map(|p| p.id.clone()).collect();
        let replica = Replica::restore(me.clone(), epoch, &peer_ids, config.core.clone(), restored);
        let presence = Presence::new(me.clone(), epoch, &peer_ids, config.presence.clone());
        let stats = peer_ids.iter().map(|p| (p.clone(), Arc::default())).collect();
        let shared = Arc::new(Shared {
            replica: Mutex::new(replica),
            presence: Mutex::new(presence),
            wake: Notify::new(),
            stats,
        });
        // Inbound frames from every link; full means the driver is behind, and readers wait.
        let (inbound_tx, inbound_rx) = mpsc::channel(8192);
        // Link up/down events; few and small.
        let (link_tx, link_rx) = mpsc::channel(256);
        if config.tls.crl.is_some() {
            let watch = CrlWatch {
                files: config.tls.clone(),
                transport,
                endpoint: endpoint.clone(),
                client: client.clone(),
                events: link_tx.clone(),
            };
            tracker.spawn(watch.run(shutdown.clone()));
        }
        let ctx = LinkCtx {
            stats: shared.stats.clone(),
            client,
            inbound: inbound_tx,
            events: link_tx,
            lanes: config.lanes.max(1),
            queue: config.lane_queue.max(16),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        };

        let span = info_span!("backbone", node = %me);
        tracker.spawn(
            drive(shared.clone(), inbound_rx, link_rx, sink, shutdown.clone())
                .instrument(span.clone()),
        );
        // Full mesh: the smaller node id dials, the larger accepts.
        for peer in config.peers.iter().filter(|p| p.id > me) {
            tracker
                .spawn(dial(endpoint.clone(), peer.clone(), ctx.clone()).instrument(span.clone()));
        }
        let expected: Vec<NodeId> =
            config.peers.iter().filter(|p| p.id < me).map(|p| p.id.clone()).collect();
        tracker.spawn(accept(endpoint, expected, ctx).instrument(span));
        info!(%addr, "backbone listening");
        Ok(Self { shared, addr })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Own messages that reachable peers want and have not acknowledged yet.
    pub fn unacknowledged(&self) -> u64 {
        lock(&self.shared.replica).unacknowledged()
    }

    /// The peers this node has a link with now.
    pub fn linked_peers(&self) -> Vec<NodeId> {
        lock(&self.shared.replica).linked()
    }

    /// Runs `f` on the presence state, locked (events a change makes can be taken there
    /// with [`Presence::poll_event`]; the driver hands those left to [`Sink::presence`]),
    /// then wakes the driver to replicate what changed.
    pub fn with_presence<R>(&self, f: impl FnOnce(&mut Presence) -> R) -> R {
        let out = f(&mut lock(&self.shared.presence));
        self.shared.wake.notify_one();
        out
    }

    /// Every member of `channel` this node knows of, with the node that owns it.
    pub fn presence_members(&self, channel: &ChannelName) -> Vec<(NodeId, MemberKey, Bytes)> {
        lock(&self.shared.presence).members(channel)
    }

    /// Replicates a local publish the node sequenced as `seq` (see [`Replica::publish`]).
    pub fn publish(&self, channel: ChannelName, seq: Seq, payload: Bytes) {
        lock(&self.shared.replica).publish(Instant::now(), channel, seq, payload);
        self.shared.wake.notify_one();
    }

    /// Where this node is in `origin`'s stream of `channel` (see [`Replica::stream`]).
    pub fn stream(&self, origin: &NodeId, channel: &ChannelName) -> Option<core::StreamPos> {
        lock(&self.shared.replica).stream(origin, channel)
    }

    /// Whether this node has everything `peer` had for it when their link came up (see
    /// [`Replica::caught_up_with`]).
    pub fn caught_up_with(&self, peer: &NodeId) -> bool {
        lock(&self.shared.replica).caught_up_with(peer)
    }

    /// Asks `origin` for the newest message of its `channel` (see
    /// [`Replica::request_head`]); returns the nonce.
    pub fn request_head(&self, origin: &NodeId, channel: &ChannelName) -> u64 {
        let nonce = lock(&self.shared.replica).request_head(Instant::now(), origin, channel);
        self.shared.wake.notify_one();
        nonce
    }

    /// The answer to the question `nonce`, once it came.
    pub fn head(&self, nonce: u64) -> Option<(Epoch, Seq)> {
        lock(&self.shared.replica).head(nonce)
    }

    /// Forgets the question `nonce`.
    pub fn forget_head(&self, nonce: u64) {
        lock(&self.shared.replica).forget_head(nonce);
    }

    /// Answers a peer's question about `channel` (see [`Sink::head_requested`]).
    pub fn answer_head(&self, peer: &NodeId, channel: ChannelName, nonce: u64, head: (Epoch, Seq)) {
        lock(&self.shared.replica).answer_head(peer, channel, nonce, head.0, head.1);
        self.shared.wake.notify_one();
    }

    /// The last message of `channel` in this node's past epoch (see [`Replica::past_head`]).
    pub fn past_head(&self, channel: &ChannelName) -> Option<(Epoch, Seq)> {
        lock(&self.shared.replica).past_head(channel)
    }

    /// Every peer link's state (see [`Replica::peers`]).
    pub fn peers(&self) -> Vec<core::PeerState> {
        lock(&self.shared.replica).peers(Instant::now())
    }

    /// Traffic with each configured peer since the start, and the link's round-trip time.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        let mut all: Vec<PeerStats> = self
            .shared
            .stats
            .iter()
            .map(|(peer, c)| PeerStats {
                peer: peer.to_string(),
                frames_sent: c.frames_sent.load(Ordering::Relaxed),
                bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
                frames_received: c.frames_received.load(Ordering::Relaxed),
                bytes_received: c.bytes_received.load(Ordering::Relaxed),
                frames_dropped: c.frames_dropped.load(Ordering::Relaxed),
                rtt: Duration::from_micros(c.rtt_micros.load(Ordering::Relaxed)),
            })
            .collect();
        all.sort_by(|a, b| a.peer.cmp(&b.peer));
        all
    }
}

impl Backbone {
    /// A local subscriber needs `channel`: ask the peers for it. Returns true when it
    /// already flows (or goes to every node anyway); otherwise [`Sink::ready`] follows once
    /// the reachable peers confirmed, or after the core's `interest_wait`.
    pub fn add_interest(&self, channel: &ChannelName) -> bool {
        let ready = lock(&self.shared.replica).add_interest(Instant::now(), channel);
        self.shared.wake.notify_one();
        ready
    }

    /// The last local subscriber of `channel` left: withdraw after the grace period.
    pub fn remove_interest(&self, channel: &ChannelName) {
        lock(&self.shared.replica).remove_interest(Instant::now(), channel);
        self.shared.wake.notify_one();
    }
}

#[derive(Clone)]
struct LinkCtx {
    /// Per peer traffic counters (bytes received are counted by the link's readers).
    stats: HashMap<NodeId, Arc<PeerCounters>>,
    /// The QUIC client configuration dialers use (replaced when the revocation list changes).
    client: Arc<Mutex<quinn::ClientConfig>>,
    inbound: mpsc::Sender<(NodeId, Frame)>,
    events: mpsc::Sender<LinkEvent>,
    lanes: usize,
    queue: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// Queues an encoded frame on a lane, counting it for the peer; false when the lane was
/// full (the frame is dropped; the core retransmits what needs it).
fn send_counted(shared: &Shared, peer: &NodeId, lane: &mpsc::Sender<Bytes>, bytes: Bytes) -> bool {
    let len = bytes.len() as u64;
    let sent = lane.try_send(bytes).is_ok();
    if let Some(c) = shared.stats.get(peer) {
        if sent {
            c.frames_sent.fetch_add(1, Ordering::Relaxed);
            c.bytes_sent.fetch_add(len, Ordering::Relaxed);
        } else {
            c.frames_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
    sent
}

fn lane_of(frame: &Frame, lanes: usize) -> usize {
    let channel = match frame {
        Frame::Hello { .. }
        | Frame::Heartbeat { .. }
        | Frame::Presence(PresenceFrame::Digest { .. }) => return 0,
        Frame::Presence(
            PresenceFrame::Delta { channel, .. }
            | PresenceFrame::State { channel, .. }
            | PresenceFrame::StateRequest { channel },
        ) => channel,
        Frame::Data { channel, .. }
        | Frame::End { channel, .. }
        | Frame::HeadRequest { channel, .. }
        | Frame::Head { channel, .. }
        | Frame::Ack { channel, .. }
        | Frame::Nack { channel, .. }
        | Frame::Gone { channel, .. }
        | Frame::Interest { channel, .. }
        | Frame::Start { channel, .. } => channel,
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    channel.hash(&mut h);
    1 + (h.finish() as usize) % lanes
}

async fn drive(
    shared: Arc<Shared>,
    mut inbound: mpsc::Receiver<(NodeId, Frame)>,
    mut links: mpsc::Receiver<LinkEvent>,
    sink: Arc<dyn Sink>,
    shutdown: CancellationToken,
) {
    let mut writers: HashMap<NodeId, (usize, Vec<mpsc::Sender<Bytes>>)> = HashMap::new();
    // Each link's QUIC connection, for its round-trip time (the core's retransmission timers
    // scale with it).
    let mut quic: HashMap<NodeId, quinn::Connection> = HashMap::new();
    let mut rtt_at = Instant::now();
    let mut dropped = 0u64;
    // When each peer was last heard from: a peer's members count as down from then, not
    // from when QUIC gave up on the link (its idle timeout later).
    let mut heard: HashMap<NodeId, Instant> = HashMap::new();
    loop {
        let deadline = lock(&shared.replica).poll_timeout();
        let deadline = match (deadline, lock(&shared.presence).poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let mut batch = Vec::new();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.wake.notified() => {}
            Some(first) = inbound.recv() => {
                batch.push(first);
                while batch.len() < 1024 {
                    match inbound.try_recv() {
                        Ok(f) => batch.push(f),
                        Err(_) => break,
                    }
                }
            }
            Some(ev) = links.recv() => {
                let now = Instant::now();
                let mut r = lock(&shared.replica);
                match ev {
                    LinkEvent::Up { peer, conn, lanes, quic: q } => {
                        info!(%peer, "link up");
                        r.set_link_rtt(&peer, q.rtt());
                        if let Some(c) = shared.stats.get(&peer) {
                            c.rtt_micros.store(q.rtt().as_micros() as u64, Ordering::Relaxed);
                        }
                        // One connection per peer: a newer one (the peer restarted, or
                        // redialled before this side noticed the old one die) replaces the
                        // older, which is closed, so its dialer redials instead of talking
                        // into a connection this side no longer writes to.
                        if let Some(old) = quic.insert(peer.clone(), q) {
                            if old.stable_id() != conn {
                                old.close(3u32.into(), b"replaced by a newer connection");
                            }
                        }
                        writers.insert(peer.clone(), (conn, lanes));
                        heard.insert(peer.clone(), now);
                        r.handle_link_up(now, &peer);
                        lock(&shared.presence).handle_link_up(now, &peer);
                    }
                    LinkEvent::Revoked(serials) => {
                        for (peer, q) in &quic {
                            let serial = peer_leaf(q).and_then(|c| certs::serial_of(&c));
                            if serial.is_some_and(|s| serials.contains(&s)) {
                                warn!(%peer, "closing the link: the peer's certificate was revoked");
                                q.close(4u32.into(), b"certificate revoked");
                            }
                        }
                    }
                    LinkEvent::Down { peer, conn } => {
                        if writers.get(&peer).is_some_and(|(c, _)| *c == conn) {
                            info!(%peer, "link down");
                            writers.remove(&peer);
                            quic.remove(&peer);
                            r.handle_link_down(now, &peer);
                            let since = heard.get(&peer).copied().unwrap_or(now).min(now);
                            lock(&shared.presence).handle_link_down(since, &peer);
                        }
                    }
                }
            }
            _ = sleep => {}
        }
        let mut events = Vec::new();
        {
            let now = Instant::now();
            let mut r = lock(&shared.replica);
            if now.duration_since(rtt_at) >= Duration::from_millis(100) {
                rtt_at = now;
                for (peer, q) in &quic {
                    r.set_link_rtt(peer, q.rtt());
                    if let Some(c) = shared.stats.get(peer) {
                        c.rtt_micros.store(q.rtt().as_micros() as u64, Ordering::Relaxed);
                    }
                }
            }
            let received = !batch.is_empty();
            let mut p = lock(&shared.presence);
            for (from, frame) in batch {
                if let Some(c) = shared.stats.get(&from) {
                    c.frames_received.fetch_add(1, Ordering::Relaxed);
                }
                match heard.get_mut(&from) {
                    Some(at) => *at = now,
                    None => {
                        heard.insert(from.clone(), now);
                    }
                }
                match frame {
                    Frame::Presence(f) => p.handle_frame(now, &from, f),
                    frame => r.handle_frame(now, &from, frame),
                }
            }
            p.handle_timeout(now);
            while let Some((peer, frame)) = p.poll_transmit() {
                let Some((_, lanes)) = writers.get(&peer) else { continue };
                let frame = Frame::Presence(frame);
                let lane = lane_of(&frame, lanes.len() - 1);
                // Dropped when full, like the replica's frames: the next digest repairs it.
                if !send_counted(&shared, &peer, &lanes[lane], wire::encode(&frame)) {
                    dropped += 1;
                }
            }
            // Under the presence lock (see `Sink::presence`).
            while let Some(e) = p.poll_event() {
                let members = p.member_count(&e.channel);
                sink.presence(e, members);
            }
            drop(p);
            if received {
                r.send_acks();
            }
            r.handle_timeout(now);
            while let Some((peer, frame)) = r.poll_transmit() {
                let Some((_, lanes)) = writers.get(&peer) else { continue };
                let lane = lane_of(&frame, lanes.len() - 1);
                if !send_counted(&shared, &peer, &lanes[lane], wire::encode(&frame)) {
                    dropped += 1;
                    if dropped.is_power_of_two() {
                        debug!(%peer, dropped, "lane queue full; frames dropped for retransmission");
                    }
                }
            }
            while let Some(e) = r.poll_event() {
                events.push(e);
            }
        }
        // Outside the replica lock: the sink takes channel locks, and publishes take the
        // replica lock under a channel lock.
        for e in events {
            match e {
                Event::Deliver { origin, channel, epoch, seq, payload } => {
                    sink.deliver(&origin, &channel, epoch, seq, payload)
                }
                Event::Discontinuity { origin, channel, epoch, after, through } => {
                    sink.discontinuity(&origin, &channel, epoch, after, through)
                }
                Event::Ready { channel } => sink.ready(&channel),
                Event::Replicated { channel, seq } => sink.replicated(&channel, seq),
                Event::HeadRequested { peer, channel, nonce } => {
                    sink.head_requested(&peer, &channel, nonce)
                }
                Event::EpochEnded { origin, channel, epoch, .. } => {
                    sink.epoch_ended(&origin, &channel, epoch)
                }
                Event::Started { origin, channel, epoch, after, late } => {
                    if late && after.0 > 0 {
                        warn!(%origin, %channel, %epoch, %after, "stream started after subscribers joined (the origin was unreachable): its messages up to here may be missing");
                    } else {
                        debug!(%origin, %channel, %epoch, %after, "stream started")
                    }
                }
            }
        }
    }
}

async fn dial(endpoint: quinn::Endpoint, peer: Peer, ctx: LinkCtx) {
    let name = certs::node_dns_name(&peer.id);
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    loop {
        if ctx.shutdown.is_cancelled() {
            return;
        }
        let attempt = async {
            let addr = resolve(&endpoint, &peer.addr).await?;
            let config = lock(&ctx.client).clone();
            let connecting =
                endpoint.connect_with(config, addr, &name).map_err(|e| e.to_string())?;
            connecting.await.map_err(|e| e.to_string())
        };
        let conn = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            r = attempt => r,
        };
        match conn {
            Ok(conn) => {
                backoff = Duration::from_millis(100);
                failing = false;
                run_link(conn, peer.id.clone(), &ctx).await;
            }
            Err(e) => {
                // Once per outage at warn (a misspelled name or a closed port shows at the
                // default level), then at debug while it lasts.
                if failing {
                    debug!(peer = %peer.id, error = %e, "dial failed");
                } else {
                    warn!(peer = %peer.id, addr = %peer.addr, error = %e, "cannot reach the peer; retrying");
                }
                failing = true;
            }
        }
        let jitter = Duration::from_millis(u64::from(std::process::id() % 50));
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// A peer's address now: `host:port` resolved (an IP address stays as it is), preferring
/// the family of the endpoint's own socket.
async fn resolve(endpoint: &quinn::Endpoint, addr: &str) -> Result<SocketAddr, String> {
    let lookup = tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(addr));
    let all: Vec<SocketAddr> = lookup
        .await
        .map_err(|_| format!("cannot resolve {addr}: no answer within 5 s"))?
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .collect();
    let v4 = endpoint.local_addr().map_or(true, |a| a.is_ipv4());
    all.iter().find(|a| a.is_ipv4() == v4).copied().ok_or_else(|| {
        let family = if v4 { "IPv4" } else { "IPv6" };
        format!("{addr} resolves to no {family} address (the backbone listens on {family})")
    })
}

async fn accept(endpoint: quinn::Endpoint, expected: Vec<NodeId>, ctx: LinkCtx) {
    loop {
        let incoming = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let expected = expected.clone();
        let ctx2 = ctx.clone();
        ctx.tracker.spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "incoming backbone connection failed");
                    return;
                }
            };
            let peer = peer_leaf(&conn).and_then(|cert| {
                expected.iter().find(|p| certs::cert_names(&cert, p)).cloned()
            });
            match peer {
                Some(peer) => run_link(conn, peer, &ctx2).await,
                None => {
                    warn!(remote = %conn.remote_address(), "refused a backbone peer: its certificate names no expected node");
                    conn.close(1u32.into(), b"unknown node");
                }
            }
        });
    }
    endpoint.close(0u32.into(), b"shutdown");
}

/// The (CA-verified) certificate the peer of `conn` presented.
fn peer_leaf(conn: &quinn::Connection) -> Option<rustls_pki_types::CertificateDer<'static>> {
    let chain =
        conn.peer_identity()?.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok()?;
    chain.into_iter().next()
}

/// Runs one link in its span (`link`, with the peer and the connection's id as fields).
async fn run_link(conn: quinn::Connection, peer: NodeId, ctx: &LinkCtx) {
    let span = info_span!("link", %peer, link = conn.stable_id(), remote = %conn.remote_address());
    link(conn, peer, ctx).instrument(span).await
}

async fn link(conn: quinn::Connection, peer: NodeId, ctx: &LinkCtx) {
    let id = conn.stable_id();
    let mut lanes = Vec::with_capacity(ctx.lanes + 1);
    for _ in 0..=ctx.lanes {
        let (tx, mut rx) = mpsc::channel::<Bytes>(ctx.queue);
        let mut stream = match conn.open_uni().await {
            Ok(s) => s,
            Err(e) => {
                debug!(%peer, error = %e, "cannot open a lane");
                return;
            }
        };
        ctx.tracker.spawn(async move {
            // Coalesce whatever is queued into one stream write (each write takes the QUIC
            // connection's lock and wakes its driver).
            let mut buf = Vec::with_capacity(64 * 1024);
            while let Some(bytes) = rx.recv().await {
                buf.extend_from_slice(&bytes);
                while buf.len() < 64 * 1024 {
                    match rx.try_recv() {
                        Ok(more) => buf.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                if wire::write_frame(&mut stream, &buf).await.is_err() {
                    break;
                }
                buf.clear();
                if buf.capacity() > 256 * 1024 {
                    buf = Vec::with_capacity(64 * 1024);
                }
            }
            let _ = stream.finish();
        });
        lanes.push(tx);
    }
    let up = LinkEvent::Up { peer: peer.clone(), conn: id, lanes, quic: conn.clone() };
    if ctx.events.send(up).await.is_err() {
        return;
    }
    let reader_conn = conn.clone();
    let inbound = ctx.inbound.clone();
    let reader_peer = peer.clone();
    let tracker = ctx.tracker.clone();
    let counters = ctx.stats.get(&peer).cloned();
    let readers = async move {
        while let Ok(stream) = reader_conn.accept_uni().await {
            // Buffered: many frames come from one stream read.
            let mut stream = wire::FrameReader::new(stream);
            let inbound = inbound.clone();
            let peer = reader_peer.clone();
            let conn = reader_conn.clone();
            let counters = counters.clone();
            tracker.spawn(async move {
                let mut counted = 0;
                loop {
                    let next = stream.next().await;
                    if let Some(c) = &counters {
                        let read = stream.bytes_read();
                        c.bytes_received.fetch_add(read - counted, Ordering::Relaxed);
                        counted = read;
                    }
                    match next {
                        Ok(Some(frame)) => {
                            if inbound.send((peer.clone(), frame)).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(wire::WireError::Io(e)) => {
                            debug!(%peer, error = %e, "lane closed");
                            break;
                        }
                        Err(e) => {
                            warn!(%peer, error = %e, "bad backbone frame; closing the link");
                            conn.close(2u32.into(), b"bad frame");
                            break;
                        }
                    }
                }
            });
        }
    };
    tokio::select! {
        _ = readers => {}
        _ = conn.closed() => {}
        _ = ctx.shutdown.cancelled() => conn.close(0u32.into(), b"shutdown"),
    }
    let _ = ctx.events.send(LinkEvent::Down { peer, conn: id }).await;
}
