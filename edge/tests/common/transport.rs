//! A raw protocol client over every transport: the WebSocket, HTTP streaming, server-sent
//! events and long polling, written from docs/protocol.md (no SDK), so one test can run the
//! same frames over each.

use std::net::SocketAddr;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tern_proto::client::server_frame;
use tern_proto::codec;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::{WAIT, Ws};

/// How a [`Raw`] client's frames travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Stream,
    Sse,
    Poll,
}

/// Every transport.
pub const ALL: [Transport; 4] =
    [Transport::WebSocket, Transport::Stream, Transport::Sse, Transport::Poll];

/// The transports that carry protobuf frames (SSE is text only).
pub const BINARY: [Transport; 3] = [Transport::WebSocket, Transport::Stream, Transport::Poll];

/// Every transport in every encoding it carries: `(transport, protobuf)`.
pub const EVERY: [(Transport, bool); 7] = [
    (Transport::WebSocket, false),
    (Transport::Stream, false),
    (Transport::Sse, false),
    (Transport::Poll, false),
    (Transport::WebSocket, true),
    (Transport::Stream, true),
    (Transport::Poll, true),
];

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::Stream => "stream",
            Self::Sse => "sse",
            Self::Poll => "poll",
        }
    }
}

/// A raw client: frames in, frames out, in JSON or protobuf.
pub struct Raw {
    pub transport: Transport,
    proto: bool,
    inner: Inner,
}

#[allow(clippy::large_enum_variant)] // one per test client
enum Inner {
    Ws(Ws),
    Http(HttpSession),
}

/// An HTTP session seen from the client.
pub struct HttpSession {
    pub addr: SocketAddr,
    pub id: String,
    pub secret: String,
    post: SendRequest<Full<Bytes>>,
    frames: mpsc::Receiver<Bytes>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for HttpSession {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// An HTTP/1.1 connection to `addr`.
pub async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    send
}

/// Sends one request on `conn`; returns the status, the response headers and the body
/// (read to its end).
pub async fn request(
    conn: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (u16, hyper::HeaderMap, Bytes) {
    try_request(conn, method, path, headers, body).await.expect("an answer")
}

/// [`request`], or `None` when the connection fails (the node closed a keep-alive
/// connection, as it does when it drains).
pub async fn try_request(
    conn: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Option<(u16, hyper::HeaderMap, Bytes)> {
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", "test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).unwrap();
    // A keep-alive connection takes the next request only once it finished the last one.
    tokio::time::timeout(WAIT, conn.ready()).await.unwrap().ok()?;
    let res = tokio::time::timeout(WAIT, conn.send_request(req)).await.unwrap().ok()?;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = tokio::time::timeout(WAIT, res.into_body().collect()).await.unwrap().ok()?;
    Some((status, headers, body.to_bytes()))
}

/// Splits what arrived of a stream or poll answer into frames, leaving a partial one in
/// `buf`; keep-alives (blank lines, empty frames, SSE comments) are skipped.
fn split(buf: &mut BytesMut, transport: Transport, proto: bool) -> Vec<Bytes> {
    let mut out = Vec::new();
    match (transport, proto) {
        (Transport::Sse, _) => {
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let event = buf.split_to(end + 2);
                let mut data = Vec::new();
                for line in event[..].split(|&b| b == b'\n') {
                    if let Some(d) = line.strip_prefix(b"data: ") {
                        data.extend_from_slice(d);
                    }
                }
                if !data.is_empty() {
                    out.push(Bytes::from(data));
                }
            }
        }
        (_, false) => {
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line = buf.split_to(end + 1);
                let line = &line[..end];
                if !line.is_empty() {
                    out.push(Bytes::copy_from_slice(line));
                }
            }
        }
        (_, true) => loop {
            let mut cursor = &buf[..];
            let Ok(len) = prost::encoding::decode_varint(&mut cursor) else { break };
            let head = buf.len() - cursor.len();
            if cursor.len() < len as usize {
                break;
            }
            buf.advance(head);
            let frame = buf.split_to(len as usize).freeze();
            if !frame.is_empty() {
                out.push(frame);
            }
        },
    }
    out
}

impl Raw {
    /// Opens a session over `transport` (`proto`: protobuf frames), not yet connected.
    pub async fn open(addr: SocketAddr, transport: Transport, proto: bool) -> Self {
        Self::open_with(addr, transport, proto, "").await
    }

    /// [`Raw::open`] with extra query parameters (`&token=…`).
    pub async fn open_with(
        addr: SocketAddr,
        transport: Transport,
        proto: bool,
        query: &str,
    ) -> Self {
        Self::open_buffered(addr, transport, proto, query, 1 << 20).await
    }

