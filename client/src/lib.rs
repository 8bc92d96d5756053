//! The Tern Rust client SDK.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tern_client::ClientError> {
//! use futures_util::StreamExt;
//! use tern_client::{Client, ClientOptions, Event};
//!
//! let client = Client::connect("ws://127.0.0.1:7400", ClientOptions::default()).await?;
//! let mut sub = client.subscribe("chat:lobby").await?;
//! client.publish("chat:lobby", "hello").await?;
//! while let Some(Event::Message(m)) = sub.next().await {
//!     println!("{:?}", m.data);
//! }
//! # Ok(()) }
//! ```
//!
//! One background task (the driver) owns the connection: a WebSocket, or where none can be
//! opened, an HTTP streaming or long-polling session (see [`Transport`]). It answers pings,
//! matches replies to requests, routes deliveries to subscriptions, and on a lost connection
//! reconnects with exponential back-off and jitter, subscribes again and re-sends unacknowledged publishes
//! with their original ids (the node de-duplicates them). Every subscription resumes where it
//! left off: the SDK presents the node, log position and per-origin vector of the last
//! message it delivered, the node replays what was missed, and the SDK drops anything the
//! application already has, so it sees each message once, in order. What cannot be replayed
//! arrives as [`Event::Discontinuity`]: never a silent hole.
//!
//! Modules: [`options`] (settings), [`driver`] (the connection task), [`subscription`],
//! [`nearest`] (nearest-edge selection by `/v1/ping` probes).

pub mod driver;
pub mod nearest;
pub mod options;
mod pacer;
pub mod presence;
pub mod subscription;
mod transport;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tern_proto::client::{Ack, Connected, ErrorCode, Publish, publish};
use tokio::sync::{mpsc, oneshot, watch};

pub use options::{ClientOptions, ReconnectPolicy, Transport};
pub use presence::{PresenceChange, PresenceWatch};
pub use subscription::{Event, Subscription};
pub use tern_proto::client::{Durability, HistoryPage, HistoryRequest, Message};
pub use tern_proto::client::{PresenceAction, PresenceMember};
pub use tern_proto::codec::Format;

use driver::Command;

/// Errors of client operations.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not a ws://, wss://, http:// or https:// URL.
    #[error("invalid URL {0:?}: expected ws://host:port[/v1/ws]")]
    InvalidUrl(String),
    /// The connection could not be opened (over any transport tried: the message names
    /// each). Retrying later may help.
    #[error("cannot connect: {0}")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The node did not complete the protocol handshake.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The node refused the request; retrying unchanged will not help (except
    /// `RATE_LIMITED`: later, slower — the SDK refuses that itself when its pacing queue
    /// would hold a publish past half the request timeout).
    #[error("refused ({code:?}): {reason}")]
    Refused {
        /// The protocol error code.
        code: ErrorCode,
        /// The node's explanation.
        reason: String,
    },
    /// No answer within `ClientOptions::request_timeout`. The request may still take effect.
    #[error("no answer within the request timeout")]
    Timeout,
    /// The client was closed.
    #[error("client closed")]
    Closed,
}

/// A payload: text or bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// UTF-8 text.
    Text(String),
    /// Bytes.
    Binary(Bytes),
}

impl From<&str> for Payload {
    fn from(s: &str) -> Self {
        Self::Text(s.to_owned())
    }
}
impl From<String> for Payload {
    fn from(s: String) -> Self {
        Self::Text(s)
    }
}
impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        Self::Binary(b)
    }
}
impl From<Vec<u8>> for Payload {
    fn from(b: Vec<u8>) -> Self {
        Self::Binary(b.into())
    }
}

/// Connection state, observable with [`Client::state`].
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectionState {
    /// Connecting or reconnecting.
    Connecting,
    /// Connected; the node's Connected frame.
    Connected(Connected),
    /// Closed for good.
    Closed,
}

/// A connection to a Tern node that survives reconnects. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    cmd: mpsc::Sender<Command>,
    state: watch::Receiver<ConnectionState>,
    ids: Arc<IdGen>,
    options: Arc<ClientOptions>,
    transport: driver::InUse,
}

#[derive(Debug)]
struct IdGen {
    prefix: String,
    next: AtomicU64,
}

impl Client {
    /// Connects to `url` (`ws://host:port`; `/v1/ws` is added when the path is empty). The
    /// first connection must succeed; later losses are repaired in the background.
    pub async fn connect(url: &str, options: ClientOptions) -> Result<Self, ClientError> {
        Self::connect_any(&[url.to_owned()], options).await
    }

