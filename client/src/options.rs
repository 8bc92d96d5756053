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
    /// How frames travel. [`Transport::Auto`] (default): a WebSocket, and where one cannot
    /// be opened, HTTP streaming, then long polling (see [`Transport`]); or one transport,
    /// pinned.
    pub transport: Transport,
    /// TLS for `wss://` and `https://` URLs. `None`: the Mozilla root certificates
    /// (webpki-roots); set it to trust a private CA (see [`ClientOptions::trust_pem`]).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl ClientOptions {
    /// Trusts the CA certificates in `pem` (instead of the public roots) for `wss://`.
    pub fn trust_pem(mut self, pem: &[u8]) -> Result<Self, rustls::Error> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| rustls::Error::General(e.to_string()))?;
            roots.add(cert)?;
        }
        self.tls = Some(std::sync::Arc::new(tls_config(roots)?));
        Ok(self)
    }

    /// The TLS configuration in use: [`ClientOptions::tls`] or the public roots.
    pub(crate) fn tls_config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        use std::sync::{Arc, OnceLock};
        static PUBLIC: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
        self.tls.clone().unwrap_or_else(|| {
            PUBLIC
                .get_or_init(|| {
                    let roots =
                        rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
                    Arc::new(tls_config(roots).expect("the ring provider supports the defaults"))
                })
                .clone()
        })
    }
}

fn tls_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// How a client's frames travel.
///
/// The same frames, errors and guarantees (resume, dedupe, ordering) hold on each; they
/// differ in cost: a WebSocket is one connection, HTTP streaming two (one streamed answer
/// down, POSTs up), long polling two with a request per batch down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// A WebSocket where one can be opened. For each URL, when the WebSocket upgrade is
    /// answered with an HTTP status instead of `101` (a proxy that refuses upgrades; not
    /// 429 or 503, which a busy or draining node answers), or stalls past
    /// `connect_timeout` twice in a row (on the first connection, once: a middlebox that
    /// holds upgrades), the client opens an HTTP streaming session instead, and long
    /// polling where that fails the same way. Resets and refused connections (a node that
    /// is down or restarting) never cause a fallback. The transport that worked is kept
    /// for the URL for [`Transport::FALLBACK_KEPT`]; reconnects after that try the
    /// WebSocket again.
    Auto,
    /// Only a WebSocket (`/v1/ws`).
    WebSocket,
    /// Only an HTTP streaming session (`/v1/sessions?transport=stream`).
    Stream,
    /// Only a long-polling session (`/v1/sessions?transport=poll`).
    Poll,
}

impl Transport {
    /// How long a fallback found by [`Transport::Auto`] is kept for a URL before the
    /// WebSocket is tried again: 5 minutes.
    pub const FALLBACK_KEPT: std::time::Duration = std::time::Duration::from_secs(300);

    /// The transport's name in `/v1/sessions?transport=` (`websocket` for the WebSocket,
    /// `auto` for [`Transport::Auto`]).
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::WebSocket => "websocket",
            Self::Stream => "stream",
            Self::Poll => "poll",
        }
    }
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
            transport: Transport::Auto,
            tls: None,
        }
    }
}
