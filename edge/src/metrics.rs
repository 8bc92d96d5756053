//! Prometheus metrics (`GET /metrics`, text format 0.0.4, through the `prometheus` crate).
//!
//! Names and units follow the Prometheus conventions (`_total` counters, `_seconds`,
//! `_bytes`). Everything on a message path is a counter or a histogram (atomics, no lock);
//! what the node already knows (channels, the log's size, each peer's link) is read when a
//! scrape asks. Label values are bounded: transports and close reasons are fixed sets, a
//! namespace label names only namespaces of the configuration (others are `other`, no
//! namespace `none`), and backbone peers are the configured ones.

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The transports a connection uses (the `transport` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Transport {
    /// A WebSocket.
    WebSocket,
    /// An HTTP session over streaming (`transport=stream`).
    Stream,
    /// An HTTP session over server-sent events (`transport=sse`).
    Sse,
    /// An HTTP session over long polling (`transport=poll`).
    Poll,
    /// Plain SSE (`GET /v1/sse`).
    PlainSse,
    /// Driven in-process (fuzzing, tests).
    Internal,
}

impl Transport {
    const ALL: [Self; 6] =
        [Self::WebSocket, Self::Stream, Self::Sse, Self::Poll, Self::PlainSse, Self::Internal];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::Stream => "stream",
            Self::Sse => "sse",
            Self::Poll => "poll",
            Self::PlainSse => "plain_sse",
            Self::Internal => "internal",
        }
    }
}

/// Why a session ended, from its close code (the `reason` label).
pub fn close_reason(code: Option<u16>) -> &'static str {
    use tern_proto::close;
    match code {
        None => "client_gone",
        Some(close::NORMAL) => "normal",
        Some(close::GOING_AWAY) => "shutdown",
        Some(close::IDLE_TIMEOUT) => "idle",
        Some(close::SLOW_CONSUMER) => "slow_consumer",
        Some(close::RATE_LIMITED) => "rate_limit",
        Some(close::UNAUTHORIZED) => "auth",
        Some(close::PROTOCOL_VIOLATION | close::PROTOCOL_ERROR | close::INVALID_PAYLOAD) => {
            "protocol"
        }
        Some(close::MESSAGE_TOO_BIG) => "too_big",
        Some(close::INTERNAL_ERROR) => "internal",
        Some(_) => "other",
    }
}

/// The node's metrics.
///
/// On the message path only counters and histograms already resolved to their labels are
/// touched (an atomic add, no lock, no lookup in the registry); with `[metrics] enabled =
/// false` not even that.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Held while a scrape reads the node into the gauges and encodes: two at once would
    /// both add the backbone counters' difference.
    rendering: std::sync::Mutex<()>,
    /// `[metrics] enabled`.
    enabled: bool,
    /// Open connections, per [`Transport`].
    connections: Vec<IntGauge>,
    /// Connections opened, per [`Transport`].
    connections_opened: Vec<IntCounter>,
    /// Sessions ended, by reason.
    disconnects: IntCounterVec,
    /// Messages accepted (sequenced; duplicates not counted), per namespace label.
    publishes: std::collections::HashMap<String, IntCounter>,
    /// Publishes refused (`nack`, or an HTTP error), by error code.
    publish_refusals: IntCounterVec,
    /// Messages written to subscribers in `deliver` frames.
    deliveries: IntCounter,
    /// From a publish's sequencing to its ack: local, replicated.
    publish_ack_seconds: [Histogram; 2],
    /// One group commit of the history log.
    history_write_seconds: Histogram,
    /// Messages the history log committed.
    history_writes: IntCounter,
    /// Channels on this node (read at scrape).
    channels: IntGauge,
    /// The history log's file size (read at scrape).
    history_log_bytes: IntGauge,
    /// Per backbone peer (read at scrape).
    peer_up: IntGaugeVec,
    peer_caught_up: IntGaugeVec,
    peer_rtt: prometheus::GaugeVec,
    peer_frames_sent: IntCounterVec,
    peer_frames_received: IntCounterVec,
    peer_bytes_sent: IntCounterVec,
    peer_bytes_received: IntCounterVec,
    peer_frames_dropped: IntCounterVec,
    peer_retransmitted: IntCounterVec,
    unacknowledged: IntGaugeVec,
    /// Subscriptions on this node (read at scrape).
    subscriptions: IntGauge,
    /// From a message's publish at its origin to its sequencing here, per origin.
    replication_lag: ReplicationLag,
}

