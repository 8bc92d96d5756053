//! How frames travel: a WebSocket, or an HTTP session where a WebSocket cannot be opened
//! (docs/protocol.md, "HTTP transports"): HTTP streaming (one answer, as long as the
//! session, carries the node's frames) or long polling (a GET per batch), with the client's
//! frames POSTed. The driver sees one [`Link`] either way: frames in, frames out, and a
//! reason when it ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tern_proto::client::{Connect, Connected, client_frame, server_frame};
use tern_proto::codec::{self, Format};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, warn};

use crate::ClientError;
use crate::options::{ClientOptions, Transport};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Frames a POST carries at most (the node's limit).
const POST_FRAMES: usize = 256;
/// Bytes a POST carries before `Connected` says the node's frame limit (4 × 16 KiB).
const POST_BYTES: usize = 64 * 1024;
/// Frames read ahead of the driver on an HTTP downlink.
const DOWN_QUEUE: usize = 64;
/// Largest poll answer or partial stream frame kept (a node's batches stay far below).
const DOWN_BYTES: usize = 64 * 1024 * 1024;
/// How long closing waits for the node's goodbye.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What a link gave.
pub(crate) enum Received {
    /// A server frame.
    Frame(server_frame::Kind),
    /// Only a sign of life (a ping, a keep-alive, an empty poll answer).
    Alive,
    /// The node ended the session with this close code and reason.
    Closed(u16, String),
    /// The transport failed.
    Lost(String),
}

/// One connection to a node, over any transport.
pub(crate) struct Link {
    format: Format,
    inner: Inner,
}

enum Inner {
    Ws(Box<Ws>),
    Http(HttpLink),
}

/// Why opening a transport failed: it decides whether another transport is worth trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Answered with an HTTP status where another was needed (a proxy that refuses the
    /// upgrade, or strips it so that the node answers 400): the next transport, at once.
    /// Not 429 or 503: a node that is busy or draining says "later", not "not this way".
    Refused,
    /// No answer within the connect timeout (a middlebox that holds the upgrade, a proxy
    /// that buffers a streamed answer): the next transport when it happens again.
    Stalled,
    /// Anything else: nothing listens, a reset or a cut mid-handshake (a node that is down
    /// or restarting), the node's own refusal (an `error` frame, a 4xxx close). No other
    /// transport does better; the next attempt waits for the back-off.
    Other,
}

/// A failed open.
pub(crate) struct OpenError {
    pub kind: Failure,
    pub error: ClientError,
}

fn failure(kind: Failure, message: impl Into<String>) -> OpenError {
    OpenError { kind, error: ClientError::Connect(message.into().into()) }
}

/// Opens `url` (a normalised `ws://…/v1/ws?format=…` URL) over `transport` (not `Auto`) and
/// completes the handshake: `connect` with `token`, answered by `connected`.
pub(crate) async fn open(
    url: &str,
    transport: Transport,
    options: &ClientOptions,
    token: Option<&str>,
    recover: &str,
) -> Result<(Link, Connected), OpenError> {
    let attempt = async {
        let inner = match transport {
            Transport::Auto | Transport::WebSocket => {
                Inner::Ws(Box::new(open_ws(url, options).await?))
            }
            Transport::Stream | Transport::Poll => {
                Inner::Http(HttpLink::open(url, transport, options).await?)
            }
        };
        let mut link = Link { format: options.format, inner };
        let connect = Connect {
            protocol: tern_proto::PROTOCOL_VERSION,
            client_id: options.client_id.clone().unwrap_or_default(),
            token: token.unwrap_or_default().to_owned(),
            agent: concat!("tern-rust/", env!("CARGO_PKG_VERSION")).into(),
            recover: recover.to_owned(),
            ..Default::default()
        };
        link.send(client_frame::Kind::Connect(connect))
            .await
            .map_err(|e| failure(Failure::Other, e))?;
        loop {
            match link.recv().await {
                Received::Frame(server_frame::Kind::Connected(c)) => {
                    link.connected(&c);
                    return Ok((link, c));
                }
                Received::Frame(server_frame::Kind::Error(e)) => {
                    let error = ClientError::Handshake(e.reason);
                    return Err(OpenError { kind: Failure::Other, error });
                }
                Received::Frame(other) => {
                    let error = ClientError::Handshake(format!("unexpected frame {other:?}"));
                    return Err(OpenError { kind: Failure::Other, error });
                }
                Received::Alive => {}
                Received::Closed(code, reason) => {
                    let error = ClientError::Handshake(format!("closed: {code} {reason}"));
                    return Err(OpenError { kind: Failure::Other, error });
                }
                Received::Lost(why) => {
                    let error = ClientError::Handshake(why);
                    return Err(OpenError { kind: Failure::Other, error });
                }
            }
        }
    };
    tokio::time::timeout(options.connect_timeout, attempt)
        .await
        .map_err(|_| OpenError { kind: Failure::Stalled, error: ClientError::Timeout })?
}

