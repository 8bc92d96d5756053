//! Client settings.

use std::time::Duration;

use tern_proto::codec::Format;

/// Client settings. `ClientOptions::default()` suits most uses.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Wire format: protobuf (default, compact) or JSON.
    pub format: Format,
    /// Client id to declare in Connect (dev mode); the node generates one when `None`.
    pub client_id: Option<String>,
    /// Signed token to present in Connect (required by nodes in token mode; its subject is
    /// the client id there).
    pub token: Option<String>,
    /// How long a subscribe or publish waits for the node's answer.
    pub request_timeout: Duration,
    /// How long one connection attempt (TCP, WebSocket, Connect) may take.
    pub connect_timeout: Duration,
    /// Reconnect back-off.
    pub reconnect: ReconnectPolicy,
    /// Events buffered per subscription. When the application reads slower than messages
    /// arrive, the client stops reading the socket; the node then closes the connection as a
    /// slow consumer and the client reconnects (see `Event::Discontinuity`).
    pub subscription_buffer: usize,
    /// How long the ids of delivered messages are remembered to drop a second copy of a
    /// retried publish (one whose first copy was delivered but whose ack was lost to a
    /// crash or a failover). The nodes' `limits.dedupe_window` (2 minutes) bounds how late
    /// such a copy can come.
    pub dedupe_window: Duration,
    /// Most ids remembered per channel (as 8-byte hashes); a channel busier than this over
    /// `dedupe_window` forgets the oldest first.
    pub dedupe_ids: usize,
}

/// Exponential back-off with full jitter: attempt n waits a random time in
/// `[0, min(max, initial * 2^n)]`.
#[derive(Debug, Clone)]
pub struct ReconnectPolicy {
    /// Whether to reconnect at all after the first connection is lost.
    pub enabled: bool,
    /// First back-off ceiling.
    pub initial: Duration,
    /// Largest back-off ceiling.
    pub max: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self { enabled: true, initial: Duration::from_millis(100), max: Duration::from_secs(10) }
    }
}

impl ReconnectPolicy {
    /// The delay before attempt `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.initial.saturating_mul(1u32 << attempt.min(16)).min(self.max);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            format: Format::Protobuf,
            client_id: None,
            token: None,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            reconnect: ReconnectPolicy::default(),
            subscription_buffer: 1024,
            dedupe_window: Duration::from_secs(120),
            dedupe_ids: 100_000,
        }
    }
}
