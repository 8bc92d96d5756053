//! The two systems the load generator drives: a Tern node (client protocol, protobuf) and a
//! NATS server's WebSocket listener (NATS text protocol). Both expose the same operations:
//! open a subscriber on a channel, read payloads, open a publisher, publish payloads.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, bail};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tern_proto::client::{
    ClientFrame, Connect, Publish, ServerFrame, Subscribe, client_frame, publish, server_frame,
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// The protocol a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// A Tern node (client protocol, protobuf).
    Tern,
    /// A NATS server's WebSocket listener (NATS text protocol).
    Nats,
}

/// How a Tern node's subscribers get their frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Transport {
    /// A WebSocket, protobuf frames.
    #[default]
    Websocket,
    /// An HTTP streaming session, length-prefixed protobuf frames.
    Stream,
    /// Plain server-sent events (`/v1/sse`), JSON.
    Sse,
}

/// Which system to drive, and where: publishers connect to `publish`, subscribers to
/// `subscribe` (the same server, or another one to measure a hop between servers).
#[derive(Debug, Clone)]
pub struct Target {
    system: System,
    publish: String,
    subscribe: String,
    transport: Transport,
}

impl Target {
    /// A Tern node at `ws://host:port` (the `/v1/ws` path is added).
    pub fn tern(url: &str) -> Self {
        let transport = Transport::Websocket;
        Self { system: System::Tern, publish: url.into(), subscribe: url.into(), transport }
    }

    /// A NATS WebSocket listener at `ws://host:port`.
    pub fn nats(url: &str) -> Self {
        let transport = Transport::Websocket;
        Self { system: System::Nats, publish: url.into(), subscribe: url.into(), transport }
    }

    /// The same system, with subscribers on another server.
    pub fn subscribing_at(mut self, url: &str) -> Self {
        self.subscribe = url.into();
        self
    }

    /// The same Tern node, its subscribers over `transport` (publishers keep the WebSocket).
    pub fn over(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Display name.
    pub fn name(&self) -> &'static str {
        match (self.system, self.transport) {
            (System::Nats, _) => "nats",
            (System::Tern, Transport::Websocket) => "tern",
            (System::Tern, Transport::Stream) => "tern-stream",
            (System::Tern, Transport::Sse) => "tern-sse",
        }
    }

    fn url(&self, base: &str) -> String {
        match self.system {
            System::Tern => format!("{}/v1/ws?format=proto", base.trim_end_matches('/')),
            System::Nats => base.to_owned(),
        }
    }

    fn addr(base: &str) -> anyhow::Result<SocketAddr> {
        let rest = base.split_once("://").map_or(base, |(_, r)| r);
        let hostport = rest.split('/').next().unwrap_or(rest);
        hostport.parse().with_context(|| format!("{base}: expected ws://IP:PORT"))
    }