async fn open_ws(url: &str, options: &ClientOptions) -> Result<Ws, OpenError> {
    use tokio_tungstenite::tungstenite::Error;
    // The library's default 128 KiB read buffer is zero-filled on every read; 8 KiB holds a
    // typical Deliver batch.
    let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
    let connector = tokio_tungstenite::Connector::Rustls(options.tls_config());
    match tokio_tungstenite::connect_async_tls_with_config(url, Some(config), true, Some(connector))
        .await
    {
        Ok((ws, _)) => Ok(ws),
        Err(e) => {
            let kind = match &e {
                Error::Http(res) if ![429, 503].contains(&res.status().as_u16()) => {
                    Failure::Refused
                }
                _ => Failure::Other,
            };
            Err(OpenError { kind, error: ClientError::Connect(Box::new(e)) })
        }
    }
}

impl Link {
    /// The transport in use.
    pub fn transport(&self) -> Transport {
        match &self.inner {
            Inner::Ws(_) => Transport::WebSocket,
            Inner::Http(h) => h.transport,
        }
    }

    /// Learns the node's limits from its `connected` frame.
    fn connected(&mut self, c: &Connected) {
        if let Inner::Http(h) = &self.inner {
            let frame = c.limits.as_ref().map_or(0, |l| l.max_frame_bytes as usize);
            if frame > 0 {
                h.post_bytes.store(4 * frame, Ordering::Relaxed);
            }
        }
    }

    /// Sends one frame (over HTTP: queued for the next POST, in order).
    pub async fn send(&mut self, kind: client_frame::Kind) -> Result<(), String> {
        let bytes = codec::encode_client(kind, self.format);
        match &mut self.inner {
            Inner::Ws(ws) => {
                let msg = match self.format {
                    Format::Protobuf => WsMessage::Binary(bytes),
                    Format::Json => WsMessage::Text(bytes.try_into().unwrap_or_default()),
                };
                ws.send(msg).await.map_err(|e| e.to_string())
            }
            Inner::Http(h) => match &h.up {
                Some(up) => up.send(bytes).await.map_err(|_| "the session's POSTs failed".into()),
                None => Err("closed".into()),
            },
        }
    }

    /// The next thing the node sent. Cancel-safe: nothing is lost when the future is
    /// dropped before it completes.
    pub async fn recv(&mut self) -> Received {
        match &mut self.inner {
            Inner::Ws(ws) => match ws.next().await {
                Some(Ok(WsMessage::Text(t))) => decode(t.as_bytes(), true),
                Some(Ok(WsMessage::Binary(b))) => decode(&b, false),
                Some(Ok(WsMessage::Close(f))) => match f {
                    Some(f) => Received::Closed(f.code.into(), f.reason.to_string()),
                    None => Received::Closed(1005, String::new()),
                },
                Some(Ok(_)) => Received::Alive,
                Some(Err(e)) => Received::Lost(e.to_string()),
                None => Received::Lost("connection closed".into()),
            },
            Inner::Http(h) => match h.down.recv().await {
                Some(Down::Frame(b)) => decode(&b, h.format == Format::Json),
                Some(Down::Alive) => Received::Alive,
                Some(Down::Lost(why)) => Received::Lost(why),
                None => Received::Lost("session ended".into()),
            },
        }
    }

