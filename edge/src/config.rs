//! Node configuration: the TOML file (`tern edge --config FILE`) and its validation.
//!
//! Every option is documented in `deploy/edge.example.toml`. Unknown keys are refused, and
//! values that make no sense (zero limits, a heartbeat longer than the idle timeout) are
//! refused at start-up with the field's name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tern_proto::types::{NameError, NodeId, RegionId, validate_namespace};

/// The configuration file, as written by an operator.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Who this node is.
    pub node: NodeConfig,
    /// Where it listens.
    pub listen: ListenConfig,
    /// Resource limits.
    pub limits: LimitsConfig,
    /// Liveness.
    pub heartbeat: HeartbeatConfig,
    /// Timeouts.
    pub timeouts: TimeoutsConfig,
    /// WebSocket tuning.
    pub websocket: WebSocketConfig,
    /// `[cors]`: which browser origins may use the node (HTTP API and WebSocket alike).
    pub cors: CorsConfig,
    /// Replication to other nodes; absent for a single node.
    pub backbone: Option<BackboneSection>,
    /// `[history]`: durable channel logs for the namespaces listed there.
    pub history: HistoryConfig,
    /// `[[regions]]`: every region's public URL, served at `/v1/regions` so clients can
    /// pick the nearest and fail over to the next. The same list on every node. Empty: the
    /// node lists only itself, at the URL the client used to reach it.
    pub regions: Vec<RegionUrl>,
    /// `[resume]`: how a reconnecting client continues its subscriptions.
    pub resume: ResumeConfig,
    /// `[presence]`: members of channels, across nodes.
    pub presence: PresenceSection,
    /// `[metrics]`: Prometheus metrics at `GET /metrics`.
    pub metrics: MetricsSection,
    /// `[auth]`: who may connect and what they may do (see `crate::auth`).
    pub auth: crate::auth::AuthConfig,
    /// `[tls]`: serve clients over TLS (`wss://`, `https://`) on `listen.client`. Absent:
    /// plain TCP (behind a TLS-terminating proxy, or for development).
    pub tls: Option<TlsSection>,
}

/// `[tls]`: the client listener's certificate. The files are re-read every 5 s: a renewed
/// certificate written over them is served from the next handshake on, with no restart (a
/// pair that does not load is logged and the previous one stays in service).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM file: the certificate chain, leaf first (e.g. from Let's Encrypt: fullchain.pem).
    pub cert: PathBuf,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[resume]`: a client that reconnects (to this node or, after a failover, to any other)
/// presents where it left off; the node replays the missed messages from its log, then goes
/// live. Channels without history can only be told whether something was missed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResumeConfig {
    /// Messages older than this are not replayed: a client away longer gets a discontinuity
    /// for what it missed before and fetches history. Also told to clients in `Connected`.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Most log entries one resume reads to find where a client left off on another node
    /// (bounds the work a resume costs; beyond it the client gets a discontinuity).
    pub max_scan: usize,
    /// Messages read from the log per step of a replay. The next step waits until the
    /// previous one was written to the socket, so a replay never floods the send queue.
    pub page: usize,
    /// Most bytes of messages one replay step (or one page of a resume's backward scan)
    /// reads from the log, whatever `page` says: a connection's replay holds at most this
    /// much at a time.
    pub page_bytes: usize,
}

/// `[metrics]`: Prometheus metrics (`GET /metrics`, text format; the metrics are listed in
/// docs/operations.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Keep metrics and serve `/metrics` (default true). Off, the message path touches no
    /// counter at all and `/metrics` answers 404 (the benchmark's comparison).
    pub enabled: bool,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// `[presence]`: who is on a channel. Each node replicates its own members to its peers
/// (`tern_backbone::core::Presence`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceSection {
    /// A peer unreachable this long has all its members leave on this node (once); when it
    /// comes back, its current members enter again. Shorter outages change nothing.
    #[serde(with = "humantime_serde")]
    pub down_after: Duration,
    /// A connection that ends without leaving keeps its members this long: a client that
    /// reconnects to this node within it (`Connect.recover`) keeps them, and nobody sees
    /// them leave and enter again. Then they leave. The smaller of this and `resume.window`
    /// applies.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Most members one channel's presence set holds (over all nodes, as this node knows
    /// them); an enter beyond it is refused with `CHANNEL_FULL`.
    pub max_members: usize,
    /// Most channels one connection is a member of; beyond it an enter is refused with
    /// `TOO_MANY_CHANNELS`.
    pub max_channels_per_connection: usize,
    /// Largest member data (text or binary), in bytes; beyond it `MESSAGE_TOO_LARGE`.
    pub max_data_bytes: usize,
    /// Presence requests (enter, update, leave, get) per second one connection may make;
    /// beyond it `RATE_LIMITED`.
    pub rate: u32,
    /// The burst of that rate: at least `max_channels_per_connection`, so that a client
    /// that reconnects can enter all its members again at once.
    pub burst: u32,
    /// Most members in one `get` page or snapshot frame, and events in one `presence`
    /// frame (a frame also stays within `limits.max_frame_bytes`).
    pub page_size: usize,
    /// On a channel of more than this many members, events are sent in batches, every
    /// `batch_interval`: one frame with many events instead of a frame each.
    pub batch_over: usize,
    /// How often batched events are sent.
    #[serde(with = "humantime_serde")]
    pub batch_interval: Duration,
    /// Namespaces whose presence the `subscribe` capability may read (events on subscribe
    /// and `get`), not only `presence`; `"*"` for every namespace. Dev mode allows all.
    pub subscribe_reads: Vec<String>,
}

impl Default for PresenceSection {
    fn default() -> Self {
        Self {
            down_after: Duration::from_secs(30),
            grace: Duration::from_secs(15),
            max_members: 100_000,
            max_channels_per_connection: 100,
            max_data_bytes: 1024,
            rate: 20,
            burst: 120,
            page_size: 1000,
            batch_over: 100,
            batch_interval: Duration::from_millis(100),
            subscribe_reads: Vec::new(),
        }
    }
}

impl PresenceSection {
    /// Whether `subscribe` may read the presence of `channel`.
    pub fn subscribe_reads(&self, channel: &str) -> bool {
        let ns = tern_proto::types::namespace_of(channel);
        self.subscribe_reads.iter().any(|n| n == "*" || n == ns)
    }
}

impl Default for ResumeConfig {
    fn default() -> Self {
        Self { window: Duration::from_secs(120), max_scan: 200_000, page: 256, page_bytes: 1 << 20 }
    }
}

/// `[history]`: durable channel logs (see `tern_edge::store`). Nothing is stored, and no
/// data directory is created, unless at least one namespace is listed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Where the log lives (`tern.redb` inside). Relative paths are relative to the working
    /// directory; `tern edge --data-dir` overrides it.
    pub data_dir: PathBuf,
    /// `group`: every group of writes is fsynced before the next (a crash loses at most the
    /// group in flight, which nobody received yet); `interval`: groups are committed without
    /// an fsync and fsynced at most every `sync_interval` (fewer fsyncs; a crash of the
    /// process loses nothing committed, a crash of the machine up to that interval).
    pub sync: SyncMode,
    /// For `sync = "interval"`.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// Writes queued for the log before publishers wait for it.
    pub queue: usize,
    /// `[[history.namespaces]]`: namespaces whose channels are logged, with retention.
    pub namespaces: Vec<HistoryNamespace>,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("tern-data"),
            sync: SyncMode::Group,
            sync_interval: Duration::from_millis(100),
            queue: 65_536,
            namespaces: Vec::new(),
        }
    }
}

/// When history writes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync every group.
    Group,
    /// fsync every `sync_interval`.
    Interval,
}

/// `[[history.namespaces]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryNamespace {
    /// The namespace (channel name up to the first `:`).
    pub name: String,
    /// Messages kept per channel.
    #[serde(default = "default_max_messages")]
    pub max_messages: u64,
    /// Older messages are deleted.
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
}

fn default_max_messages() -> u64 {
    1_000
}
fn default_max_age() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// `[[regions]]`: one region's public client URL.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionUrl {
    /// Region id.
    pub name: String,
    /// Base URL clients connect to: `ws://`, `wss://`, `http://` or `https://`.
    pub url: String,
}