/// `tern_replication_lag_seconds` resolved per origin node: the configured backbone peers,
/// and `other` for an origin no peer names (a relayed message of a node not configured
/// here).
#[derive(Debug, Clone, Default)]
pub struct ReplicationLag {
    by_origin: std::collections::HashMap<String, Histogram>,
    other: Option<Histogram>,
}

impl ReplicationLag {
    /// A replicated message of `origin`, published at `published_ms` (the origin's clock,
    /// unix milliseconds), was sequenced here at `now_ms` (this node's clock). A clock behind
    /// the origin's counts as 0.
    pub fn observe(&self, origin: &str, published_ms: u64, now_ms: u64) {
        if let Some(h) = self.by_origin.get(origin).or(self.other.as_ref()) {
            h.observe(now_ms.saturating_sub(published_ms) as f64 / 1000.0);
        }
    }
}

/// What a scrape reads from the node besides the counters.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Channels held.
    pub channels: usize,
    /// The history log's size in bytes (None: no log).
    pub history_log_bytes: Option<u64>,
    /// Backbone peers.
    pub peers: Vec<PeerSnapshot>,
    /// Subscriptions (live, or waiting for the peers) across every channel.
    pub subscriptions: usize,
}

/// One backbone peer at scrape time.
#[derive(Debug, Default)]
pub struct PeerSnapshot {
    /// Its node id.
    pub peer: String,
    /// Link up.
    pub up: bool,
    /// Caught up with (everything it had for this node acknowledged).
    pub caught_up: bool,
    /// QUIC round-trip time, seconds.
    pub rtt_seconds: f64,
    /// Frames sent to it (replication, acks, presence; counters since the start).
    pub frames_sent: u64,
    /// Frames received from it.
    pub frames_received: u64,
    /// Bytes of frames sent.
    pub bytes_sent: u64,
    /// Bytes of frames received.
    pub bytes_received: u64,
    /// Frames dropped because its lane queue was full (retransmitted later).
    pub frames_dropped: u64,
    /// Messages it wants and has not acknowledged.
    pub unacknowledged: u64,
    /// Messages sent to it again (asked for, or repeated after `rto`).
    pub retransmitted: u64,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
    r.register(Box::new(m.clone())).expect("register");
    m
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric");
    r.register(Box::new(m.clone())).expect("register");
    m
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let m = IntGauge::new(name, help).expect("metric");
    r.register(Box::new(m.clone())).expect("register");
    m
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let m = IntCounter::new(name, help).expect("metric");
    r.register(Box::new(m.clone())).expect("register");
    m
}

/// Replication lag buckets, seconds: 1 ms to 5 minutes (a catch-up after an outage).
const LAG: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Latency buckets, seconds: 100 µs to 10 s.
const LATENCY: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

