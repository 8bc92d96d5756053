//! HTTP transports for clients that cannot hold a WebSocket (proxies that refuse upgrades,
//! old middleboxes): a session opened over HTTP streaming, server-sent events or long
//! polling, whose client frames are POSTed to it. The same [`Session`](super::core::Session)
//! runs behind every one, so frames, errors and close codes are the WebSocket's.
//!
//! ```text
//!   GET  /v1/sessions?transport=stream|sse|poll   opens: the first frame is `session`
//!   POST /v1/sessions/{id}                        client frames (one or many)
//!   GET  /v1/sessions/{id}/poll?ack=N             long polling: the frames queued since
//!   DELETE /v1/sessions/{id}                      the client leaves
//! ```
//!
//! Framing: JSON frames one per line (`application/x-ndjson`); protobuf frames each behind
//! its varint length (`application/x-protobuf`); SSE one `data:` event per frame. A stream
//! session lives as long as its response: when it ends the session ends (the client opens a
//! new one and resumes, as after a WebSocket drop). A long-polling session lives between
//! polls for `heartbeat.idle_timeout`; a poll names the last answer it got (`ack`), and an
//! answer that did not arrive is sent again, so nothing is lost between polls.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tern_proto::client::{self, ErrorCode, server_frame};
use tern_proto::codec::{self, Format};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::core::{End, Input};
use super::driver::{self, Wire};
use crate::node::Node;

/// How an HTTP session's frames reach the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One streamed response: frames one per line (JSON) or length-prefixed (protobuf).
    Stream,
    /// One `text/event-stream` response: an event per frame (JSON only).
    Sse,
    /// A GET per batch of frames.
    Poll,
}

impl Transport {
    /// Parses `stream`, `sse` or `poll`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stream" => Some(Self::Stream),
            "sse" => Some(Self::Sse),
            "poll" => Some(Self::Poll),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Stream => "stream",
            Self::Sse => "sse",
            Self::Poll => "poll",
        }
    }
}

/// POSTs that may wait for a session to take their frames before more are refused (429):
/// a client posting faster than its session takes the frames is held back, and what one
/// session holds of posted frames stays bounded (this many × [`max_post_bytes`]).
const POSTS_QUEUED: usize = 2;

/// Most frames in one POST (more: 413), so a body of tiny frames holds no more memory than
/// its bytes.
const FRAMES_PER_POST: usize = 256;

/// Chunks of a streamed response waiting for the socket; then the session's writes wait
/// (and a client that does not read is a slow consumer, as over a WebSocket).
const STREAM_CHUNKS: usize = 4;

/// Most bytes of client frames in one POST: four frames of `limits.max_frame_bytes`.
fn max_post_bytes(node: &Node) -> usize {
    node.settings().config.limits.max_frame_bytes.saturating_mul(4)
}

/// The open HTTP sessions of a node, by id.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Clone)]
struct Entry {
    secret: String,
    format: Format,
    transport: Transport,
    frames: mpsc::Sender<Vec<Input>>,
    polls: mpsc::Sender<Poll>,
}

impl Registry {
    fn get(&self, id: &str) -> Option<Entry> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned()
    }

    fn insert(&self, id: String, entry: Entry) {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner).insert(id, entry);
    }

    fn remove(&self, id: &str) {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
    }

    /// Open HTTP sessions.
    pub fn len(&self) -> usize {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether no HTTP session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A long poll: the last batch the client got, and where to answer.
#[derive(Debug)]
struct Poll {
    ack: u64,
    answer: oneshot::Sender<PollAnswer>,
}

/// What a long poll is answered with.
#[derive(Debug)]
enum PollAnswer {
    /// Frames (possibly none) and the batch number they carry.
    Frames(u64, Bytes),
    /// The poll's `ack` names an answer older than the one kept for a resend.
    Conflict(u64),
}

/// 128 random bits, hex.
fn random_id() -> String {
    use rand::Rng;
    let bits: u128 = rand::rng().random();
    format!("{bits:032x}")
}

fn error(status: StatusCode, code: ErrorCode, reason: String) -> Response {
    crate::http::error_response(status, code, reason)
}

fn unavailable(reason: &str, retry_after: &'static str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, reason.into());
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(retry_after));
    r
}

fn content_type(transport: Transport, format: Format) -> &'static str {
    match (transport, format) {
        (Transport::Sse, _) => "text/event-stream",
        (_, Format::Json) => "application/x-ndjson",
        (_, Format::Protobuf) => "application/x-protobuf",
    }
}