/// `[backbone]`: QUIC links to the other nodes, mutual TLS with the cluster CA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneSection {
    /// UDP address for the backbone.
    #[serde(default = "default_backbone_listen")]
    pub listen: SocketAddr,
    /// Cluster CA certificate (PEM), from `tern certs init`.
    pub ca: PathBuf,
    /// This node's certificate (PEM), from `tern certs node`.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// The cluster CA's certificate revocation list (PEM), from `tern certs revoke`:
    /// peers whose certificates it names are refused, whether they dial or are dialled.
    /// Re-read every 5 s: after revoking a node, copy the new list over this file on every
    /// node; links to the revoked node close and its redials are refused, without a
    /// restart. Default: none.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// Data lanes per link; a channel always uses the same lane.
    #[serde(default = "default_lanes")]
    pub lanes: usize,
    /// Frames queued per lane before new ones are dropped (and retransmitted later).
    #[serde(default = "default_lane_queue")]
    pub lane_queue: usize,
    /// Messages kept per channel for repair and catch-up.
    #[serde(default = "default_retention")]
    pub retention: usize,
    /// Most payload bytes kept for repair and catch-up across all channels together
    /// (memory): past it, the oldest messages go first, and a peer that still needs one
    /// gets a discontinuity, as past `retention`.
    #[serde(default = "default_retention_bytes")]
    pub retention_bytes: usize,
    /// Most messages of one channel in flight to one peer (sent, not yet acknowledged);
    /// more wait in the log and leave as acknowledgements return. One channel's rate to a
    /// peer is at most this many messages per round trip.
    #[serde(default = "default_send_window")]
    pub send_window: usize,
    /// Namespaces replicated to every node whether or not it has subscribers (namespaces
    /// with history, so they are served locally and survive a region loss); `"*"` for every
    /// channel. Other channels go only to nodes that have subscribers. The same list on
    /// every node of the cluster.
    #[serde(default)]
    pub replicate_all: Vec<String>,
    /// How long a node keeps receiving a channel after its last local subscriber left, so a
    /// client that comes back within it misses nothing.
    #[serde(default = "default_interest_grace", with = "humantime_serde")]
    pub interest_grace: Duration,
    /// Longest a first subscriber on this node waits for the peers to confirm the channel
    /// before its `subscribed` reply is sent anyway (a peer that is slow or unreachable
    /// then catches up from its log).
    #[serde(default = "default_interest_wait", with = "humantime_serde")]
    pub interest_wait: Duration,
    /// After a start, longest the node reports not ready (`/readyz` and `/v1/ping` answer
    /// 503) while it catches up with its peers: it is ready once it caught up with every
    /// peer (the link is up and the peer's catch-up acknowledged), or when this much time
    /// passed (so a peer that stays unreachable delays readiness this long).
    #[serde(default = "default_ready_wait", with = "humantime_serde")]
    pub ready_wait: Duration,
    /// Longest a replicated message waits here for its publisher's earlier message from
    /// another node (`after`: the publisher moved) before it is delivered anyway.
    #[serde(default = "default_order_wait", with = "humantime_serde")]
    pub order_wait: Duration,
    /// The other nodes.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
}

/// `[[backbone.peers]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its node id, `region/name`; its certificate must name it.
    pub id: String,
    /// Its backbone address, `host:port`: an IP address, or a DNS name (resolved again at
    /// every dial: a container or pod that came back with another address is found).
    pub addr: String,
}

fn default_backbone_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7401))
}
fn default_lanes() -> usize {
    // Enough that one lossy channel rarely stalls another; each lane is one QUIC stream.
    4
}
fn default_lane_queue() -> usize {
    // Room for a few channels' full send windows per lane.
    16_384
}
fn default_interest_grace() -> Duration {
    Duration::from_secs(120)
}
fn default_interest_wait() -> Duration {
    Duration::from_secs(2)
}
fn default_ready_wait() -> Duration {
    // A restarted node's catch-up after a rolling restart takes well under a second; a
    // peer's backlog after a long partition may take longer, and the node serves anyway.
    Duration::from_secs(10)
}
pub(crate) fn default_order_wait() -> Duration {
    // Covers a restart of the publisher's previous node (about a second) with room; a node
    // down longer costs its publishers' order with it, not availability.
    Duration::from_secs(10)
}
fn default_send_window() -> usize {
    // 8,192 per round trip: 32,000 messages/s of one channel across a 250 ms ocean link;
    // half the lane queue, so one flooded channel cannot fill a lane alone.
    8192
}
fn default_retention_bytes() -> usize {
    // 256 MiB: minutes of a busy node's own publishes; a peer's link is rarely down longer
    // than the resume window.
    256 << 20
}
fn default_retention() -> usize {
    // A few seconds of a busy channel; a peer further behind gets a discontinuity.
    10_000
}