    /// [`Raw::open_with`] that holds at most `frames` frames the test has not taken: past
    /// them an HTTP session's reader stops reading its stream (or polling), as a stalled
    /// client would. (A WebSocket is read only when the test asks for a frame anyway.)
    pub async fn open_buffered(
        addr: SocketAddr,
        transport: Transport,
        proto: bool,
        query: &str,
        frames: usize,
    ) -> Self {
        let format = if proto { "proto" } else { "json" };
        if transport == Transport::WebSocket {
            let url = format!("ws://{addr}/v1/ws?format={format}{query}");
            let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            return Self { transport, proto, inner: Inner::Ws(ws) };
        }
        let path = format!("/v1/sessions?transport={}&format={format}{query}", transport.name());
        let mut conn = connect(addr).await;
        let req = hyper::Request::builder()
            .uri(&path)
            .header("host", "test")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = tokio::time::timeout(WAIT, conn.send_request(req)).await.unwrap().unwrap();
        assert_eq!(res.status(), 200, "opening {path}");
        let (tx, mut rx) = mpsc::channel(frames);
        let mut body = res.into_body();
        let reader = if transport == Transport::Poll {
            // The open answer holds the `session` frame (batch 0); then poll on.
            let first = body.collect().await.unwrap().to_bytes();
            let mut buf = BytesMut::from(&first[..]);
            for f in split(&mut buf, transport, proto) {
                let _ = tx.try_send(f);
            }
            None
        } else {
            let tx = tx.clone();
            Some(tokio::spawn(async move {
                let mut buf = BytesMut::new();
                while let Some(Ok(frame)) = body.frame().await {
                    let Ok(data) = frame.into_data() else { continue };
                    buf.extend_from_slice(&data);
                    for f in split(&mut buf, transport, proto) {
                        if tx.send(f).await.is_err() {
                            return;
                        }
                    }
                }
            }))
        };
        let first = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().expect("session frame");
        let Ok(server_frame::Kind::Session(s)) = codec::decode_server(&first, !proto) else {
            panic!("expected a session frame first, got {first:?}");
        };
        assert_eq!(s.transport, transport.name());
        let reader = match reader {
            Some(r) => {
                drop(tx);
                r
            }
            None => {
                let (id, secret) = (s.id.clone(), s.secret.clone());
                tokio::spawn(poll_loop(addr, id, secret, proto, tx))
            }
        };
        let post = connect(addr).await;
        let http = HttpSession { addr, id: s.id, secret: s.secret, post, frames: rx, reader };
        Self { transport, proto, inner: Inner::Http(http) }
    }

    /// Opens and sends Connect, returning the Connected frame (JSON).
    pub async fn connected(addr: SocketAddr, transport: Transport) -> (Self, serde_json::Value) {
        Self::connected_in(addr, transport, false).await
    }