    /// Leaves: a WebSocket close (waiting briefly for the node's reply, so it sees a clean
    /// close), or for an HTTP session its queued POSTs, then `DELETE`.
    pub async fn close(&mut self) {
        match &mut self.inner {
            Inner::Ws(ws) => {
                let _ = WebSocketStream::close(ws.as_mut(), None).await;
                let _ =
                    tokio::time::timeout(CLOSE_WAIT, async { while ws.next().await.is_some() {} })
                        .await;
            }
            Inner::Http(h) => {
                h.up = None;
                if let Some(writer) = h.writer.take() {
                    let _ = tokio::time::timeout(CLOSE_WAIT, writer).await;
                }
                h.reader.abort();
            }
        }
    }
}

fn decode(bytes: &[u8], text: bool) -> Received {
    match codec::decode_server(bytes, text) {
        Ok(server_frame::Kind::Close(c)) => {
            Received::Closed(u16::try_from(c.code).unwrap_or(1011), c.reason)
        }
        Ok(kind) => Received::Frame(kind),
        Err(e) => {
            warn!(error = %e, "undecodable frame from node");
            Received::Alive
        }
    }
}

/// What an HTTP session's downlink task passes on.
enum Down {
    Frame(Bytes),
    Alive,
    Lost(String),
}

/// Where a node's HTTP session endpoints are, from its WebSocket URL: the same host, the
/// path's prefix before `/v1/ws`, and the query's parameters but `format`.
#[derive(Clone)]
struct Base {
    /// The URL to dial (`ws://` or `wss://`, for [`crate::nearest::dial`]).
    url: String,
    authority: String,
    prefix: String,
    query: String,
}

impl Base {
    fn of(url: &str) -> Self {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| (&rest[..i], &rest[i..]));
        let prefix = path.strip_suffix("/v1/ws").unwrap_or("").to_owned();
        let query: String = query
            .split('&')
            .filter(|kv| {
                !kv.is_empty() && !kv.starts_with("format=") && !kv.starts_with("transport=")
            })
            .map(|kv| format!("&{kv}"))
            .collect();
        Self { url: url.to_owned(), authority: authority.to_owned(), prefix, query }
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        secret: &str,
        body: Bytes,
    ) -> hyper::Request<Full<Bytes>> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority);
        if !secret.is_empty() {
            req = req.header("x-tern-session-secret", secret);
        }
        req.body(Full::new(body)).expect("a valid request")
    }
}

type Conn = SendRequest<Full<Bytes>>;

/// An HTTP/1.1 connection to the node (TLS for `wss://`).
async fn dial(base: &Base, options: &ClientOptions) -> Result<Conn, OpenError> {
    let io = crate::nearest::dial(&base.url, &options.tls_config())
        .await
        .map_err(|e| failure(Failure::Other, format!("{}: {e}", base.authority)))?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| failure(Failure::Other, e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "HTTP connection ended");
        }
    });
    Ok(send)
}

/// Reads a (short) answer's body, up to `limit` bytes.
async fn body_of(body: Incoming, limit: usize) -> Result<Bytes, String> {
    Limited::new(body, limit).collect().await.map(|b| b.to_bytes()).map_err(|e| e.to_string())
}

/// An HTTP session: a downlink task (the stream's reader, or the poller) and a writer task
/// that POSTs the client's frames in order, several per request when they queue up.
pub(crate) struct HttpLink {
    transport: Transport,
    format: Format,
    down: mpsc::Receiver<Down>,
    /// Frames for the writer; dropped to leave (the writer then sends `DELETE`).
    up: Option<mpsc::Sender<Bytes>>,
    /// Bytes per POST: 4 × the node's frame limit once known.
    post_bytes: Arc<AtomicUsize>,
    reader: tokio::task::AbortHandle,
    writer: Option<JoinHandle<()>>,
}

impl Drop for HttpLink {
    fn drop(&mut self) {
        // The writer ends by itself: it sends what was queued, then `DELETE`.
        self.reader.abort();
    }
}