/// `[node]`: identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Region id, e.g. `eu-west`.
    pub region: String,
    /// Node name, unique in its region, e.g. `edge-1`.
    pub name: String,
}

/// `[listen]`: addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Client address: WebSocket `/v1/ws` and the HTTP API.
    pub client: SocketAddr,
    /// Admin address (plain HTTP, no authentication: keep it on loopback or a private
    /// network): `GET /metrics`, `/healthz`, `/readyz`, and `POST`/`DELETE`/`GET
    /// /admin/drain`. Unset (the default): no admin listener, and `/metrics` is served on the
    /// client address instead; set, `/metrics` is served here only.
    pub admin: Option<SocketAddr>,
}

/// `[limits]`: every resource has one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most concurrent WebSocket connections; more get HTTP 503.
    pub max_connections: usize,
    /// Most concurrent TCP connections from one IP address (handshakes included, so a
    /// slow-loris or a flood from one source is cut at the door); more are closed at once.
    pub max_connections_per_ip: usize,
    /// Most channels one connection may be subscribed to.
    pub max_channels_per_connection: usize,
    /// Most channels the node holds (a channel's state lives as long as the node's epoch
    /// once it had a message); beyond it, publishes and subscribes to new channels are
    /// refused with `TOO_MANY_CHANNELS` (existing channels and replication are unaffected).
    pub max_channels: usize,
    /// Largest message payload in bytes; larger publishes are refused (nack / HTTP 413).
    pub max_message_bytes: usize,
    /// Largest WebSocket message in bytes (larger closes the connection with 1009), and
    /// largest HTTP publish body (larger: 413). At least [`min_frame_bytes`] of
    /// `max_message_bytes`. The node's own frames stay within it too (history pages end
    /// early to fit).
    pub max_frame_bytes: usize,
    /// Live messages queued for one connection before it is closed as a slow consumer
    /// (4001). Replays the client asked for do not count (see `crate::fanout`).
    pub send_queue_messages: usize,
    /// Payload bytes of live messages queued for one connection before it is closed as a
    /// slow consumer.
    pub send_queue_bytes: usize,
    /// Client-chosen message ids remembered per channel for de-duplication.
    pub dedupe_ids_per_channel: usize,
    /// How long a client-chosen message id is remembered. Also how long a history channel
    /// with no subscriber and no message keeps its in-memory tail (up to 100 messages, for
    /// rewinds and resumes) before the periodic sweep drops it; the log serves it again.
    #[serde(with = "humantime_serde")]
    pub dedupe_window: Duration,
    /// Publishes per second one connection may make, sustained (a token bucket refilled at
    /// this rate). Beyond it publishes are refused with `RATE_LIMITED` and a
    /// `retry_after_ms`; the connection stays open.
    pub publish_rate: u32,
    /// Publishes one connection may make at once before the rate applies.
    pub publish_burst: u32,
    /// WebSocket frames per second one connection may send, sustained (every frame counts:
    /// publishes, subscribes, pings). Beyond the burst the connection is closed with 4004.
    pub frame_rate: u32,
    /// Frames one connection may send at once before `frame_rate` applies.
    pub frame_burst: u32,
    /// HTTP API publishes per second per caller (API key, token subject; anonymous callers
    /// in dev mode share one bucket), sustained. Beyond it: HTTP 429 with `Retry-After`.
    pub http_publish_rate: u32,
    /// HTTP API publishes one caller may make at once before the rate applies.
    pub http_publish_burst: u32,
    /// History reads (WebSocket and HTTP) the node runs at once; more are refused
    /// (`RATE_LIMITED` / HTTP 503 with `Retry-After`) rather than queued.
    pub history_reads: usize,
    /// History reads one connection may have in flight (read, or waiting to be written to
    /// the socket); more are refused with `RATE_LIMITED`.
    pub history_reads_per_connection: usize,
    /// Most bytes of stored messages one history page holds (HTTP and WebSocket; over the
    /// WebSocket a page also fits `max_frame_bytes`): a page ends early, with the `from` of
    /// the next, rather than grow past it. At least one message whatever its size.
    pub history_page_bytes: usize,
    /// Memory the node's history reads and replays may hold at once, counted as twice a
    /// read's page limit over the WebSocket (the messages and their frame, held until the
    /// frame is written), three times over HTTP (and the JSON document), twice a replay
    /// step's `resume.page_bytes`. Beyond it reads are refused like beyond
    /// `history_reads`; replays wait.
    pub history_read_bytes: usize,
    /// Longest a publish that names the publisher's previous message (`Publish.after`) on
    /// another node waits until this node caught up with that node; then it is refused with
    /// `UNAVAILABLE` (and `retry_after_ms`), and later publishes of the channel on that
    /// connection with it.
    #[serde(with = "humantime_serde")]
    pub publish_order_wait: Duration,
    /// `[[limits.namespaces]]`: limits for the channels of one namespace that differ from
    /// the ones above.
    pub namespaces: Vec<NamespaceLimits>,
}

/// `[[limits.namespaces]]`: one namespace's own limits. Unset values fall back to
/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceLimits {
    /// The namespace (channel name up to the first `:`).
    pub name: String,
    /// Publishes per second one connection may make to this namespace's channels. They are
    /// counted in a bucket of their own, not in the connection's `publish_rate`.
    pub publish_rate: Option<u32>,
    /// The burst of that bucket (default: `publish_rate`).
    pub publish_burst: Option<u32>,
    /// Largest payload on this namespace's channels (at most `limits.max_message_bytes`).
    pub max_message_bytes: Option<usize>,
}

impl LimitsConfig {
    /// The limits of the namespace of `channel`, when it has its own.
    pub fn namespace(&self, channel: &str) -> Option<&NamespaceLimits> {
        self.namespace_index(channel).map(|i| &self.namespaces[i])
    }

    /// Where in `namespaces` the namespace of `channel` is listed, if it is.
    pub fn namespace_index(&self, channel: &str) -> Option<usize> {
        if self.namespaces.is_empty() {
            return None;
        }
        let ns = tern_proto::types::namespace_of(channel);
        self.namespaces.iter().position(|n| n.name == ns)
    }