    /// [`Raw::connected`] in either encoding (`proto`: protobuf on the wire; [`Raw::send`]
    /// and [`Raw::recv`] still speak the JSON mapping).
    pub async fn connected_in(
        addr: SocketAddr,
        transport: Transport,
        proto: bool,
    ) -> (Self, serde_json::Value) {
        let mut c = Self::open(addr, transport, proto).await;
        c.send(r#"{"connect":{"protocol":1,"clientId":"raw"}}"#).await;
        let v = c.recv().await;
        assert!(v.get("connected").is_some(), "expected connected, got {v}");
        (c, v)
    }

    /// The HTTP session, if this is one.
    pub fn http(&mut self) -> Option<&mut HttpSession> {
        match &mut self.inner {
            Inner::Http(h) => Some(h),
            Inner::Ws(_) => None,
        }
    }

    /// The WebSocket, if this is one.
    pub fn ws(&mut self) -> Option<&mut Ws> {
        match &mut self.inner {
            Inner::Ws(ws) => Some(ws),
            Inner::Http(_) => None,
        }
    }

    /// Whether frames travel as protobuf.
    pub fn proto(&self) -> bool {
        self.proto
    }

    /// `text` (a frame in the JSON mapping) as this session sends it: the JSON itself, or
    /// the same frame in protobuf.
    pub fn encode(&self, text: &str) -> Bytes {
        if !self.proto {
            return Bytes::from(text.to_owned());
        }
        let kind = codec::decode_client(text.as_bytes(), true)
            .unwrap_or_else(|e| panic!("{text} is not a frame: {e:?}"));
        codec::encode_client(kind, codec::Format::Protobuf)
    }

    /// A POST body carrying `frames` (JSON mapping) in this session's encoding.
    pub fn body(&self, frames: &[String]) -> Bytes {
        let mut body = BytesMut::new();
        for f in frames {
            let frame = self.encode(f);
            if self.proto {
                prost::encoding::encode_varint(frame.len() as u64, &mut body);
                body.extend_from_slice(&frame);
            } else {
                body.extend_from_slice(&frame);
                body.extend_from_slice(b"\n");
            }
        }
        body.freeze()
    }

    /// Sends one frame given in the JSON mapping (as protobuf on a protobuf session).
    pub async fn send(&mut self, text: &str) {
        if self.proto {
            let frame = self.encode(text);
            return self.send_binary(frame).await;
        }
        match &mut self.inner {
            Inner::Ws(ws) => ws.send(WsMessage::Text(text.into())).await.unwrap(),
            Inner::Http(h) => h.post_frames(Bytes::from(format!("{text}\n"))).await,
        }
    }

    /// Sends one protobuf frame.
    pub async fn send_binary(&mut self, frame: Bytes) {
        match &mut self.inner {
            Inner::Ws(ws) => ws.send(WsMessage::Binary(frame)).await.unwrap(),
            Inner::Http(h) => {
                let mut body = BytesMut::new();
                prost::encoding::encode_varint(frame.len() as u64, &mut body);
                body.extend_from_slice(&frame);
                h.post_frames(body.freeze()).await;
            }
        }
    }

    /// The next frame's bytes; `None` once the transport ended (a WebSocket close, the
    /// end of a stream).
    pub async fn next_frame(&mut self) -> Option<Bytes> {
        let deadline = tokio::time::Instant::now() + WAIT;
        match &mut self.inner {
            Inner::Ws(ws) => loop {
                let msg =
                    tokio::time::timeout_at(deadline, ws.next()).await.expect("frame in time");
                match msg {
                    Some(Ok(WsMessage::Text(t))) => return Some(Bytes::from(t)),
                    Some(Ok(WsMessage::Binary(b))) => return Some(b),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                    _ => return None,
                }
            },
            Inner::Http(h) => {
                tokio::time::timeout_at(deadline, h.frames.recv()).await.expect("frame in time")
            }
        }
    }

    /// The next frame in the JSON mapping (a protobuf one converted); panics on the end of
    /// the transport or a `close` frame.
    pub async fn recv(&mut self) -> serde_json::Value {
        let mut frame = self.next_frame().await.expect("a frame, not the end");
        if self.proto {
            let kind = codec::decode_server(&frame, false).unwrap();
            frame = codec::encode_server(kind, codec::Format::Json);
        }
        let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert!(v.get("close").is_none(), "expected a frame, got {v}");
        v
    }

    /// Next protobuf frame, decoded.
    pub async fn recv_binary(&mut self) -> server_frame::Kind {
        let frame = self.next_frame().await.expect("a frame, not the end");
        codec::decode_server(&frame, false).unwrap()
    }

    /// Reads until the session ends; returns its close code (a WebSocket close frame's, an
    /// HTTP session's `close` frame's), or None if it ended without one.
    pub async fn close_code(&mut self) -> Option<u16> {
        if let Inner::Ws(ws) = &mut self.inner {
            return super::close_code(ws).await;
        }
        let proto = self.proto;
        while let Some(frame) = self.next_frame().await {
            if let Ok(server_frame::Kind::Close(c)) = codec::decode_server(&frame, !proto) {
                return Some(c.code as u16);
            }
        }
        None
    }
}

impl HttpSession {
    /// POSTs `body` to the session with its secret; returns the answer.
    /// POSTs frames as a well-behaved client does: a 429 (the session has posts waiting
    /// still, on a loaded machine) is retried after a pause, as docs/protocol.md says.
    pub async fn post_frames(&mut self, body: Bytes) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, _, text) = self.post(body.clone()).await;
            if status == 429 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
            assert_eq!(status, 202, "POST answered {status}: {text:?}");
            return;
        }
    }

    pub async fn post(&mut self, body: Bytes) -> (u16, hyper::HeaderMap, Bytes) {
        self.post_with(body, &self.secret.clone()).await
    }

    /// POSTs `body` with `secret` as the session secret.
    pub async fn post_with(&mut self, body: Bytes, secret: &str) -> (u16, hyper::HeaderMap, Bytes) {
        let path = format!("/v1/sessions/{}", self.id);
        let headers = [("x-tern-session-secret", secret)];
        request(&mut self.post, "POST", &path, &headers, body).await
    }
}

/// Polls a long-polling session until it ends, passing its frames on.
async fn poll_loop(
    addr: SocketAddr,
    id: String,
    secret: String,
    proto: bool,
    tx: mpsc::Sender<Bytes>,
) {
    let mut conn = connect(addr).await;
    let mut ack = 0u64;
    let mut failures = 0;
    loop {
        let path = format!("/v1/sessions/{id}/poll?ack={ack}");
        let headers = [("x-tern-session-secret", secret.as_str())];
        let Some((status, headers, body)) =
            try_request(&mut conn, "GET", &path, &headers, Bytes::new()).await
        else {
            // The connection closed (the node drains keep-alive connections): poll again
            // on a new one, naming the same batch, so nothing is lost.
            failures += 1;
            if failures > 3 || TcpStream::connect(addr).await.is_err() {
                return;
            }
            conn = connect(addr).await;
            continue;
        };
        if status != 200 {
            return;
        }
        ack = headers["x-tern-batch"].to_str().unwrap().parse().unwrap();
        let mut buf = BytesMut::from(&body[..]);
        let mut closed = false;
        for f in split(&mut buf, Transport::Poll, proto) {
            closed |= matches!(codec::decode_server(&f, !proto), Ok(server_frame::Kind::Close(_)));
            if tx.send(f).await.is_err() {
                return;
            }
        }
        if closed {
            return;
        }
    }
}