/// Frames `frame` for `transport` into `buf`.
fn put_frame(buf: &mut BytesMut, transport: Transport, format: Format, frame: &[u8]) {
    match (transport, format) {
        // Our JSON encoder writes no raw newline: one frame per line, one per event.
        (Transport::Sse, _) => {
            buf.put_slice(b"data: ");
            buf.put_slice(frame);
            buf.put_slice(b"\n\n");
        }
        (_, Format::Json) => {
            buf.put_slice(frame);
            buf.put_u8(b'\n');
        }
        (_, Format::Protobuf) => {
            prost::encoding::encode_varint(frame.len() as u64, buf);
            buf.put_slice(frame);
        }
    }
}

/// `GET /v1/sessions?transport=stream|sse|poll&format=json|proto&token=…`: opens an HTTP
/// session. The token (query or `Authorization: Bearer`) is the one `Connect` falls back to,
/// as with `/v1/ws?token=`. Answers 400 for an unknown transport or format (SSE is JSON
/// only), 503 at `limits.max_connections` or `limits.max_connections_per_ip` (sessions and
/// TCP connections of an address count together) or while the node shuts down.
pub async fn open(
    node: Arc<Node>,
    ip: Option<IpAddr>,
    transport: Option<&str>,
    format: Option<&str>,
    token: Option<String>,
) -> Response {
    let Some(transport) = transport.and_then(Transport::parse) else {
        let reason = "transport must be stream, sse or poll".into();
        return error(StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument, reason);
    };
    let format = match format.map(Format::parse) {
        None => Format::Json,
        Some(Some(f)) => f,
        Some(None) => {
            let reason = "format must be json or proto".into();
            return error(StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument, reason);
        }
    };
    if transport == Transport::Sse && format == Format::Protobuf {
        let reason = "server-sent events carry JSON only".into();
        return error(StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument, reason);
    }
    if node.is_draining() {
        return unavailable(node.drain_reason(), "1");
    }
    let slot = match ip {
        Some(ip) => match node.open_from(ip) {
            Some(s) => Some(s),
            None => return unavailable("connection limit for this address reached", "5"),
        },
        None => None,
    };
    let metric = match transport {
        Transport::Stream => crate::metrics::Transport::Stream,
        Transport::Sse => crate::metrics::Transport::Sse,
        Transport::Poll => crate::metrics::Transport::Poll,
    };
    let Some(admission) = node.admit(metric) else {
        return unavailable("connection limit reached", "5");
    };
    let (id, secret) = (random_id(), random_id());
    let cfg = &node.settings().config;
    let opened = server_frame::Kind::Session(client::SessionOpened {
        id: id.clone(),
        secret: secret.clone(),
        transport: transport.name().into(),
        poll_wait_ms: u32::try_from(cfg.timeouts.long_poll.as_millis()).unwrap_or(u32::MAX),
    });
    let mut first = BytesMut::new();
    put_frame(&mut first, transport, format, &codec::encode_server(opened, format));
    let (frames_tx, frames) = mpsc::channel(POSTS_QUEUED);
    let (polls_tx, polls) = mpsc::channel(1);
    let (down, body) = match transport {
        Transport::Stream | Transport::Sse => {
            let (tx, rx) = mpsc::channel::<Bytes>(STREAM_CHUNKS);
            let _ = tx.try_send(first.split().freeze());
            let body = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
            });
            (Down::Stream(tx), Body::from_stream(body))
        }
        // The open answer is batch 0: the `session` frame.
        Transport::Poll => {
            (Down::Poll { waiting: None, batch: 0, kept: None }, Body::from(first.split().freeze()))
        }
    };
    let entry = Entry { secret, format, transport, frames: frames_tx, polls: polls_tx };
    let registry = node.http_sessions();
    registry.insert(id.clone(), entry);
    let mut wire = HttpWire {
        transport,
        format,
        frames,
        pending: VecDeque::new(),
        polls,
        down,
        buf: BytesMut::new(),
        long_poll: cfg.timeouts.long_poll,
    };
    let task_node = node.clone();
    node.tracker().spawn(async move {
        let node = task_node;
        driver::run(&mut wire, &node, admission.id, format, token).await;
        node.http_sessions().remove(&id);
        drop((slot, admission));
    });
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(transport, format)));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Proxies that buffer answers (nginx) pass a stream on as it comes.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if transport == Transport::Poll {
        h.insert("x-tern-batch", HeaderValue::from_static("0"));
    }
    res
}