/// Splits what arrived of a stream or a poll answer into frames, leaving a partial one in
/// `buf`; a keep-alive (an empty line, an empty protobuf frame) is [`Down::Alive`].
fn split(buf: &mut BytesMut, format: Format, out: &mut Vec<Down>) -> Result<(), String> {
    match format {
        Format::Json => {
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line = buf.split_to(end + 1).freeze();
                let line = line.slice(..end);
                let line = line.strip_suffix(b"\r").map_or(line.clone(), |l| line.slice(..l.len()));
                out.push(if line.is_empty() { Down::Alive } else { Down::Frame(line) });
            }
        }
        Format::Protobuf => loop {
            let mut cursor = &buf[..];
            let Ok(len) = prost::encoding::decode_varint(&mut cursor) else {
                if buf.len() >= 10 {
                    return Err("malformed frame length from node".into());
                }
                break;
            };
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > DOWN_BYTES {
                return Err(format!("a {len}-byte frame from node"));
            }
            let head = buf.len() - cursor.len();
            if cursor.len() < len {
                break;
            }
            buf.advance(head);
            let frame = buf.split_to(len).freeze();
            out.push(if frame.is_empty() { Down::Alive } else { Down::Frame(frame) });
        },
    }
    if buf.len() > DOWN_BYTES {
        return Err("a frame from node over 64 MiB".into());
    }
    Ok(())
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Json => "json",
        Format::Protobuf => "proto",
    }
}

impl HttpLink {
    /// Opens a session (`GET /v1/sessions?transport=…`) and reads its `session` frame.
    async fn open(
        url: &str,
        transport: Transport,
        options: &ClientOptions,
    ) -> Result<Self, OpenError> {
        let base = Base::of(url);
        let format = options.format;
        let mut conn = dial(&base, options).await?;
        let path = format!(
            "{}/v1/sessions?transport={}&format={}{}",
            base.prefix,
            transport.name(),
            format_name(format),
            base.query
        );
        let res = conn
            .send_request(base.request("GET", &path, "", Bytes::new()))
            .await
            .map_err(|e| failure(Failure::Other, format!("{path}: {e}")))?;
        let status = res.status();
        if status != hyper::StatusCode::OK {
            let kind = match status.as_u16() {
                429 | 503 => Failure::Other,
                _ => Failure::Refused,
            };
            let body = body_of(res.into_body(), 4096).await.unwrap_or_default();
            let text = String::from_utf8_lossy(&body);
            return Err(failure(kind, format!("{path} answered {status}: {text}")));
        }
        let (tx, mut down) = mpsc::channel(DOWN_QUEUE);
        let mut first = Vec::new();
        let mut poll_conn = None;
        let reader = match transport {
            Transport::Poll => {
                let body = body_of(res.into_body(), DOWN_BYTES)
                    .await
                    .map_err(|e| failure(Failure::Other, e))?;
                split(&mut BytesMut::from(&body[..]), format, &mut first)
                    .map_err(|e| failure(Failure::Other, e))?;
                poll_conn = Some(conn);
                None
            }
            _ => Some(tokio::spawn(read_stream(res.into_body(), format, tx.clone()))),
        };
        let first = match first.into_iter().next() {
            Some(f) => Some(f),
            None => down.recv().await,
        };
        let session = match first {
            Some(Down::Frame(b)) => codec::decode_server(&b, format == Format::Json).ok(),
            _ => None,
        };
        let Some(server_frame::Kind::Session(session)) = session else {
            if let Some(r) = reader {
                r.abort();
            }
            return Err(failure(Failure::Other, format!("{path}: no session frame first")));
        };
        let reader = match (reader, poll_conn) {
            (Some(r), _) => r,
            (None, Some(conn)) => {
                let poller = Poller {
                    base: base.clone(),
                    options: options.clone(),
                    path: format!("{}/v1/sessions/{}/poll", base.prefix, session.id),
                    secret: session.secret.clone(),
                    format,
                    // The node answers within its wait; beyond it plus a connect timeout,
                    // the poll is lost.
                    wait: Duration::from_millis(u64::from(session.poll_wait_ms))
                        + options.connect_timeout,
                };
                tokio::spawn(poller.run(conn, tx.clone()))
            }
            (None, None) => unreachable!("a poll session keeps its connection"),
        };
        let post_bytes = Arc::new(AtomicUsize::new(POST_BYTES));
        let (up, frames) = mpsc::channel(POST_FRAMES);
        let writer = Writer {
            base: base.clone(),
            options: options.clone(),
            path: format!("{}/v1/sessions/{}", base.prefix, session.id),
            secret: session.secret,
            format,
            post_bytes: post_bytes.clone(),
            conn: None,
        };
        let writer = tokio::spawn(writer.run(frames, tx));
        Ok(Self {
            transport,
            format,
            down,
            up: Some(up),
            post_bytes,
            reader: reader.abort_handle(),
            writer: Some(writer),
        })
    }
}