    async fn tcp(base: &str, local: Option<IpAddr>) -> anyhow::Result<TcpStream> {
        let addr = Self::addr(base)?;
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(ip) = local {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn http(base: &str, local: Option<IpAddr>) -> anyhow::Result<HttpConn> {
        let stream = Self::tcp(base, local).await?;
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(send)
    }

    /// A subscriber over an HTTP stream session or plain SSE.
    async fn http_subscriber(
        &self,
        channel: &str,
        local: Option<IpAddr>,
    ) -> anyhow::Result<Subscriber> {
        let sse = self.transport == Transport::Sse;
        let mut conn = Self::http(&self.subscribe, local).await?;
        let path = if sse {
            format!("/v1/sse?channel={channel}")
        } else {
            "/v1/sessions?transport=stream&format=proto".into()
        };
        let res = conn.send_request(get(&path)).await?;
        anyhow::ensure!(res.status() == 200, "{path}: {}", res.status());
        let mut down = HttpDown { body: res.into_body(), buf: BytesMut::new(), sse, _conn: conn };
        if sse {
            while down.next_unit().await?.0 != "subscribed" {}
        } else {
            let (_, first) = down.next_unit().await?;
            let Ok(ServerFrame { kind: Some(server_frame::Kind::Session(s)) }) =
                ServerFrame::decode(first)
            else {
                bail!("expected a session frame first");
            };
            let mut body = BytesMut::new();
            let connect =
                client_frame::Kind::Connect(Connect { protocol: 1, ..Default::default() });
            let sub = client_frame::Kind::Subscribe(Subscribe {
                request_id: 1,
                channel: channel.into(),
                rewind: None,
                resume: None,
                presence: false,
            });
            for kind in [connect, sub] {
                let frame = ClientFrame { kind: Some(kind) }.encode_to_vec();
                prost::encoding::encode_varint(frame.len() as u64, &mut body);
                body.extend_from_slice(&frame);
            }
            let mut post = Self::http(&self.subscribe, local).await?;
            let req = hyper::Request::post(format!("/v1/sessions/{}", s.id))
                .header("host", "bench")
                .header("x-tern-session-secret", s.secret)
                .body(http_body_util::Full::new(body.freeze()))?;
            let res = post.send_request(req).await?;
            anyhow::ensure!(res.status() == 202, "POST: {}", res.status());
            loop {
                let (_, frame) = down.next_unit().await?;
                if let Ok(ServerFrame { kind: Some(server_frame::Kind::Subscribed(_)) }) =
                    ServerFrame::decode(frame)
                {
                    break;
                }
            }
        }
        Ok(Subscriber { ws: None, nats: None, http: Some(down) })
    }

    /// A WebSocket to `base` (from the source address `local`), not yet connected.
    pub(crate) async fn open_from(&self, base: &str, local: Option<IpAddr>) -> anyhow::Result<Ws> {
        self.open(base, local).await
    }

    async fn open(&self, base: &str, local: Option<IpAddr>) -> anyhow::Result<Ws> {
        let stream = Self::tcp(base, local).await?;
        // Small read buffer: the library zero-fills it on every read (default 128 KiB).
        let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(self.url(base), stream, Some(config))
                .await?;
        Ok(ws)
    }

    /// Opens a connection subscribed to `channel`; returns once the subscription is live.
    pub async fn subscriber(
        &self,
        channel: &str,
        local: Option<IpAddr>,
    ) -> anyhow::Result<Subscriber> {
        if self.system == System::Tern && self.transport != Transport::Websocket {
            return self.http_subscriber(channel, local).await;
        }
        let mut ws = self.open(&self.subscribe, local).await?;
        match self.system {
            System::Tern => {
                tern_connect(&mut ws).await?;
                let sub = Subscribe {
                    request_id: 1,
                    channel: channel.into(),
                    rewind: None,
                    resume: None,
                    presence: false,
                };
                tern_send(&mut ws, client_frame::Kind::Subscribe(sub)).await?;
                tern_expect(&mut ws, |k| matches!(k, server_frame::Kind::Subscribed(_))).await?;
                Ok(Subscriber { ws: Some(ws), nats: None, http: None })
            }
            System::Nats => {
                let mut nats = NatsParser::default();
                ws.send(WsMessage::Binary(Bytes::from(format!(
                    "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\nSUB {channel} 1\r\nPING\r\n"
                ))))
                .await?;
                // The PONG confirms the SUB was processed.
                loop {
                    let Some(msg) = ws.next().await else { bail!("nats closed during subscribe") };
                    let msg = msg?;
                    let mut pong = false;
                    nats.feed(msg_bytes(&msg), |op| {
                        if let NatsOp::Pong = op {
                            pong = true;
                        }
                    })?;
                    if pong {
                        break;
                    }
                }
                Ok(Subscriber { ws: Some(ws), nats: Some(nats), http: None })
            }
        }
    }

    /// Opens a publishing connection.
    pub async fn publisher(&self) -> anyhow::Result<Publisher> {
        let mut ws = self.open(&self.publish, None).await?;
        match self.system {
            System::Tern => {
                tern_connect(&mut ws).await?;
            }
            System::Nats => {
                ws.send(WsMessage::Binary(Bytes::from_static(
                    b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n",
                )))
                .await?;
            }
        }
        Ok(Publisher { ws, tern: self.system == System::Tern })
    }
}

fn msg_bytes(msg: &WsMessage) -> &[u8] {
    match msg {
        WsMessage::Binary(b) => b,
        WsMessage::Text(t) => t.as_bytes(),
        _ => &[],
    }
}

async fn tern_connect(ws: &mut Ws) -> anyhow::Result<()> {
    let connect = Connect { protocol: 1, ..Default::default() };
    tern_send(ws, client_frame::Kind::Connect(connect)).await?;
    tern_expect(ws, |k| matches!(k, server_frame::Kind::Connected(_))).await
}

async fn tern_send(ws: &mut Ws, kind: client_frame::Kind) -> anyhow::Result<()> {
    let bytes = ClientFrame { kind: Some(kind) }.encode_to_vec();
    ws.send(WsMessage::Binary(bytes.into())).await?;
    Ok(())
}

async fn tern_expect(
    ws: &mut Ws,
    want: impl Fn(&server_frame::Kind) -> bool,
) -> anyhow::Result<()> {
    while let Some(msg) = ws.next().await {
        if let WsMessage::Binary(b) = msg? {
            let frame = ServerFrame::decode(b)?;
            match frame.kind {
                Some(k) if want(&k) => return Ok(()),
                Some(server_frame::Kind::Error(e)) => bail!("tern error: {}", e.reason),
                _ => {}
            }
        }
    }
    bail!("connection closed during handshake")
}

/// A subscribed connection.
pub struct Subscriber {
    ws: Option<Ws>,
    nats: Option<NatsParser>,
    http: Option<HttpDown>,
}

type HttpConn = hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>;

fn get(path: &str) -> hyper::Request<http_body_util::Full<Bytes>> {
    let mut req = hyper::Request::new(http_body_util::Full::new(Bytes::new()));
    *req.uri_mut() = path.parse().unwrap_or_default();
    req.headers_mut().insert("host", hyper::header::HeaderValue::from_static("bench"));
    req
}

/// The downlink of an HTTP subscriber: a streamed response.
struct HttpDown {
    body: hyper::body::Incoming,
    buf: BytesMut,
    sse: bool,
    _conn: HttpConn,
}

impl HttpDown {
    /// The next whole unit in `buf`: an SSE event (its name, its data) or a protobuf frame
    /// (keep-alives skipped).
    fn take_unit(&mut self) -> anyhow::Result<Option<(String, Bytes)>> {
        loop {
            if self.sse {
                let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") else {
                    return Ok(None);
                };
                let event = self.buf.split_to(end + 2).freeze();
                let (mut name, mut data) = ("message".to_owned(), Bytes::new());
                for line in event.split(|&b| b == b'\n') {
                    if let Some(n) = line.strip_prefix(b"event: ") {
                        name = String::from_utf8_lossy(n).into_owned();
                    } else if let Some(d) = line.strip_prefix(b"data: ") {
                        data = event.slice_ref(d);
                    }
                }
                if data.is_empty() {
                    continue; // a comment
                }
                return Ok(Some((name, data)));
            }
            let mut cursor = &self.buf[..];
            let Ok(len) = prost::encoding::decode_varint(&mut cursor) else { return Ok(None) };
            let head = self.buf.len() - cursor.len();
            if cursor.len() < len as usize {
                return Ok(None);
            }
            self.buf.advance(head);
            let frame = self.buf.split_to(len as usize).freeze();
            if !frame.is_empty() {
                return Ok(Some((String::new(), frame)));
            }
        }
    }

    async fn next_unit(&mut self) -> anyhow::Result<(String, Bytes)> {
        loop {
            if let Some(u) = self.take_unit()? {
                return Ok(u);
            }
            let Some(frame) = http_body_util::BodyExt::frame(&mut self.body).await else {
                bail!("the stream ended");
            };
            if let Ok(data) = frame?.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }

    async fn read(
        mut self,
        stop: impl std::future::Future<Output = ()>,
        mut on_payload: impl FnMut(&[u8]),
    ) -> Option<String> {
        use base64::Engine as _;
        tokio::pin!(stop);
        loop {
            let frame = tokio::select! {
                _ = &mut stop => return None,
                f = http_body_util::BodyExt::frame(&mut self.body) => f,
            };
            match frame {
                None => return Some("closed".into()),
                Some(Err(e)) => return Some(e.to_string()),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
            loop {
                let unit = match self.take_unit() {
                    Ok(Some(u)) => u,
                    Ok(None) => break,
                    Err(e) => return Some(e.to_string()),
                };
                if !self.sse {
                    if let Err(e) = scan_deliver(&unit.1, &mut on_payload) {
                        return Some(e.to_string());
                    }
                    continue;
                }
                match unit.0.as_str() {
                    "message" => {
                        // `"binary":"<base64>"` of the message's JSON.
                        let data = &unit.1[..];
                        let key = b"\"binary\":\"";
                        let Some(at) = data.windows(key.len()).position(|w| w == key) else {
                            continue;
                        };
                        let rest = &data[at + key.len()..];
                        let end = rest.iter().position(|&b| b == b'"').unwrap_or(rest.len());
                        let std = base64::engine::general_purpose::STANDARD;
                        match std.decode(&rest[..end]) {
                            Ok(p) => on_payload(&p),
                            Err(e) => return Some(e.to_string()),
                        }
                    }
                    "close" => return Some(format!("closed by server: {:?}", unit.1)),
                    _ => {}
                }
            }
        }
    }
}

impl Subscriber {
    /// Reads until the connection ends or `stop` resolves, calling `on_payload` for every
    /// delivered payload. Returns why it ended (`None`: stopped).
    pub async fn read(
        mut self,
        stop: impl std::future::Future<Output = ()>,
        mut on_payload: impl FnMut(&[u8]),
    ) -> Option<String> {
        if let Some(h) = self.http.take() {
            return h.read(stop, on_payload).await;
        }
        let Some(mut ws) = self.ws.take() else { return Some("not connected".into()) };
        tokio::pin!(stop);
        loop {
            let msg = tokio::select! {
                _ = &mut stop => {
                    let _ = ws.close(None).await;
                    return None;
                }
                m = ws.next() => m,
            };
            let msg = match msg {
                None => return Some("closed".into()),
                Some(Err(e)) => return Some(e.to_string()),
                Some(Ok(WsMessage::Close(f))) => return Some(format!("closed by server: {f:?}")),
                Some(Ok(m)) => m,
            };
            match &mut self.nats {
                None => {
                    if let WsMessage::Binary(b) = &msg {
                        if let Err(e) = scan_deliver(b, &mut on_payload) {
                            return Some(e.to_string());
                        }
                    }
                }
                Some(parser) => {
                    let mut ping = false;
                    if let Err(e) = parser.feed(msg_bytes(&msg), |op| match op {
                        NatsOp::Msg(p) => on_payload(p),
                        NatsOp::Ping => ping = true,
                        NatsOp::Pong => {}
                    }) {
                        return Some(e.to_string());
                    }
                    if ping
                        && ws
                            .send(WsMessage::Binary(Bytes::from_static(b"PONG\r\n")))
                            .await
                            .is_err()
                    {
                        return Some("write failed".into());
                    }
                }
            }
        }
    }
}

/// Walks a protobuf `ServerFrame` and calls `f` with each delivered binary payload, without
/// materialising the messages (the load generator shares the CPU with the server).
fn scan_deliver(mut buf: &[u8], f: &mut impl FnMut(&[u8])) -> anyhow::Result<()> {
    use prost::encoding::decode_varint;
    while buf.has_remaining() {
        let key = decode_varint(&mut buf)?;
        let len = decode_varint(&mut buf)? as usize;
        anyhow::ensure!(key & 7 == 2 && len <= buf.len(), "unexpected frame layout");
        let (body, rest) = buf.split_at(len);
        buf = rest;
        if key >> 3 != 6 {
            continue; // not a Deliver
        }
        let mut d = body;
        while d.has_remaining() {
            let _key = decode_varint(&mut d)?;
            let mlen = decode_varint(&mut d)? as usize;
            anyhow::ensure!(mlen <= d.len(), "truncated message");
            let (mut m, rest) = d.split_at(mlen);
            d = rest;
            while m.has_remaining() {
                let key = decode_varint(&mut m)?;
                match key & 7 {
                    0 => {
                        decode_varint(&mut m)?;
                    }
                    2 => {
                        let l = decode_varint(&mut m)? as usize;
                        anyhow::ensure!(l <= m.len(), "truncated field");
                        if key >> 3 == 5 {
                            f(&m[..l]);
                        }
                        m = &m[l..];
                    }
                    _ => anyhow::bail!("unexpected wire type"),
                }
            }
        }
    }
    Ok(())
}

/// A publishing connection.
pub struct Publisher {
    ws: Ws,
    tern: bool,
}

impl Publisher {
    /// Splits into a frame sink and a reader that drains acks (Tern) or PINGs (NATS).
    pub fn split(self) -> (PublishSink, tokio::task::JoinHandle<()>) {
        let (sink, mut stream) = self.ws.split();
        let reader = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
        (PublishSink { sink, tern: self.tern, next: 0 }, reader)
    }
}

/// The writing half of a publisher.
pub struct PublishSink {
    sink: futures_util::stream::SplitSink<Ws, WsMessage>,
    tern: bool,
    next: u32,
}

impl PublishSink {
    /// Queues one publish (call `flush` after a burst).
    pub async fn feed(&mut self, channel: &str, payload: Bytes) -> anyhow::Result<()> {
        let msg = if self.tern {
            self.next = self.next.wrapping_add(1);
            let p = Publish {
                request_id: self.next,
                channel: channel.into(),
                data: Some(publish::Data::Binary(payload)),
                ..Default::default()
            };
            WsMessage::Binary(
                ClientFrame { kind: Some(client_frame::Kind::Publish(p)) }.encode_to_vec().into(),
            )
        } else {
            let mut b = BytesMut::with_capacity(payload.len() + channel.len() + 24);
            b.extend_from_slice(format!("PUB {channel} {}\r\n", payload.len()).as_bytes());
            b.extend_from_slice(&payload);
            b.extend_from_slice(b"\r\n");
            WsMessage::Binary(b.freeze())
        };
        self.sink.feed(msg).await?;
        Ok(())
    }

    /// Flushes queued publishes.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.sink.flush().await?;
        Ok(())
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        let _ = self.sink.close().await;
    }
}

enum NatsOp<'a> {
    Msg(&'a [u8]),
    Ping,
    Pong,
}

/// Incremental parser for the server side of the NATS text protocol.
#[derive(Default)]
struct NatsParser {
    buf: BytesMut,
}

impl NatsParser {
    fn feed(&mut self, data: &[u8], mut f: impl FnMut(NatsOp<'_>)) -> anyhow::Result<()> {
        self.buf.extend_from_slice(data);
        while let Some(eol) = self.buf.windows(2).position(|w| w == b"\r\n") {
            let line = &self.buf[..eol];
            if line.starts_with(b"MSG ") {
                let text = std::str::from_utf8(line)?;
                let size: usize = text.rsplit(' ').next().unwrap_or("").parse()?;
                let total = eol + 2 + size + 2;
                if self.buf.len() < total {
                    break;
                }
                f(NatsOp::Msg(&self.buf[eol + 2..eol + 2 + size]));
                self.buf.advance(total);
                continue;
            }
            if line == b"PING" {
                f(NatsOp::Ping);
            } else if line == b"PONG" {
                f(NatsOp::Pong);
            } else if line.starts_with(b"-ERR") {
                anyhow::bail!("nats: {}", String::from_utf8_lossy(line));
            }
            self.buf.advance(eol + 2);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_parser_handles_split_frames() {
        let mut p = NatsParser::default();
        let mut got = Vec::new();
        let mut pings = 0;
        let input = b"INFO {}\r\nMSG a 1 5\r\nhello\r\nPING\r\nMSG a 1 2\r\nhi\r\n";
        for chunk in input.chunks(3) {
            p.feed(chunk, |op| match op {
                NatsOp::Msg(m) => got.push(m.to_vec()),
                NatsOp::Ping => pings += 1,
                NatsOp::Pong => {}
            })
            .unwrap();
        }
        assert_eq!(got, vec![b"hello".to_vec(), b"hi".to_vec()]);
        assert_eq!(pings, 1);
    }

    #[test]
    fn scan_finds_payloads_in_a_batch() {
        use tern_proto::client::{Message, message};
        use tern_proto::codec::{EncodedMessage, Format, deliver_frame};
        let msgs: Vec<EncodedMessage> = (0..3u8)
            .map(|i| {
                EncodedMessage::new(Message {
                    channel: "c".into(),
                    origin_seq: 9,
                    data: Some(message::Data::Binary(vec![i; 4].into())),
                    ..Default::default()
                })
            })
            .collect();
        let frame = deliver_frame(msgs.iter(), Format::Protobuf);
        let mut got = Vec::new();
        scan_deliver(&frame, &mut |p| got.push(p.to_vec())).unwrap();
        assert_eq!(got, vec![vec![0; 4], vec![1; 4], vec![2; 4]]);
    }
}