/// The session `id` if `secret` is its secret: 404 `NOT_FOUND` for no such session (never
/// opened, or ended), 403 `FORBIDDEN` for a wrong or missing secret.
fn session(node: &Node, id: &str, secret: Option<&str>) -> Result<Entry, Box<Response>> {
    let Some(entry) = node.http_sessions().get(id) else {
        let reason = "no such session (it ended, or never existed): open a new one".into();
        return Err(Box::new(error(StatusCode::NOT_FOUND, ErrorCode::NotFound, reason)));
    };
    // Compared in constant time: the secret is the session's only credential.
    let given = secret.unwrap_or("").as_bytes();
    if !bool::from(subtle::ConstantTimeEq::ct_eq(given, entry.secret.as_bytes())) {
        let reason = "wrong or missing session secret".into();
        return Err(Box::new(error(StatusCode::FORBIDDEN, ErrorCode::Forbidden, reason)));
    }
    Ok(entry)
}

/// The session secret of a request: `X-Tern-Session-Secret`, else the `secret` query
/// parameter.
pub fn secret_of<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    headers.get("x-tern-session-secret").and_then(|v| v.to_str().ok()).or(query)
}

/// `POST /v1/sessions/{id}`: client frames for the session, handled as if they arrived on
/// its WebSocket (in order, answered on the session's stream or polls). Answers 202 once
/// the session has them; 404/403 (see [`session`]); 413 `MESSAGE_TOO_LARGE` for a body
/// over 4 × `limits.max_frame_bytes`, a frame over `limits.max_frame_bytes` or more than 256
/// frames; 400 `BAD_FRAME` for a protobuf body that is not a sequence of length-prefixed
/// frames; 408 for a body not received within `timeouts.http_body`; 429 `RATE_LIMITED`
/// while 2 earlier POSTs wait for the session. Nothing of a refused POST reaches the session.
pub async fn post(node: Arc<Node>, id: &str, secret: Option<&str>, body: Body) -> Response {
    let entry = match session(&node, id, secret) {
        Ok(e) => e,
        Err(r) => return *r,
    };
    let cfg = &node.settings().config;
    // A session that is not taking frames is answered before the body is read.
    if entry.frames.capacity() == 0 {
        return busy();
    }
    let limit = max_post_bytes(&node);
    let what = "4 × limits.max_frame_bytes";
    let body = match crate::http::read_body(&node, body, limit, what).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let frames = match split_frames(body, entry.format, cfg.limits.max_frame_bytes) {
        Ok(f) => f,
        Err((status, code, reason)) => return error(status, code, reason),
    };
    if frames.is_empty() {
        return StatusCode::ACCEPTED.into_response();
    }
    match entry.frames.try_send(frames) {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(mpsc::error::TrySendError::Full(_)) => busy(),
        Err(mpsc::error::TrySendError::Closed(_)) => {
            let reason = "the session ended".into();
            error(StatusCode::NOT_FOUND, ErrorCode::NotFound, reason)
        }
    }
}