/// Reads a stream session's answer, frame by frame.
async fn read_stream(mut body: Incoming, format: Format, down: mpsc::Sender<Down>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let why = loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                buf.extend_from_slice(&data);
                if let Err(e) = split(&mut buf, format, &mut out) {
                    break e;
                }
                for d in out.drain(..) {
                    if down.send(d).await.is_err() {
                        return;
                    }
                }
            }
            Some(Err(e)) => break format!("stream: {e}"),
            None => break "the node ended the stream".into(),
        }
    };
    let _ = down.send(Down::Lost(why)).await;
}

/// Polls a long-polling session until it ends.
struct Poller {
    base: Base,
    options: ClientOptions,
    path: String,
    secret: String,
    format: Format,
    wait: Duration,
}

impl Poller {
    async fn run(self, mut conn: Conn, down: mpsc::Sender<Down>) {
        let why = self.poll(&mut conn, &down).await;
        let _ = down.send(Down::Lost(why)).await;
    }

    /// Polls until the session ends; returns why.
    async fn poll(&self, conn: &mut Conn, down: &mpsc::Sender<Down>) -> String {
        let mut ack = 0u64;
        let mut failures = 0;
        let mut out = Vec::new();
        loop {
            let path = format!("{}?ack={ack}", self.path);
            let answer = tokio::time::timeout(self.wait, async {
                // A keep-alive connection takes a request only once done with the last.
                conn.ready().await.map_err(|e| e.to_string())?;
                let req = self.base.request("GET", &path, &self.secret, Bytes::new());
                let res = conn.send_request(req).await.map_err(|e| e.to_string())?;
                let status = res.status();
                let batch = res.headers().get("x-tern-batch").and_then(|v| v.to_str().ok());
                let batch = batch.and_then(|v| v.parse::<u64>().ok());
                let body = body_of(res.into_body(), DOWN_BYTES).await?;
                Ok::<_, String>((status, batch, body))
            })
            .await
            .unwrap_or_else(|_| Err("no answer within the poll wait".into()));
            let (status, batch, body) = match answer {
                Ok(a) => a,
                Err(e) => {
                    // A lost answer is asked for again (the same `ack`) on a new connection:
                    // the node keeps it until acknowledged.
                    failures += 1;
                    if failures > 3 {
                        return format!("polls failed: {e}");
                    }
                    match dial(&self.base, &self.options).await {
                        Ok(c) => *conn = c,
                        Err(e) => return format!("polls failed: {}", e.error),
                    }
                    continue;
                }
            };
            failures = 0;
            match (status.as_u16(), batch) {
                (200, Some(batch)) => ack = batch,
                (200, None) => return "a poll answer without X-Tern-Batch".into(),
                (404, _) => return "the session ended".into(),
                (s, _) => return format!("poll answered {s}: {}", String::from_utf8_lossy(&body)),
            }
            if let Err(e) = split(&mut BytesMut::from(&body[..]), self.format, &mut out) {
                return e;
            }
            if out.is_empty() {
                out.push(Down::Alive);
            }
            for d in out.drain(..) {
                if down.send(d).await.is_err() {
                    return "closed".into();
                }
            }
        }
    }
}

/// POSTs the client's frames, in order, one request at a time.
struct Writer {
    base: Base,
    options: ClientOptions,
    path: String,
    secret: String,
    format: Format,
    post_bytes: Arc<AtomicUsize>,
    conn: Option<Conn>,
}

impl Writer {
    async fn run(mut self, mut frames: mpsc::Receiver<Bytes>, down: mpsc::Sender<Down>) {
        let mut carry: Option<Bytes> = None;
        loop {
            let Some(first) = carry.take().or(frames.recv().await) else { break };
            let limit = self.post_bytes.load(Ordering::Relaxed);
            let mut body = BytesMut::new();
            self.put(&mut body, &first);
            let mut n = 1;
            while n < POST_FRAMES {
                let Ok(f) = frames.try_recv() else { break };
                if body.len() + f.len() + 10 > limit {
                    carry = Some(f);
                    break;
                }
                self.put(&mut body, &f);
                n += 1;
            }
            let posted =
                tokio::time::timeout(self.options.request_timeout, self.post(body.freeze())).await;
            let error = match posted {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => "a POST had no answer within the request timeout".into(),
            };
            let _ = down.send(Down::Lost(error)).await;
            return;
        }
        // Left: the node ends the session at once rather than at its idle timeout.
        let path = self.path.clone();
        let _ = tokio::time::timeout(CLOSE_WAIT, self.send("DELETE", &path, Bytes::new())).await;
    }