    /// Largest payload allowed on `channel`.
    pub fn max_message_bytes_for(&self, channel: &str) -> usize {
        self.namespace(channel).and_then(|n| n.max_message_bytes).unwrap_or(self.max_message_bytes)
    }
}

/// `[heartbeat]`: liveness in both directions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// How often the node pings each client.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A connection silent for this long is closed (4000) and cleaned up.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

/// `[timeouts]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// Time allowed between the WebSocket opening and the client's Connect frame.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Time allowed for an HTTP request's headers to arrive.
    #[serde(with = "humantime_serde")]
    pub http_header: Duration,
    /// Time an HTTP answer may wait for the client to read more of it before the connection
    /// is dropped (a client that stops reading would hold the answer's memory, and its share
    /// of `limits.history_read_bytes`, for ever); a history answer must also be taken within
    /// this plus its length at 16 KiB/s. WebSocket sessions have their own cut-offs.
    #[serde(with = "humantime_serde")]
    pub http_write: Duration,
    /// Time allowed for an HTTP request's body to arrive, once its headers did (an HTTP
    /// publish, frames posted to an HTTP session): a body that never ends gets 408.
    #[serde(with = "humantime_serde")]
    pub http_body: Duration,
    /// How long a long poll of an HTTP session waits for frames before it is answered
    /// empty (below the 30 s or more after which proxies commonly cut a quiet request).
    #[serde(with = "humantime_serde")]
    pub long_poll: Duration,
    /// Time allowed for a close frame to be flushed to a client before the socket drops.
    #[serde(with = "humantime_serde")]
    pub close: Duration,
    /// On SIGTERM/SIGINT, how long open connections get to close before the node exits;
    /// with a backbone, also (9/10 of it at most) how long the node keeps replicating until
    /// the reachable peers acknowledged every message it accepted, so a rolling restart
    /// loses nothing.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// On SIGTERM/SIGINT, how long clients have between the `draining` frame (go elsewhere
    /// now) and the node closing their connection with 1001. It is part of
    /// `shutdown_grace`: the smaller of it and half of `shutdown_grace` applies (the rest of
    /// the shutdown, closing and the backbone's flush, needs the other half). See
    /// [`TimeoutsConfig::drain_time`].
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
}

/// `[websocket]`: buffer sizing and batching.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Read buffer per connection, in bytes (the library default is 128 KiB).
    pub read_buffer_bytes: usize,
    /// Most messages packed into one Deliver frame.
    pub max_batch_messages: usize,
    /// Most bytes packed into one Deliver frame (a single larger message still goes alone).
    pub max_batch_bytes: usize,
    /// Deprecated: the same as `cors.allowed_origins`, where its entries are added (the
    /// list now guards the HTTP API too).
    pub allowed_origins: Vec<String>,
}

/// `[cors]`: browser origins allowed to use the node, over the HTTP API and the WebSocket
/// alike. A request that carries an `Origin` header (browsers send one on cross-origin
/// requests, on every POST and on WebSocket upgrades) is served only when that origin is
/// listed, the list holds `"*"`, or it is the origin of one of the cluster's own region
/// URLs (`[[regions]]`: a page a node of the cluster served); otherwise it gets 403 and
/// nothing is done. Requests without `Origin` (servers, SDKs, curl) are always served:
/// tokens and API keys decide what they may do. (The `Host` header is not trusted for
/// this: a page on another site can make it say anything through DNS rebinding.)
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins (`https://app.example.com`), or `"*"` for any. Empty (the default): only
    /// the origins of the `[[regions]]` URLs.
    pub allowed_origins: Vec<String>,
    /// How long browsers may cache a preflight's answer (`Access-Control-Max-Age`).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self { allowed_origins: Vec::new(), max_age: Duration::from_secs(600) }
    }
}

impl CorsConfig {
    /// Whether a request from `origin` (its `Origin` header) is served. After
    /// [`Config::validate`] the list holds the `[[regions]]` URLs' origins too.
    pub fn allows(&self, origin: &str) -> bool {
        if self.allowed_origins.iter().any(|o| o == "*") {
            return true;
        }
        normalise_origin(origin).is_ok_and(|o| self.allowed_origins.contains(&o))
    }
}

/// Whether `origin` is this node's own origin on this machine: its host is `localhost` or
/// a loopback address and it is the origin the request was sent to (`host`, the `Host`
/// header). A dev-mode node serves such pages (its own `/demo/`). DNS rebinding cannot
/// pass for one: a foreign page's `Origin` and `Host` name the foreign host, not a loopback
/// one; and a page on another local port has another origin.
pub fn is_own_loopback_origin(origin: &str, host: &str) -> bool {
    let Ok(o) = normalise_origin(origin) else { return false };
    let Some((scheme, authority)) = o.split_once("://") else { return false };
    let name = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    let loopback =
        name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    loopback && normalise_origin(&format!("{scheme}://{host}")).is_ok_and(|h| h == o)
}

/// The browser origin of a (normalised) region URL: `wss://eu.example.com/x` is
/// `https://eu.example.com`.
fn origin_of_region_url(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = match scheme {
        "ws" | "http" => "http",
        "wss" | "https" => "https",
        _ => return None,
    };
    let authority = rest.split('/').next()?;
    normalise_origin(&format!("{scheme}://{authority}")).ok()
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self { region: "local".into(), name: "edge-1".into() }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self { client: SocketAddr::from(([127, 0, 0, 1], 7400)), admin: None }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            // Tuned for a 2-core node with a few GiB: idle connections cost a few KiB each.
            max_connections: 100_000,
            // Room for a large office or carrier NAT behind one address.
            max_connections_per_ip: 1_000,
            // Enough for a chat app with many rooms open; bounds per-connection state.
            max_channels_per_connection: 100,
            // A few hundred bytes each while idle: well under a GiB at the limit.
            max_channels: 1_000_000,
            max_message_bytes: 64 * 1024,
            // Room for a max-size text payload written as JSON escapes, plus fields.
            max_frame_bytes: min_frame_bytes(64 * 1024),
            // About a second of a busy channel; a reader further behind is too slow.
            send_queue_messages: 1024,
            send_queue_bytes: 4 * 1024 * 1024,
            // Ably-like: retries within two minutes are de-duplicated.
            dedupe_ids_per_channel: 100_000,
            dedupe_window: Duration::from_secs(120),
            // Ably's default per connection is 50/s; a chat or game client publishes far
            // less. Backends publishing in bulk use the HTTP API or raise it.
            publish_rate: 50,
            publish_burst: 100,
            // Room for the publish rate plus subscribes, history reads and heartbeats; a
            // client sending more is flooding.
            frame_rate: 200,
            frame_burst: 400,
            // A backend publishing over HTTP/1.1 request by request rarely exceeds this;
            // bulk publishers raise it per deployment.
            http_publish_rate: 1_000,
            http_publish_burst: 2_000,
            // Each read is up to 1,000 messages off the disk on a blocking thread.
            history_reads: 32,
            history_reads_per_connection: 4,
            history_page_bytes: 1 << 20,
            history_read_bytes: 64 << 20,
            // A restart of the publisher's previous node takes about a second; an SDK's
            // request timeout (10 s by default) leaves room for one retry.
            publish_order_wait: Duration::from_secs(5),
            namespaces: Vec::new(),
        }
    }
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        // Below common proxy/NAT idle cut-offs (60 s); two missed pings close the connection.
        Self { interval: Duration::from_secs(20), idle_timeout: Duration::from_secs(45) }
    }
}