/// 429: earlier POSTs still wait for the session.
fn busy() -> Response {
    let reason = format!("{POSTS_QUEUED} posts already wait for this session");
    let mut r = error(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, reason);
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Splits a POST body into client frames: JSON lines (blank lines skipped), or protobuf
/// frames each behind its varint length.
fn split_frames(
    body: Bytes,
    format: Format,
    max_frame: usize,
) -> Result<Vec<Input>, (StatusCode, ErrorCode, String)> {
    let too_big = || {
        let reason = format!("a frame is over limits.max_frame_bytes ({max_frame} bytes)");
        (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::MessageTooLarge, reason)
    };
    let too_many = || {
        let reason = format!("more than {FRAMES_PER_POST} frames in one POST");
        (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::MessageTooLarge, reason)
    };
    let mut frames = Vec::new();
    match format {
        Format::Json => {
            let mut rest = body;
            while !rest.is_empty() {
                let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
                let mut line = rest.split_to(end);
                if !rest.is_empty() {
                    rest.advance(1);
                }
                if line.last() == Some(&b'\r') {
                    line.truncate(line.len() - 1);
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if line.len() > max_frame {
                    return Err(too_big());
                }
                if frames.len() == FRAMES_PER_POST {
                    return Err(too_many());
                }
                frames.push(Input::Frame(line, true));
            }
        }
        Format::Protobuf => {
            let mut rest = body;
            while !rest.is_empty() {
                let mut cursor = &rest[..];
                let len = prost::encoding::decode_varint(&mut cursor).map_err(|e| {
                    let reason = format!("a frame's length prefix: {e}");
                    (StatusCode::BAD_REQUEST, ErrorCode::BadFrame, reason)
                })?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > max_frame {
                    return Err(too_big());
                }
                let head = rest.len() - cursor.len();
                if cursor.len() < len {
                    let reason = "the body ends inside a frame".into();
                    return Err((StatusCode::BAD_REQUEST, ErrorCode::BadFrame, reason));
                }
                rest.advance(head);
                if frames.len() == FRAMES_PER_POST {
                    return Err(too_many());
                }
                frames.push(Input::Frame(rest.split_to(len), false));
            }
        }
    }
    Ok(frames)
}

/// `GET /v1/sessions/{id}/poll?ack=N`: the frames of a long-polling session. `ack` is the
/// batch number (`X-Tern-Batch`) of the last answer received (0: the open answer). An
/// answer that was not acknowledged is sent again, with its number; otherwise the poll
/// waits up to `timeouts.long_poll` for frames and is answered with what came (200, maybe
/// empty, with the batch number). 404/403 (see [`session`]); 409 for an `ack` older than
/// the answer kept; 400 for a session of another transport. A newer poll answers an older
/// one still waiting, empty.
pub async fn poll(node: Arc<Node>, id: &str, secret: Option<&str>, ack: u64) -> Response {
    let entry = match session(&node, id, secret) {
        Ok(e) => e,
        Err(r) => return *r,
    };
    if entry.transport != Transport::Poll {
        let reason = "this session is not a long-polling one".into();
        return error(StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument, reason);
    }
    let (tx, rx) = oneshot::channel();
    if entry.polls.send(Poll { ack, answer: tx }).await.is_err() {
        return error(StatusCode::NOT_FOUND, ErrorCode::NotFound, "the session ended".into());
    }
    match rx.await {
        Ok(PollAnswer::Frames(batch, body)) => {
            let mut res = Response::new(Body::from(body));
            let h = res.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(content_type(Transport::Poll, entry.format)),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert("x-tern-batch", HeaderValue::from(batch));
            res
        }
        Ok(PollAnswer::Conflict(kept)) => {
            let reason = format!("ack {ack} is older than the answer kept ({kept})");
            error(StatusCode::CONFLICT, ErrorCode::InvalidArgument, reason)
        }
        Err(_) => error(StatusCode::NOT_FOUND, ErrorCode::NotFound, "the session ended".into()),
    }
}

/// `DELETE /v1/sessions/{id}`: the client leaves (as a WebSocket client closing): 204;
/// 404/403 (see [`session`]).
pub async fn delete(node: Arc<Node>, id: &str, secret: Option<&str>) -> Response {
    let entry = match session(&node, id, secret) {
        Ok(e) => e,
        Err(r) => return *r,
    };
    node.http_sessions().remove(id);
    // (The session also ends when its registry entry goes: a full queue does not keep it.)
    let _ = entry.frames.try_send(vec![Input::End(End::Gone)]);
    StatusCode::NO_CONTENT.into_response()
}

/// Where a session's frames go.
enum Down {
    /// A streamed response (HTTP streaming or SSE): its body's chunks.
    Stream(mpsc::Sender<Bytes>),
    /// Long polling.
    Poll {
        /// The poll waiting for frames, and when it is answered empty.
        waiting: Option<(oneshot::Sender<PollAnswer>, Instant)>,
        /// The number of the last answer with frames.
        batch: u64,
        /// That answer, until a poll acknowledges it.
        kept: Option<Bytes>,
    },
}

struct HttpWire {
    transport: Transport,
    format: Format,
    /// POSTed frames.
    frames: mpsc::Receiver<Vec<Input>>,
    /// Frames of a POST not handed to the session yet.
    pending: VecDeque<Input>,
    polls: mpsc::Receiver<Poll>,
    down: Down,
    /// Frames fed since the last flush.
    buf: BytesMut,
    long_poll: Duration,
}

impl HttpWire {
    /// A poll arrived: answers it at once with the answer it did not get, or keeps it
    /// waiting for frames (answering an older one still waiting, empty).
    fn attach(&mut self, p: Poll) {
        let Down::Poll { waiting, batch, kept } = &mut self.down else { return };
        if let Some((old, _)) = waiting.take() {
            let _ = old.send(PollAnswer::Frames(*batch, Bytes::new()));
        }
        if p.ack < *batch {
            let answer = match kept {
                Some(body) if p.ack + 1 == *batch => PollAnswer::Frames(*batch, body.clone()),
                _ => PollAnswer::Conflict(*batch),
            };
            let _ = p.answer.send(answer);
            return;
        }
        *kept = None;
        *waiting = Some((p.answer, Instant::now() + self.long_poll));
    }

    fn poll_deadline(&self) -> Option<Instant> {
        match &self.down {
            Down::Poll { waiting: Some((_, at)), .. } => Some(*at),
            _ => None,
        }
    }

    /// Answers the waiting poll with what was fed (or nothing).
    fn answer_poll(&mut self) {
        let Down::Poll { waiting, batch, kept } = &mut self.down else { return };
        let Some((answer, _)) = waiting.take() else { return };
        let body = self.buf.split().freeze();
        if !body.is_empty() {
            *batch += 1;
            *kept = Some(body.clone());
        }
        let _ = answer.send(PollAnswer::Frames(*batch, body));
    }
}

impl Wire for HttpWire {
    async fn recv(&mut self, frames: bool) -> Input {
        loop {
            if frames {
                if let Some(input) = self.pending.pop_front() {
                    return input;
                }
            }
            let deadline = self.poll_deadline();
            let closed = async {
                match &self.down {
                    Down::Stream(tx) => tx.closed().await,
                    Down::Poll { .. } => std::future::pending().await,
                }
            };
            tokio::select! {
                f = self.frames.recv(), if frames => match f {
                    Some(frames) => self.pending.extend(frames),
                    None => return Input::End(End::Gone),
                },
                p = self.polls.recv() => match p {
                    Some(p) => {
                        self.attach(p);
                        return Input::Alive;
                    }
                    None => return Input::End(End::Gone),
                },
                _ = closed => return Input::End(End::Gone),
                _ = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if deadline.is_some() => {
                    self.answer_poll();
                    return Input::Alive;
                }
            }
        }
    }

    fn try_recv(&mut self) -> Option<Input> {
        if self.pending.is_empty() {
            if let Ok(frames) = self.frames.try_recv() {
                self.pending.extend(frames);
            }
        }
        self.pending.pop_front()
    }

    fn writable(&self) -> bool {
        match &self.down {
            Down::Stream(_) => true,
            Down::Poll { waiting, .. } => waiting.is_some(),
        }
    }

    fn held(&self) -> bool {
        self.writable()
    }

    async fn feed(&mut self, frame: Bytes) -> std::io::Result<()> {
        put_frame(&mut self.buf, self.transport, self.format, &frame);
        Ok(())
    }

    fn drains(&self) -> bool {
        true
    }

    async fn ping(&mut self) -> std::io::Result<()> {
        match (self.transport, self.format) {
            // A comment: `EventSource` skips it.
            (Transport::Sse, _) => self.buf.put_slice(b":\n\n"),
            (Transport::Stream, Format::Json) => self.buf.put_u8(b'\n'),
            // A frame of length 0.
            (Transport::Stream, Format::Protobuf) => self.buf.put_u8(0),
            // A poll is answered within `timeouts.long_poll` anyway.
            (Transport::Poll, _) => {}
        }
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        match &self.down {
            Down::Stream(tx) => {
                let chunk = self.buf.split().freeze();
                tx.send(chunk).await.map_err(|_| std::io::ErrorKind::BrokenPipe.into())
            }
            Down::Poll { .. } => {
                self.answer_poll();
                Ok(())
            }
        }
    }

    async fn close(&mut self, end: End, node: &Node) {
        let End::Close(code, reason) = end else { return };
        let closed = server_frame::Kind::Close(client::Closed { code: u32::from(code), reason });
        let frame = codec::encode_server(closed, self.format);
        put_frame(&mut self.buf, self.transport, self.format, &frame);
        // The client gets `timeouts.close` to take the last frame: a long-polling one to come
        // back for it, and to acknowledge it (an answer lost on the way is sent again; the
        // poll that acknowledges it gets 404, the session being over).
        let wait = node.settings().config.timeouts.close;
        let _ = tokio::time::timeout(wait, async {
            loop {
                if self.writable() {
                    let _ = self.flush().await;
                }
                let polling = matches!(self.down, Down::Poll { .. });
                if self.buf.is_empty() && !polling {
                    break;
                }
                let Some(p) = self.polls.recv().await else { break };
                if let Down::Poll { batch, .. } = &self.down {
                    if self.buf.is_empty() && p.ack >= *batch {
                        break;
                    }
                }
                self.attach(p);
            }
        })
        .await;
    }
}