    fn put(&self, body: &mut BytesMut, frame: &[u8]) {
        match self.format {
            Format::Json => {
                body.put_slice(frame);
                body.put_u8(b'\n');
            }
            Format::Protobuf => {
                prost::encoding::encode_varint(frame.len() as u64, body);
                body.put_slice(frame);
            }
        }
    }

    /// POSTs `body` until it is taken (202); a 429 waits for its `Retry-After`.
    async fn post(&mut self, body: Bytes) -> Result<(), String> {
        let path = self.path.clone();
        loop {
            let (status, retry, text) = self.send("POST", &path, body.clone()).await?;
            match status {
                202 => return Ok(()),
                429 => tokio::time::sleep(Duration::from_secs(retry.unwrap_or(1).min(10))).await,
                s => return Err(format!("POST answered {s}: {}", String::from_utf8_lossy(&text))),
            }
        }
    }

    /// Sends one request on the writer's connection, dialling a new one when it closed (the
    /// node closes idle keep-alive connections); a request that never left is sent again.
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Option<u64>, Bytes), String> {
        let mut req = self.base.request(method, path, &self.secret, body);
        for _ in 0..3 {
            let conn = match self.conn.as_mut() {
                Some(c) if !c.is_closed() => c,
                _ => self.conn.insert(
                    dial(&self.base, &self.options).await.map_err(|e| e.error.to_string())?,
                ),
            };
            if conn.ready().await.is_err() {
                self.conn = None;
                continue;
            }
            match conn.try_send_request(req).await {
                Ok(res) => {
                    let status = res.status().as_u16();
                    let retry = res.headers().get(hyper::header::RETRY_AFTER);
                    let retry = retry.and_then(|v| v.to_str().ok()?.parse().ok());
                    let text = body_of(res.into_body(), 4096).await.unwrap_or_default();
                    return Ok((status, retry, text));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: safe to send on a new connection.
                    Some(again) => {
                        req = again;
                        self.conn = None;
                    }
                    None => return Err(format!("{method} {path}: {}", e.error())),
                },
            }
        }
        Err(format!("{method} {path}: the connection kept closing"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_endpoints_follow_the_websocket_url() {
        let b = Base::of("ws://h:1/v1/ws?format=proto");
        assert_eq!((b.authority.as_str(), b.prefix.as_str(), b.query.as_str()), ("h:1", "", ""));
        let b = Base::of("wss://h/tern/v1/ws?token=t&format=json");
        assert_eq!(
            (b.authority.as_str(), b.prefix.as_str(), b.query.as_str()),
            ("h", "/tern", "&token=t")
        );
    }

    #[test]
    fn frames_split_across_reads_and_keep_alives() {
        let mut out = Vec::new();
        let mut buf = BytesMut::from(&b"{\"a\":1}\n\n{\"b\""[..]);
        split(&mut buf, Format::Json, &mut out).unwrap();
        assert!(matches!(&out[..], [Down::Frame(f), Down::Alive] if &f[..] == b"{\"a\":1}"));
        buf.extend_from_slice(b":2}\n");
        out.clear();
        split(&mut buf, Format::Json, &mut out).unwrap();
        assert!(matches!(&out[..], [Down::Frame(f)] if &f[..] == b"{\"b\":2}"));

        let mut buf = BytesMut::from(&[3u8, 1, 2, 3, 0, 2, 9][..]);
        out.clear();
        split(&mut buf, Format::Protobuf, &mut out).unwrap();
        assert!(matches!(&out[..], [Down::Frame(f), Down::Alive] if f[..] == [1, 2, 3]));
        assert_eq!(&buf[..], [2, 9], "a partial frame waits");
        let mut bad = BytesMut::from(&[0xff; 12][..]);
        assert!(split(&mut bad, Format::Protobuf, &mut out).is_err());
    }
}
