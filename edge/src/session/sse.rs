//! Plain server-sent events for a browser's `EventSource`, with no SDK:
//! `GET /v1/sse?channel=a&channel=b[&rewind=N][&token=…]`.
//!
//! The node opens a session on the client's behalf (its `Connect` and one `Subscribe` per
//! channel) and writes each delivered message as one event whose `id:` is a cursor: per
//! channel, the position on this node and the per-origin vector, the same a `Resume` needs.
//! `EventSource` sends the last id back as `Last-Event-ID` when it reconnects, and the
//! subscriptions resume from it — on this node, after its restart, or on another region's
//! node — with every missed message once, in order, or a `discontinuity` event.
//!
//! Events: `connected` (the `Connected` frame), `subscribed`, messages (the default event
//! type, so `onmessage` gets them; data is the message in the JSON mapping), `discontinuity`,
//! `error` (an `Error` frame, e.g. a subscription refused) and `close` (the code and reason
//! where a WebSocket would close). Keep-alives are comments.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use tern_proto::client::{self, ErrorCode, client_frame, server_frame};
use tern_proto::codec::{self, EncodedMessage, Format};
use tern_proto::types::ChannelName;
use tokio::sync::mpsc;

use super::core::{End, Input};
use super::driver::{self, Wire};
use crate::node::Node;