impl TimeoutsConfig {
    /// The drain that applies: `drain`, at most half of `shutdown_grace`.
    pub fn drain_time(&self) -> Duration {
        self.drain.min(self.shutdown_grace / 2)
    }
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            http_header: Duration::from_secs(10),
            http_write: Duration::from_secs(10),
            http_body: Duration::from_secs(10),
            long_poll: Duration::from_secs(25),
            close: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            drain: Duration::from_secs(3),
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        // 2 KiB reads a typical chat publish in one syscall and keeps an idle connection
        // near 6 KiB of server memory; raise it for publishers of large messages.
        Self {
            read_buffer_bytes: 2048,
            max_batch_messages: 256,
            max_batch_bytes: 64 * 1024,
            allowed_origins: Vec::new(),
        }
    }
}

/// Why a configuration was refused. The operator's fault; fix the file and restart.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type).
    #[error("invalid config: {0}")]
    Parse(#[from] toml::de::Error),
    /// A region or node name is malformed.
    #[error("invalid config: {0}")]
    Name(#[from] NameError),
    /// A value is out of range.
    #[error("invalid config: {field}: {reason}")]
    Invalid {
        /// Dotted field name, e.g. `limits.max_frame_bytes`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl Config {
    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_toml(&text)
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Checks every value and builds the runtime settings.
    pub fn validate(mut self) -> Result<Settings, ConfigError> {
        // Settings compared against what requests carry are kept in the form they are
        // compared in (see `normalise_origin`).
        for o in &mut self.websocket.allowed_origins {
            *o = normalise_origin(o).map_err(|reason| ConfigError::Invalid {
                field: "websocket.allowed_origins",
                reason,
            })?;
        }
        for o in &mut self.cors.allowed_origins {
            if o != "*" {
                *o = normalise_origin(o).map_err(|reason| ConfigError::Invalid {
                    field: "cors.allowed_origins",
                    reason,
                })?;
            }
        }
        // The older setting's entries join the list that now guards every surface.
        let older = std::mem::take(&mut self.websocket.allowed_origins);
        self.cors.allowed_origins.extend(older);
        for r in &mut self.regions {
            r.url = normalise_region_url(&r.url)
                .map_err(|reason| ConfigError::Invalid { field: "regions.url", reason })?;
            // Pages the cluster's own nodes serve may use every node of it.
            if let Some(origin) = origin_of_region_url(&r.url) {
                if !self.cors.allowed_origins.contains(&origin) {
                    self.cors.allowed_origins.push(origin);
                }
            }
        }
        let region = RegionId::parse(&self.node.region)?;
        let node = NodeId::new(&region, &self.node.name)?;
        let l = &self.limits;
        let nonzero = [
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_ip", l.max_connections_per_ip),
            ("limits.max_channels_per_connection", l.max_channels_per_connection),
            ("limits.max_channels", l.max_channels),
            ("limits.max_message_bytes", l.max_message_bytes),
            ("limits.send_queue_messages", l.send_queue_messages),
            ("limits.send_queue_bytes", l.send_queue_bytes),
            ("websocket.read_buffer_bytes", self.websocket.read_buffer_bytes),
            ("websocket.max_batch_messages", self.websocket.max_batch_messages),
            ("websocket.max_batch_bytes", self.websocket.max_batch_bytes),
            ("resume.max_scan", self.resume.max_scan),
            ("limits.publish_rate", l.publish_rate as usize),
            ("limits.publish_burst", l.publish_burst as usize),
            ("limits.frame_rate", l.frame_rate as usize),
            ("limits.frame_burst", l.frame_burst as usize),
            ("limits.http_publish_rate", l.http_publish_rate as usize),
            ("limits.http_publish_burst", l.http_publish_burst as usize),
            ("limits.history_reads", l.history_reads),
            ("limits.history_reads_per_connection", l.history_reads_per_connection),
            ("limits.history_page_bytes", l.history_page_bytes),
            ("limits.history_read_bytes", l.history_read_bytes),
            ("resume.page", self.resume.page),
            ("resume.page_bytes", self.resume.page_bytes),
        ];
        for (field, v) in nonzero {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must be greater than 0".into(),
                });
            }
        }
        let one_read = (3 * l.history_page_bytes).max(2 * self.resume.page_bytes);
        if l.history_read_bytes < one_read {
            return Err(ConfigError::Invalid {
                field: "limits.history_read_bytes",
                reason: format!(
                    "must hold one read: at least {one_read} (3 × history_page_bytes, \
                     2 × resume.page_bytes)"
                ),
            });
        }
        if l.max_message_bytes > MAX_MESSAGE_BYTES {
            return Err(ConfigError::Invalid {
                field: "limits.max_message_bytes",
                reason: format!(
                    "must be at most {MAX_MESSAGE_BYTES}: every message the node accepts must \
                     fit one backbone frame ({} bytes) with its envelope",
                    tern_backbone::wire::MAX_FRAME
                ),
            });
        }
        let need = min_frame_bytes(l.max_message_bytes);
        if l.max_frame_bytes < need {
            return Err(ConfigError::Invalid {
                field: "limits.max_frame_bytes",
                reason: format!(
                    "must be at least {need} to carry a max-size payload in every encoding \
                     (limits.max_message_bytes * 6 + 8192: JSON may write each byte of a \
                     text as a \\u escape)"
                ),
            });
        }
        if l.max_message_bytes > u32::MAX as usize || l.max_frame_bytes > u32::MAX as usize {
            return Err(ConfigError::Invalid {
                field: "limits.max_frame_bytes",
                reason: "must be below 4 GiB".into(),
            });
        }
        if l.dedupe_window < Duration::from_secs(120) {
            return Err(ConfigError::Invalid {
                field: "limits.dedupe_window",
                reason: "must be at least 2m (the delivery contract's dedupe window)".into(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for ns in &l.namespaces {
            let invalid =
                |reason: String| ConfigError::Invalid { field: "limits.namespaces", reason };
            if validate_namespace(&ns.name).is_err() {
                return Err(invalid(format!(
                    "{:?} is not a namespace (1-32 bytes of a-z 0-9 _ -, as before a channel name's ':')",
                    ns.name
                )));
            }
            if !seen.insert(ns.name.as_str()) {
                return Err(invalid(format!("{:?} is listed twice", ns.name)));
            }
            if ns.publish_rate == Some(0) || ns.publish_burst == Some(0) {
                return Err(invalid(format!(
                    "{}: publish_rate and publish_burst must be above 0",
                    ns.name
                )));
            }
            if ns.publish_burst.is_some() && ns.publish_rate.is_none() {
                return Err(invalid(format!("{}: publish_burst needs a publish_rate", ns.name)));
            }
            if ns.max_message_bytes.is_some_and(|m| m == 0 || m > l.max_message_bytes) {
                return Err(invalid(format!(
                    "{}: max_message_bytes must be between 1 and limits.max_message_bytes",
                    ns.name
                )));
            }
        }
        if self.timeouts.http_write.is_zero() {
            return Err(ConfigError::Invalid {
                field: "timeouts.http_write",
                reason: "must be above 0".into(),
            });
        }
        if self.presence.down_after.is_zero() {
            return Err(ConfigError::Invalid {
                field: "presence.down_after",
                reason: "must be above 0".into(),
            });
        }
        for (field, value) in [
            ("presence.max_members", self.presence.max_members),
            ("presence.max_channels_per_connection", self.presence.max_channels_per_connection),
            ("presence.page_size", self.presence.page_size),
            ("presence.batch_interval", self.presence.batch_interval.as_millis() as usize),
            ("presence.rate", self.presence.rate as usize),
            ("presence.burst", self.presence.burst as usize),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid { field, reason: "must be above 0".into() });
            }
        }
        if (self.presence.burst as usize) < self.presence.max_channels_per_connection {
            return Err(ConfigError::Invalid {
                field: "presence.burst",
                reason: format!(
                    "must be at least presence.max_channels_per_connection ({}): a client \
                     that reconnects enters all its members again at once",
                    self.presence.max_channels_per_connection
                ),
            });
        }
        // A member with the most data fits a frame with room to spare (both encodings).
        if self.presence.max_data_bytes > self.limits.max_frame_bytes / 2 {
            return Err(ConfigError::Invalid {
                field: "presence.max_data_bytes",
                reason: format!(
                    "must be at most half of limits.max_frame_bytes ({})",
                    self.limits.max_frame_bytes
                ),
            });
        }
        if self.timeouts.http_body.is_zero() {
            return Err(ConfigError::Invalid {
                field: "timeouts.http_body",
                reason: "must be above 0".into(),
            });
        }
        let hb = &self.heartbeat;
        if self.timeouts.long_poll.is_zero() {
            return Err(ConfigError::Invalid {
                field: "timeouts.long_poll",
                reason: "must be above 0".into(),
            });
        }
        if hb.interval.is_zero() || hb.idle_timeout <= hb.interval {
            return Err(ConfigError::Invalid {
                field: "heartbeat.idle_timeout",
                reason: "must be longer than heartbeat.interval, which must be above 0".into(),
            });
        }
        for ns in &self.history.namespaces {
            if validate_namespace(&ns.name).is_err() {
                return Err(ConfigError::Invalid {
                    field: "history.namespaces.name",
                    reason: format!(
                        "{:?} is not a namespace (1-32 bytes of a-z 0-9 _ -, as before a channel name's ':')",
                        ns.name
                    ),
                });
            }
            if ns.max_messages == 0 || ns.max_age.is_zero() {
                return Err(ConfigError::Invalid {
                    field: "history.namespaces",
                    reason: format!("{}: max_messages and max_age must be above 0", ns.name),
                });
            }
        }
        if self.history.queue == 0 || self.history.sync_interval.is_zero() {
            return Err(ConfigError::Invalid {
                field: "history",
                reason: "queue and sync_interval must be above 0".into(),
            });
        }
        let mut names = std::collections::HashSet::new();
        for r in &self.regions {
            RegionId::parse(&r.name)?;
            if !names.insert(r.name.as_str()) {
                return Err(ConfigError::Invalid {
                    field: "regions.name",
                    reason: format!("{:?} is listed twice", r.name),
                });
            }
        }
        let mut peers = Vec::new();
        if let Some(b) = &self.backbone {
            for (field, v) in [
                ("backbone.lanes", b.lanes),
                ("backbone.lane_queue", b.lane_queue),
                ("backbone.retention", b.retention),
                ("backbone.retention_bytes", b.retention_bytes),
                ("backbone.send_window", b.send_window),
            ] {
                if v == 0 {
                    return Err(ConfigError::Invalid {
                        field,
                        reason: "must be greater than 0".into(),
                    });
                }
            }
            for ns in &b.replicate_all {
                if ns != "*" && validate_namespace(ns).is_err() {
                    return Err(ConfigError::Invalid {
                        field: "backbone.replicate_all",
                        reason: format!(
                            "{ns:?} is not a namespace (1-32 bytes of a-z 0-9 _ -) or \"*\""
                        ),
                    });
                }
            }
            for p in &b.peers {
                let id = NodeId::parse(&p.id)?;
                if id == node {
                    return Err(ConfigError::Invalid {
                        field: "backbone.peers",
                        reason: format!("{id} is this node itself"),
                    });
                }
                if peers.iter().any(|q: &tern_backbone::transport::Peer| q.id == id) {
                    return Err(ConfigError::Invalid {
                        field: "backbone.peers",
                        reason: format!("{id} is listed twice"),
                    });
                }
                let port = p.addr.rsplit_once(':').and_then(|(h, port)| {
                    (!h.is_empty()).then_some(())?;
                    port.parse::<u16>().ok()
                });
                if port.is_none_or(|port| port == 0) {
                    return Err(ConfigError::Invalid {
                        field: "backbone.peers.addr",
                        reason: format!(
                            "{:?} is not host:port (e.g. \"10.0.0.7:7401\" or \"us-east-0.tern:7401\")",
                            p.addr
                        ),
                    });
                }
                peers.push(tern_backbone::transport::Peer { id, addr: p.addr.clone() });
            }
        }
        let auth = crate::auth::Verifier::new(&self.auth)
            .map_err(|e| ConfigError::Invalid { field: "auth", reason: e.to_string() })?;
        Ok(Settings { node, region, peers, auth, config: self })
    }
}

/// Validated runtime settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's id.
    pub node: NodeId,
    /// This node's region.
    pub region: RegionId,
    /// Backbone peers, parsed.
    pub peers: Vec<tern_backbone::transport::Peer>,
    /// Token verification, from `[auth]`.
    pub auth: crate::auth::Verifier,
    /// The validated configuration.
    pub config: Config,
}