    /// Connects to the first of `urls` that answers (in order of preference); when that
    /// connection is lost, reconnects try it twice, then fail over along the list.
    pub async fn connect_any(urls: &[String], options: ClientOptions) -> Result<Self, ClientError> {
        let options = Arc::new(options);
        let transport = driver::InUse::default();
        let (cmd, state) = driver::start(urls, options.clone(), transport.clone()).await?;
        let prefix = format!("{:016x}", rand::random::<u64>());
        let ids = Arc::new(IdGen { prefix, next: AtomicU64::new(1) });
        Ok(Self { cmd, state, ids, options, transport })
    }

    /// Connects to the nearest region: asks `seed` (any edge) for every region's URL
    /// (`/v1/regions`), probes each (`/v1/ping`), and connects to the fastest, keeping the
    /// others, fastest first, for failover.
    pub async fn connect_nearest(seed: &str, options: ClientOptions) -> Result<Self, ClientError> {
        let timeout = std::time::Duration::from_secs(5);
        let tls = options.tls_config();
        let urls = match nearest::regions_with(seed, timeout, &tls).await {
            Ok(list) if !list.is_empty() => list.into_iter().map(|r| r.url).collect(),
            Ok(_) | Err(_) => vec![seed.to_owned()],
        };
        let ranked: Vec<String> =
            nearest::rank_with(&urls, 2, timeout, &tls).await.into_iter().map(|p| p.url).collect();
        Self::connect_any(&ranked, options).await
    }