/// The cursor an event id carries (protobuf, base64url without padding).
#[derive(Clone, PartialEq, prost::Message)]
struct Cursor {
    /// The node that delivered the positions.
    #[prost(string, tag = "1")]
    node: String,
    #[prost(message, repeated, tag = "2")]
    channels: Vec<ChannelCursor>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ChannelCursor {
    #[prost(string, tag = "1")]
    channel: String,
    #[prost(message, optional, tag = "2")]
    position: Option<client::Position>,
    #[prost(message, repeated, tag = "3")]
    origins: Vec<client::OriginPosition>,
}

/// Longest `Last-Event-ID` taken (a cursor of 100 channels of a few origins fits).
const MAX_CURSOR: usize = 64 * 1024;

/// Bytes of events written to the response at once: an id that grows with the channels
/// does not make a turn's buffer grow with it.
const EVENTS_CHUNK: usize = 256 * 1024;

/// The cursor as an event id; channels with nothing known yet (no message, not live yet)
/// are left out, so they start afresh rather than resume from nothing.
fn encode_cursor(c: &Cursor) -> String {
    let known = |ch: &&ChannelCursor| ch.position.is_some() || !ch.origins.is_empty();
    let c = Cursor {
        node: c.node.clone(),
        channels: c.channels.iter().filter(known).cloned().collect(),
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c.encode_to_vec())
}

fn decode_cursor(s: &str) -> Option<Cursor> {
    if s.len() > MAX_CURSOR {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim()).ok()?;
    Cursor::decode(bytes.as_slice()).ok()
}

/// What `GET /v1/sse` asks for.
#[derive(Debug, Default)]
pub struct Request {
    /// The channels, in order.
    pub channels: Vec<String>,
    /// Recent messages to start with (history namespaces).
    pub rewind: u32,
    /// The token (query `token`, or `Authorization: Bearer`).
    pub token: Option<String>,
    /// `Last-Event-ID`, or the `lastEventId` query parameter.
    pub last_event_id: Option<String>,
}

fn refuse(status: StatusCode, code: ErrorCode, reason: String) -> Response {
    crate::http::error_response(status, code, reason)
}

/// A refusal `EventSource` retries (any status but 200 stops it for good): 200, a `retry:`
/// of `retry_ms`, and a `close` event with `code`.
fn come_back(code: u16, reason: &str, retry_ms: u32) -> Response {
    let closed = client::Closed { code: u32::from(code), reason: reason.into() };
    let body = format!(
        "retry: {retry_ms}\nevent: close\ndata: {}\n\n",
        String::from_utf8_lossy(&json(&closed))
    );
    let mut res = Response::new(Body::from(body));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Opens a plain SSE stream. The request is checked before the stream starts, so
/// `EventSource` sees a failure it does not retry: 400 `INVALID_ARGUMENT` for no channel,
/// too many (`limits.max_channels_per_connection`), a `rewind` above 100 or a
/// `Last-Event-ID` that is no cursor of this protocol; 400 `INVALID_CHANNEL`; 401
/// `UNAUTHORIZED` for a missing or bad token (token mode); 403 `FORBIDDEN` for a channel
/// the token may not subscribe to. At the connection limits or while the node shuts down
/// it answers 200 with `retry:` and a `close` event (1013, 1001): `EventSource` comes back.
pub async fn open(node: Arc<Node>, ip: Option<IpAddr>, req: Request) -> Response {
    let cfg = &node.settings().config;
    let max = cfg.limits.max_channels_per_connection;
    if req.channels.is_empty() || req.channels.len() > max {
        let reason = format!("name 1 to {max} channels (channel=…&channel=…)");
        return refuse(StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument, reason);
    }
    for c in &req.channels {
        if let Err(e) = ChannelName::validate(c) {
            return refuse(StatusCode::BAD_REQUEST, ErrorCode::InvalidChannel, e.to_string());
        }
    }
    if req.rewind > 100 {
        let reason = "rewind must be at most 100".into();
        return refuse(StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument, reason);
    }
    let cursor = match req.last_event_id.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(id) => match decode_cursor(id) {
            Some(c) => Some(c),
            None => {
                let reason = "Last-Event-ID is not an event id of this stream".into();
                return refuse(StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument, reason);
            }
        },
    };
    let verifier = &node.settings().auth;
    if verifier.mode() == crate::auth::AuthMode::Token {
        let claims = match verifier.verify(req.token.as_deref().unwrap_or("")) {
            Ok(c) => c,
            Err(e) => {
                return refuse(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, e.to_string());
            }
        };
        if let Some(c) =
            req.channels.iter().find(|c| !claims.allows(crate::auth::Operation::Subscribe, c))
        {
            let reason = format!("the token does not allow subscribe on {c}");
            return refuse(StatusCode::FORBIDDEN, ErrorCode::Forbidden, reason);
        }
    }
    if node.is_draining() {
        // A node that stops is back (or replaced) soon; a drained one may stay drained.
        let retry = if node.shutdown().is_cancelled() { 1000 } else { 5000 };
        return come_back(tern_proto::close::GOING_AWAY, node.drain_reason(), retry);
    }
    let slot = match ip.map(|ip| node.open_from(ip)) {
        Some(None) => {
            let reason = "connection limit for this address reached";
            return come_back(tern_proto::close::TRY_AGAIN_LATER, reason, 5000);
        }
        Some(slot) => slot,
        None => None,
    };
    let Some(admission) = node.admit(crate::metrics::Transport::PlainSse) else {
        return come_back(tern_proto::close::TRY_AGAIN_LATER, "connection limit reached", 5000);
    };

    // The frames a client would send, in protobuf (what the wire reads back).
    let mut pending = VecDeque::new();
    let connect = client::Connect { protocol: tern_proto::PROTOCOL_VERSION, ..Default::default() };
    pending.push_back(frame(client_frame::Kind::Connect(connect)));
    let mut channels = Vec::new();
    for (i, channel) in req.channels.iter().enumerate() {
        let known = cursor.as_ref().and_then(|c| {
            let ch = c.channels.iter().find(|x| &x.channel == channel)?;
            Some((c.node.clone(), ch.clone()))
        });
        let (resume, rewind) = match known {
            Some((node_id, ch)) => {
                let resume = client::Resume {
                    node: node_id,
                    position: ch.position,
                    origins: ch.origins.clone(),
                };
                channels.push(ChannelCursor { channel: channel.clone(), ..ch });
                (Some(resume), None)
            }
            None => {
                channels.push(ChannelCursor { channel: channel.clone(), ..Default::default() });
                let rewind =
                    (req.rewind > 0).then_some(client::Rewind { count: req.rewind, since_ms: 0 });
                (None, rewind)
            }
        };
        let subscribe = client::Subscribe {
            request_id: u32::try_from(i + 1).unwrap_or(u32::MAX),
            channel: channel.clone(),
            rewind,
            resume,
            presence: false,
        };
        pending.push_back(frame(client_frame::Kind::Subscribe(subscribe)));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let mut wire = SseWire {
        pending,
        down: tx,
        buf: BytesMut::new(),
        cursor: Cursor { node: node.settings().node.to_string(), channels },
    };
    let token = req.token;
    let task_node = node.clone();
    node.tracker().spawn(async move {
        let node = task_node;
        driver::run(&mut wire, &node, admission.id, Format::Protobuf, token).await;
        drop((slot, admission));
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut res = Response::new(Body::from_stream(body));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

fn frame(kind: client_frame::Kind) -> Input {
    Input::Frame(codec::encode_client(kind, Format::Protobuf), false)
}

struct SseWire {
    /// The frames sent on the client's behalf, not yet handled.
    pending: VecDeque<Input>,
    down: mpsc::Sender<Bytes>,
    buf: BytesMut,
    /// Where the client is: the id of its next message event.
    cursor: Cursor,
}

impl SseWire {
    fn event(&mut self, name: Option<&str>, id: Option<&str>, data: &[u8]) {
        if let Some(id) = id {
            self.buf.put_slice(b"id: ");
            self.buf.put_slice(id.as_bytes());
            self.buf.put_u8(b'\n');
        }
        if let Some(name) = name {
            self.buf.put_slice(b"event: ");
            self.buf.put_slice(name.as_bytes());
            self.buf.put_u8(b'\n');
        }
        // Our JSON has no raw newline: one `data:` line.
        self.buf.put_slice(b"data: ");
        self.buf.put_slice(data);
        self.buf.put_slice(b"\n\n");
    }

    /// One message event: `json` is `m` in the JSON mapping; its id, the cursor after it.
    fn message(&mut self, m: &client::Message, json: &[u8]) {
        if let Some(ch) = self.channel(&m.channel) {
            ch.position = m.position;
            match ch.origins.iter_mut().find(|o| o.origin == m.origin) {
                Some(o) => (o.epoch, o.seq) = (m.origin_epoch, m.origin_seq),
                None => ch.origins.push(client::OriginPosition {
                    origin: m.origin.clone(),
                    epoch: m.origin_epoch,
                    seq: m.origin_seq,
                }),
            }
        }
        let id = encode_cursor(&self.cursor);
        self.event(None, Some(&id), json);
    }

    fn channel(&mut self, name: &str) -> Option<&mut ChannelCursor> {
        self.cursor.channels.iter_mut().find(|c| c.channel == name)
    }

    /// Writes the events of one server frame, keeping the cursor.
    fn on_frame(&mut self, kind: server_frame::Kind) {
        use server_frame::Kind;
        match kind {
            Kind::Connected(c) => {
                self.cursor.node = c.node.clone();
                self.event(Some("connected"), None, &json(&c));
            }
            Kind::Subscribed(s) => {
                if let Some(ch) = self.channel(&s.channel) {
                    if !s.resumed {
                        ch.position = s.position;
                        ch.origins = s.origins.clone();
                    }
                }
                self.event(Some("subscribed"), None, &json(&s));
            }
            Kind::Deliver(d) => {
                for m in d.messages {
                    self.message(&m, &json(&m));
                }
            }
            Kind::Discontinuity(d) => self.event(Some("discontinuity"), None, &json(&d)),
            Kind::Error(e) => self.event(Some("error"), None, &json(&e)),
            Kind::Close(c) => self.event(Some("close"), None, &json(&c)),
            // The node drains: reconnect elsewhere now (`urls`), before the `close` event
            // `closeInMs` later.
            Kind::Draining(d) => self.event(Some("draining"), None, &json(&d)),
            // Nothing else is asked for on this stream.
            _ => {}
        }
    }
}

/// A generated message in the JSON mapping.
fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

impl Wire for SseWire {
    async fn recv(&mut self, frames: bool) -> Input {
        if frames {
            if let Some(input) = self.pending.pop_front() {
                return input;
            }
        }
        // The client sends nothing more: wait for it to go away.
        self.down.closed().await;
        Input::End(End::Gone)
    }

    fn try_recv(&mut self) -> Option<Input> {
        self.pending.pop_front()
    }

    fn held(&self) -> bool {
        true
    }

    async fn feed(&mut self, frame: Bytes) -> std::io::Result<()> {
        if let Ok(kind) = codec::decode_server(&frame, false) {
            self.on_frame(kind);
        }
        if self.buf.len() >= EVENTS_CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    fn messages_apart(&self) -> bool {
        true
    }

    /// Each message's JSON is the one every JSON subscriber shares (encoded once per
    /// message); only its event id, the cursor, is this client's.
    async fn feed_messages(&mut self, messages: Vec<Arc<EncodedMessage>>) -> std::io::Result<()> {
        for m in &messages {
            self.message(m.message(), m.piece(Format::Json));
        }
        if self.buf.len() >= EVENTS_CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    fn drains(&self) -> bool {
        true
    }

    async fn ping(&mut self) -> std::io::Result<()> {
        self.buf.put_slice(b":\n\n");
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.down.send(chunk).await.map_err(|_| std::io::ErrorKind::BrokenPipe.into())
    }

    async fn close(&mut self, end: End, node: &Node) {
        let End::Close(code, reason) = end else { return };
        self.on_frame(server_frame::Kind::Close(client::Closed { code: u32::from(code), reason }));
        let _ = tokio::time::timeout(node.settings().config.timeouts.close, self.flush()).await;
    }
}