/// A browser origin in the form `cors.allowed_origins` and the `Origin` header are
/// compared in (the serialisation of RFC 6454 § 6.2, which browsers send): lower-case scheme
/// (`http` or `https`) and host, the port only when it is not the scheme's default, no
/// path. `https://App.example.com:443/` becomes `https://app.example.com`; a path, query,
/// user info or another scheme is refused, with the reason.
pub fn normalise_origin(s: &str) -> Result<String, String> {
    let what = "an origin is scheme://host[:port], e.g. https://app.example.com";
    if s == "*" {
        return Err(
            "\"*\" is not an origin: to allow every origin, write it in cors.allowed_origins"
                .into(),
        );
    }
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not an origin ({e}); {what}"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(format!("{s:?} is not an origin: {what}"));
    };
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => 443,
        "http" => 80,
        _ => return Err(format!("{s:?}: the scheme must be http or https")),
    };
    if authority.as_str().contains('@') {
        return Err(format!("{s:?} holds user info: {what}"));
    }
    // `Uri` drops a fragment without a word.
    if uri.path() != "/" || uri.query().is_some() || s.contains('#') {
        return Err(format!("{s:?} has a path, query or fragment: {what}"));
    }
    // `Uri` takes `h:` as an empty port; an origin has a port or no colon.
    if authority.as_str().ends_with(':') {
        return Err(format!("{s:?} has an empty port: {what}"));
    }
    let host = authority.host().to_ascii_lowercase();
    if host.is_empty() {
        return Err(format!("{s:?} has no host: {what}"));
    }
    Ok(match authority.port_u16().filter(|&p| p != default_port) {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    })
}