impl Metrics {
    /// Every metric, registered; the namespace labels are those `config` names.
    pub fn new(config: &crate::config::Config) -> Self {
        let r = Registry::new();
        let transport = &["transport"];
        let peer = &["peer"];
        let ack = HistogramVec::new(
            HistogramOpts::new(
                "tern_publish_ack_seconds",
                "From a publish's sequencing to its ack: the history log's commit and, for \
                 DURABILITY_REPLICATED, another region's acknowledgement",
            )
            .buckets(LATENCY.to_vec()),
            &["durability"],
        )
        .expect("metric");
        r.register(Box::new(ack.clone())).expect("register");
        let write = Histogram::with_opts(
            HistogramOpts::new("tern_history_write_seconds", "One group commit of the history log")
                .buckets(LATENCY.to_vec()),
        )
        .expect("metric");
        r.register(Box::new(write.clone())).expect("register");
        let rtt = prometheus::GaugeVec::new(
            Opts::new("tern_backbone_rtt_seconds", "QUIC round-trip time to the peer"),
            peer,
        )
        .expect("metric");
        r.register(Box::new(rtt.clone())).expect("register");
        let lag = HistogramVec::new(
            HistogramOpts::new(
                "tern_replication_lag_seconds",
                "From a replicated message's publish at its origin (the origin's clock) to \
                 its sequencing on this node (this node's clock), by origin node",
            )
            .buckets(LAG.to_vec()),
            &["origin"],
        )
        .expect("metric");
        r.register(Box::new(lag.clone())).expect("register");
        let origins = config.backbone.iter().flat_map(|b| &b.peers).map(|p| p.id.clone());
        let replication_lag = ReplicationLag {
            by_origin: origins.map(|o| (o.clone(), lag.with_label_values(&[&o]))).collect(),
            other: Some(lag.with_label_values(&["other"])),
        };
        let connections = gauge_vec(&r, "tern_connections", "Open client connections", transport);
        let opened = counter_vec(
            &r,
            "tern_connections_opened_total",
            "Client connections opened",
            transport,
        );
        let publishes = counter_vec(
            &r,
            "tern_publishes_total",
            "Messages accepted from publishers on this node (duplicates not counted), by \
             namespace (configured ones; other; none)",
            &["namespace"],
        );
        let mut names: Vec<&str> = vec!["none", "other"];
        names.extend(config.history.namespaces.iter().map(|n| n.name.as_str()));
        names.extend(config.limits.namespaces.iter().map(|n| n.name.as_str()));
        Self {
            rendering: std::sync::Mutex::new(()),
            enabled: config.metrics.enabled,
            connections: Transport::ALL
                .iter()
                .map(|t| connections.with_label_values(&[t.label()]))
                .collect(),
            connections_opened: Transport::ALL
                .iter()
                .map(|t| opened.with_label_values(&[t.label()]))
                .collect(),
            disconnects: counter_vec(
                &r,
                "tern_disconnects_total",
                "Client sessions ended, by reason (client_gone, normal, shutdown, idle, \
                 slow_consumer, rate_limit, auth, protocol, too_big, internal, other)",
                &["reason"],
            ),
            publishes: names
                .into_iter()
                .map(|n| (n.to_owned(), publishes.with_label_values(&[n])))
                .collect(),
            publish_refusals: counter_vec(
                &r,
                "tern_publish_refusals_total",
                "Publishes refused, by error code",
                &["code"],
            ),
            deliveries: counter(
                &r,
                "tern_deliveries_total",
                "Messages written to subscribers in deliver frames",
            ),
            publish_ack_seconds: [
                ack.with_label_values(&["local"]),
                ack.with_label_values(&["replicated"]),
            ],
            history_write_seconds: write,
            history_writes: counter(
                &r,
                "tern_history_writes_total",
                "Messages committed to the history log",
            ),
            channels: gauge(&r, "tern_channels", "Channels held by this node"),
            history_log_bytes: gauge(&r, "tern_history_log_bytes", "Size of the history log file"),
            peer_up: gauge_vec(
                &r,
                "tern_backbone_link_up",
                "1 while the link to the peer is up",
                peer,
            ),
            peer_caught_up: gauge_vec(
                &r,
                "tern_backbone_caught_up",
                "1 once everything the peer had for this node is acknowledged",
                peer,
            ),
            peer_rtt: rtt,
            peer_frames_sent: counter_vec(
                &r,
                "tern_backbone_frames_sent_total",
                "Backbone frames sent to the peer (messages, acks, repairs, presence)",
                peer,
            ),
            peer_frames_received: counter_vec(
                &r,
                "tern_backbone_frames_received_total",
                "Backbone frames received from the peer",
                peer,
            ),
            peer_bytes_sent: counter_vec(
                &r,
                "tern_backbone_sent_bytes_total",
                "Bytes of backbone frames sent to the peer",
                peer,
            ),
            peer_bytes_received: counter_vec(
                &r,
                "tern_backbone_received_bytes_total",
                "Bytes of backbone frames received from the peer",
                peer,
            ),
            peer_frames_dropped: counter_vec(
                &r,
                "tern_backbone_frames_dropped_total",
                "Frames to the peer dropped on a full lane queue (retransmitted later)",
                peer,
            ),
            peer_retransmitted: counter_vec(
                &r,
                "tern_backbone_retransmitted_messages_total",
                "Messages sent to the peer again: asked for by its Nack, or repeated after the \
                 retransmission timeout without progress",
                peer,
            ),
            unacknowledged: gauge_vec(
                &r,
                "tern_backbone_unacknowledged_messages",
                "Messages of this node's channels the peer wants and has not acknowledged \
                 (0 while the link is down)",
                peer,
            ),
            subscriptions: gauge(
                &r,
                "tern_subscriptions",
                "Channel subscriptions on this node (live, or waiting for the peers)",
            ),
            replication_lag,
            registry: r,
        }
    }