    /// The current connection state.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// The transport of the current connection (`None` while reconnecting): with
    /// [`Transport::Auto`], a WebSocket unless it could not be opened.
    pub fn transport(&self) -> Option<Transport> {
        *self.transport.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Connected frame of the current connection, if connected.
    pub fn connected(&self) -> Option<Connected> {
        match &*self.state.borrow() {
            ConnectionState::Connected(c) => Some(c.clone()),
            _ => None,
        }
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ClientError>>) -> Command,
    ) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(make(tx)).await.map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(self.options.request_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Subscribes to a channel. Resolves once the node confirmed; deliveries follow on the
    /// returned stream.
    pub async fn subscribe(&self, channel: &str) -> Result<Subscription, ClientError> {
        let channel = channel.to_owned();
        self.request(|reply| Command::Subscribe { channel, rewind: None, reply }).await
    }

    /// Subscribes, starting with the channel's last `count` messages (at most 100; channels
    /// in history namespaces), then live, with no gap or duplicate between the two. Applies
    /// when this starts the connection's subscription to the channel.
    pub async fn subscribe_rewind(
        &self,
        channel: &str,
        count: u32,
    ) -> Result<Subscription, ClientError> {
        let channel = channel.to_owned();
        let rewind = Some(tern_proto::client::Rewind { count, since_ms: 0 });
        self.request(|reply| Command::Subscribe { channel, rewind, reply }).await
    }

    /// Publishes `data` on `channel` and waits for the node's ack.
    pub async fn publish(
        &self,
        channel: &str,
        data: impl Into<Payload>,
    ) -> Result<Ack, ClientError> {
        self.publish_with(channel, "", None, data).await
    }

    /// Publishes with an event name and an optional idempotency key (generated when `None`;
    /// re-sent unchanged after a reconnect, so the message is delivered once).
    pub async fn publish_with(
        &self,
        channel: &str,
        name: &str,
        id: Option<&str>,
        data: impl Into<Payload>,
    ) -> Result<Ack, ClientError> {
        self.publish_durable(channel, name, id, data, Durability::Local).await
    }

    /// Publishes and waits until the message is as durable as asked: in the node's log
    /// (`Local`), or also acknowledged by a node of another region (`Replicated`; fails with
    /// `NotReplicated` when none is reachable in time — the message is still delivered).
    pub async fn publish_durable(
        &self,
        channel: &str,
        name: &str,
        id: Option<&str>,
        data: impl Into<Payload>,
        durability: Durability,
    ) -> Result<Ack, ClientError> {
        let id = match id {
            Some(id) => id.to_owned(),
            None => {
                format!("{}-{}", self.ids.prefix, self.ids.next.fetch_add(1, Ordering::Relaxed))
            }
        };
        let data = match data.into() {
            Payload::Text(t) => publish::Data::Text(t),
            Payload::Binary(b) => publish::Data::Binary(b),
        };
        let frame = Publish {
            request_id: 0,
            channel: channel.to_owned(),
            id,
            name: name.to_owned(),
            data: Some(data),
            durability: durability as i32,
            // Set by the driver as the frame leaves (the last ack's position then).
            after: None,
        };
        self.request(|reply| Command::Publish { frame, reply }).await
    }

    /// Reads a page of a channel's durable history (namespaces that keep it): set `limit`
    /// (default 100, at most 1000), `forwards` (default newest first), `from`/`to` offsets
    /// and `since_ms`/`until_ms`; `HistoryPage::next_from` is the next page's `from`.
    pub async fn history(
        &self,
        channel: &str,
        mut request: tern_proto::client::HistoryRequest,
    ) -> Result<tern_proto::client::HistoryPage, ClientError> {
        channel.clone_into(&mut request.channel);
        self.request(|reply| Command::History { request, reply }).await
    }

    /// Replaces the token before it expires, without reconnecting (token mode): the node
    /// checks it and answers with the new expiry; reconnects present it from now on.
    /// Subscriptions the new token no longer allows are ended by the node (their streams
    /// return `None`). A refused token leaves the old one in force on the node.
    pub async fn renew_token(
        &self,
        token: impl Into<String>,
    ) -> Result<tern_proto::client::AuthRenewed, ClientError> {
        let token = token.into();
        self.request(|reply| Command::Renew { token, reply }).await
    }

    async fn presence_request(
        &self,
        channel: &str,
        action: tern_proto::client::PresenceAction,
        data: Option<Payload>,
        page: (u32, String),
    ) -> Result<tern_proto::client::PresenceReply, ClientError> {
        use tern_proto::client::presence_request::Data;
        let request = tern_proto::client::PresenceRequest {
            request_id: 0,
            channel: channel.to_owned(),
            action: action as i32,
            data: data.map(|d| match d {
                Payload::Text(t) => Data::Text(t),
                Payload::Binary(b) => Data::Binary(b),
            }),
            limit: page.0,
            after: page.1,
        };
        self.request(|reply| Command::Presence { request, reply }).await
    }

    /// Enters this connection's member of `channel` with `data` (or changes its data). The
    /// client enters it again after every reconnect; on the same node within its presence
    /// grace, the member simply stays (nobody sees it leave and enter). Needs the
    /// `presence` capability.
    pub async fn presence_enter(
        &self,
        channel: &str,
        data: Option<Payload>,
    ) -> Result<(), ClientError> {
        self.presence_request(channel, PresenceAction::Enter, data, (0, String::new()))
            .await
            .map(drop)
    }

    /// Changes the member's data (entering it when absent).
    pub async fn presence_update(
        &self,
        channel: &str,
        data: Option<Payload>,
    ) -> Result<(), ClientError> {
        self.presence_request(channel, PresenceAction::Update, data, (0, String::new()))
            .await
            .map(drop)
    }

    /// The member leaves `channel` (and is no longer entered after reconnects).
    pub async fn presence_leave(&self, channel: &str) -> Result<(), ClientError> {
        self.presence_request(channel, PresenceAction::Leave, None, (0, String::new()))
            .await
            .map(drop)
    }

    /// Every member of `channel` the node knows of, read page by page (members that come
    /// and go meanwhile may be missed: [`Client::watch_presence`] is
    /// consistent).
    pub async fn presence_members(
        &self,
        channel: &str,
    ) -> Result<Vec<PresenceMember>, ClientError> {
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let page =
                self.presence_request(channel, PresenceAction::Get, None, (0, after)).await?;
            out.extend(page.members);
            if page.next.is_empty() {
                return Ok(out);
            }
            after = page.next;
        }
    }

    /// Watches `channel`'s presence: the stream yields an `Enter` for each member of the
    /// node's snapshot, then every change. After a reconnect the client compares the new
    /// snapshot with the members it had and yields only the differences. Needs `presence`,
    /// or `subscribe` where the node lets it read presence.
    pub async fn watch_presence(&self, channel: &str) -> Result<PresenceWatch, ClientError> {
        let channel = channel.to_owned();
        self.request(|reply| Command::Watch { channel, reply }).await
    }

    /// Closes the connection (close code 1000) and stops reconnecting.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Command::Close { done: tx }).await.is_ok() {
            let _ = rx.await;
        }
    }
}