/// A region's public URL as `[[regions]]` lists it: `ws`, `wss`, `http` or `https` with a
/// host, scheme and host in lower case, no trailing `/` (clients add `/v1/ws` and
/// `/v1/ping` to it), no query or fragment.
fn normalise_region_url(s: &str) -> Result<String, String> {
    let what = "a region URL is ws[s]://host[:port][/path] or http[s]://…";
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL ({e}); {what}"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(format!("{s:?} is not an absolute URL: {what}"));
    };
    let scheme = scheme.to_ascii_lowercase();
    if !["ws", "wss", "http", "https"].contains(&scheme.as_str()) {
        return Err(format!("{s:?}: the scheme must be ws, wss, http or https"));
    }
    if authority.host().is_empty() || authority.as_str().contains('@') {
        return Err(format!("{s:?} needs a host and no user info: {what}"));
    }
    if uri.query().is_some() || s.contains('#') {
        return Err(format!("{s:?} has a query or fragment: {what}"));
    }
    if authority.as_str().ends_with(':') {
        return Err(format!("{s:?} has an empty port: {what}"));
    }
    let host = authority.as_str().to_ascii_lowercase();
    Ok(format!("{scheme}://{host}{}", uri.path().trim_end_matches('/')))
}

/// The largest `limits.max_message_bytes`: a message and its envelope (ids, names, origin,
/// position: well under 64 KiB) fit one backbone frame.
pub const MAX_MESSAGE_BYTES: usize = tern_backbone::wire::MAX_FRAME - 64 * 1024;