    /// Whether the node keeps metrics (`[metrics] enabled`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A connection over `transport` opened.
    pub fn opened(&self, transport: Transport) {
        if self.enabled {
            self.connections[transport as usize].inc();
            self.connections_opened[transport as usize].inc();
        }
    }

    /// A connection over `transport` closed.
    pub fn closed(&self, transport: Transport) {
        if self.enabled {
            self.connections[transport as usize].dec();
        }
    }

    /// A session ended with `code` (None: the client went away).
    pub fn disconnected(&self, code: Option<u16>) {
        if self.enabled {
            self.disconnects.with_label_values(&[close_reason(code)]).inc();
        }
    }

    /// The counter of messages accepted on a channel of `namespace` (its label: the namespace when
    /// the configuration names it in `[[history.namespaces]]` or `[[limits.namespaces]]`,
    /// `none` for a channel without one, `other` otherwise: clients choose channel names,
    /// so the label set stays bounded).
    /// The counter to [`IntCounter::inc`] (None with metrics off).
    pub fn publishes_of(&self, namespace: &str) -> Option<&IntCounter> {
        if !self.enabled {
            return None;
        }
        let label = if namespace.is_empty() { "none" } else { namespace };
        self.publishes.get(label).or_else(|| self.publishes.get("other"))
    }

    /// A publish was refused with `code`.
    pub fn refused(&self, code: tern_proto::client::ErrorCode) {
        if self.enabled {
            self.publish_refusals.with_label_values(&[code.as_str_name()]).inc();
        }
    }

    /// `n` messages were written to a subscriber.
    pub fn delivered(&self, n: usize) {
        if self.enabled {
            self.deliveries.inc_by(n as u64);
        }
    }

    /// A publish was acknowledged `after` its sequencing.
    pub fn acked(&self, replicated: bool, after: std::time::Duration) {
        if self.enabled {
            self.publish_ack_seconds[usize::from(replicated)].observe(after.as_secs_f64());
        }
    }

    /// The replication lag histograms, per origin (None with metrics off).
    pub fn replication_lag(&self) -> Option<ReplicationLag> {
        self.enabled.then(|| self.replication_lag.clone())
    }

    /// The history writer's handles (none when metrics are off).
    pub fn history_handles(&self) -> (Option<Histogram>, Option<IntCounter>) {
        if self.enabled {
            (Some(self.history_write_seconds.clone()), Some(self.history_writes.clone()))
        } else {
            (None, None)
        }
    }

    /// The text exposition of every metric, after reading `snapshot` into the gauges.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let _one_at_a_time = self.rendering.lock().unwrap_or_else(|e| e.into_inner());
        self.channels.set(snapshot.channels as i64);
        if let Some(b) = snapshot.history_log_bytes {
            self.history_log_bytes.set(b as i64);
        }
        self.subscriptions.set(snapshot.subscriptions as i64);
        for p in &snapshot.peers {
            let l = &[p.peer.as_str()];
            self.peer_up.with_label_values(l).set(i64::from(p.up));
            self.peer_caught_up.with_label_values(l).set(i64::from(p.caught_up));
            self.peer_rtt.with_label_values(l).set(p.rtt_seconds);
            self.unacknowledged.with_label_values(l).set(p.unacknowledged as i64);
            // The backbone keeps its own counters; these follow them.
            for (m, v) in [
                (&self.peer_frames_sent, p.frames_sent),
                (&self.peer_frames_received, p.frames_received),
                (&self.peer_bytes_sent, p.bytes_sent),
                (&self.peer_bytes_received, p.bytes_received),
                (&self.peer_frames_dropped, p.frames_dropped),
                (&self.peer_retransmitted, p.retransmitted),
            ] {
                let c = m.with_label_values(l);
                c.inc_by(v.saturating_sub(c.get()));
            }
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail but for a metric family without metrics, which
        // the registry never holds.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