/// The smallest WebSocket message (and HTTP body) limit that carries every payload
/// `max_message_bytes` allows, in every encoding: JSON may write each byte of a text as a
/// six-byte `\u00XX` escape (control characters; `\ud83d\ude00` is 12 bytes for a 4-byte
/// emoji), and the rest of a publish (channel, id, name, `after`, escaped too) fits in
/// 8 KiB.
pub const fn min_frame_bytes(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_mul(6).saturating_add(8192)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let s = Config::default().validate().unwrap();
        assert_eq!(s.node.as_str(), "local/edge-1");
    }

    #[test]
    fn unknown_keys_and_nonsense_are_refused() {
        let e = Config::from_toml("[limits]\nmax_conections = 5\n").unwrap_err();
        assert!(e.to_string().contains("max_conections"), "{e}");
        let e =
            Config::from_toml("[limits]\nmax_connections = 0\n").unwrap().validate().unwrap_err();
        assert!(e.to_string().contains("limits.max_connections"), "{e}");
        let e = Config::from_toml("[heartbeat]\ninterval = \"30s\"\nidle_timeout = \"10s\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("heartbeat.idle_timeout"), "{e}");
        let e = Config::from_toml("[limits]\nmax_frame_bytes = 1000\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("limits.max_frame_bytes"), "{e}");
    }

    /// The first error of `toml` (validated), which must name `field`.
    fn refused(toml: &str, field: &str) -> String {
        let e = Config::from_toml(toml).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains(field), "{toml}: expected an error naming {field}, got {e}");
        e
    }

    #[test]
    fn origins_are_compared_in_one_form_and_malformed_ones_refused() {
        let listed = |o: &str| {
            let toml = format!("[websocket]\nallowed_origins = [{o:?}]\n");
            Config::from_toml(&toml).unwrap().validate().unwrap().config.cors.allowed_origins
        };
        for (written, kept) in [
            ("https://app.example.com/", "https://app.example.com"),
            ("https://app.example.com", "https://app.example.com"),
            ("HTTPS://App.Example.COM:443", "https://app.example.com"),
            ("http://app.example.com:80/", "http://app.example.com"),
            ("http://localhost:8080", "http://localhost:8080"),
            ("https://app.example.com:8443/", "https://app.example.com:8443"),
            ("http://[::1]:3000", "http://[::1]:3000"),
        ] {
            assert_eq!(listed(written), [kept], "{written}");
        }
        // What a browser sends matches the listed form whatever way it was written.
        assert_eq!(
            normalise_origin("https://app.example.com").unwrap(),
            listed("https://APP.example.com:443/")[0]
        );
        for bad in [
            "https://app.example.com/app",
            "https://app.example.com/?x=1",
            "https://app.example.com/#top",
            "https://app.example.com:",
            "app.example.com",
            "*",
            "ftp://app.example.com",
            "https://user@app.example.com",
            "https://",
            "null",
            "",
        ] {
            let toml = format!("[websocket]\nallowed_origins = [{bad:?}]\n");
            refused(&toml, "websocket.allowed_origins");
        }
    }

    #[test]
    fn region_urls_namespaces_and_peers_are_checked_per_their_type() {
        let url = |u: &str| {
            let toml = format!("[[regions]]\nname = \"eu\"\nurl = {u:?}\n");
            Config::from_toml(&toml).unwrap().validate().unwrap().config.regions[0].url.clone()
        };
        assert_eq!(url("wss://EU.Example.com/"), "wss://eu.example.com");
        assert_eq!(url("https://eu.example.com:8443/tern/"), "https://eu.example.com:8443/tern");
        for bad in [
            "eu.example.com",
            "wss://",
            "ftp://eu.example.com",
            "wss://eu example.com",
            "wss://eu.example.com/?a=1",
            "wss://eu.example.com/#a",
            "wss://eu.example.com:",
        ] {
            refused(&format!("[[regions]]\nname = \"eu\"\nurl = {bad:?}\n"), "regions.url");
        }
        let twice = "[[regions]]\nname = \"eu\"\nurl = \"wss://a\"\n[[regions]]\nname = \"eu\"\nurl = \"wss://b\"\n";
        refused(twice, "regions.name");
        // Namespaces are what precedes a channel name's ':' (lower case, at most 32 bytes):
        // one that no channel can have would silently never match.
        for bad in ["Chat", "chat.x", "chat:x", &"n".repeat(33), ""] {
            refused(
                &format!(
                    "[history]\n[[history.namespaces]]\nname = {bad:?}\nmax_messages = 5\nmax_age = \"1h\"\n"
                ),
                "history.namespaces",
            );
            refused(
                &format!("[[limits.namespaces]]\nname = {bad:?}\npublish_rate = 5\n"),
                "limits.namespaces",
            );
            refused(
                &format!(
                    "[backbone]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\nreplicate_all = [{bad:?}]\n"
                ),
                "backbone.replicate_all",
            );
        }
        let peer = "[[backbone.peers]]\nid = \"b/n\"\naddr = \"127.0.0.1:1\"\n";
        let toml = format!("[backbone]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n{peer}{peer}");
        refused(&toml, "backbone.peers");
        // Peer addresses are host:port, by IP or by name (resolved at each dial).
        let peer_at = |addr: &str| {
            format!(
                "[backbone]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n\
                 [[backbone.peers]]\nid = \"b/n\"\naddr = {addr:?}\n"
            )
        };
        for bad in ["us-east-0.tern", "us-east-0.tern:", ":7401", "host:0", "host:99999", ""] {
            refused(&peer_at(bad), "backbone.peers.addr");
        }
        for good in ["10.0.0.7:7401", "[::1]:7401", "us-east-0.tern-backbone.tern.svc:7401"] {
            let s = Config::from_toml(&peer_at(good)).unwrap().validate();
            // Certificates that do not exist fail later, never the address.
            assert!(s.as_ref().err().is_none_or(|e| !e.to_string().contains("addr")), "{good}");
        }
    }

    #[test]
    fn the_limits_agree_across_encodings_and_transports() {
        // The defaults carry a max-size payload as JSON escapes.
        let l = Config::default().limits;
        assert!(l.max_frame_bytes >= l.max_message_bytes * 6 + 8192);
        let e = refused(
            "[limits]\nmax_message_bytes = 65536\nmax_frame_bytes = 98304\n",
            "limits.max_frame_bytes",
        );
        assert!(e.contains("401408"), "{e}");
        // A message must fit one backbone frame.
        refused(
            "[limits]\nmax_message_bytes = 2000000\nmax_frame_bytes = 20000000\n",
            "limits.max_message_bytes",
        );
        let s =
            Config::from_toml("[limits]\nmax_message_bytes = 983040\nmax_frame_bytes = 5906432\n")
                .unwrap()
                .validate();
        assert!(s.is_ok(), "{s:?}");
    }

    #[test]
    fn local_cluster_configs_validate() {
        for text in [
            include_str!("../../deploy/local/eu-west.toml"),
            include_str!("../../deploy/local/us-east.toml"),
            include_str!("../../deploy/local/ap-south.toml"),
        ] {
            let s = Config::from_toml(text).unwrap().validate().unwrap();
            assert_eq!(s.peers.len(), 2);
        }
        let own = "[node]\nregion = \"a\"\nname = \"n\"\n[backbone]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n\
                   [[backbone.peers]]\nid = \"a/n\"\naddr = \"127.0.0.1:1\"\n";
        let e = Config::from_toml(own).unwrap().validate().unwrap_err();
        assert!(e.to_string().contains("backbone.peers"), "{e}");
    }

    #[test]
    fn the_production_example_requires_tokens_and_tls_and_refuses_its_placeholders() {
        let text = include_str!("../../deploy/edge.production.toml");
        let e = Config::from_toml(text).unwrap().validate().unwrap_err();
        assert!(e.to_string().contains("placeholder"), "{e}");
        let filled = text.replace(
            "REPLACE-ME-with-64-hex-characters-from-openssl-rand-hex-32",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        );
        let s = Config::from_toml(&filled).unwrap().validate().unwrap();
        assert_eq!(s.auth.mode(), crate::auth::AuthMode::Token);
        assert!(s.config.tls.is_some());
        assert!(!s.config.cors.allowed_origins.is_empty());
        assert!(s.config.regions.iter().all(|r| r.url.starts_with("wss://")));
        assert_eq!(s.peers.len(), 2);
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../deploy/edge.example.toml");
        Config::from_toml(text).unwrap().validate().unwrap();
    }
}
