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

/// Which system to drive, and where: publishers connect to `publish`, subscribers to
/// `subscribe` (the same server, or another one to measure a hop between servers).
#[derive(Debug, Clone)]
pub struct Target {
    system: System,
    publish: String,
    subscribe: String,
}

impl Target {
    /// A Tern node at `ws://host:port` (the `/v1/ws` path is added).
    pub fn tern(url: &str) -> Self {
        Self { system: System::Tern, publish: url.into(), subscribe: url.into() }
    }

    /// A NATS WebSocket listener at `ws://host:port`.
    pub fn nats(url: &str) -> Self {
        Self { system: System::Nats, publish: url.into(), subscribe: url.into() }
    }

    /// The same system, with subscribers on another server.
    pub fn subscribing_at(mut self, url: &str) -> Self {
        self.subscribe = url.into();
        self
    }

    /// Display name.
    pub fn name(&self) -> &'static str {
        match self.system {
            System::Tern => "tern",
            System::Nats => "nats",
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

    async fn open(&self, base: &str, local: Option<IpAddr>) -> anyhow::Result<Ws> {
        let addr = Self::addr(base)?;
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(ip) = local {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
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
        let mut ws = self.open(&self.subscribe, local).await?;
        match self.system {
            System::Tern => {
                tern_connect(&mut ws).await?;
                let sub = Subscribe {
                    request_id: 1,
                    channel: channel.into(),
                    rewind: None,
                    resume: None,
                };
                tern_send(&mut ws, client_frame::Kind::Subscribe(sub)).await?;
                tern_expect(&mut ws, |k| matches!(k, server_frame::Kind::Subscribed(_))).await?;
                Ok(Subscriber { ws, nats: None })
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
                Ok(Subscriber { ws, nats: Some(nats) })
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
    ws: Ws,
    nats: Option<NatsParser>,
}

impl Subscriber {
    /// Reads until the connection ends or `stop` resolves, calling `on_payload` for every
    /// delivered payload. Returns why it ended (`None`: stopped).
    pub async fn read(
        mut self,
        stop: impl std::future::Future<Output = ()>,
        mut on_payload: impl FnMut(&[u8]),
    ) -> Option<String> {
        tokio::pin!(stop);
        loop {
            let msg = tokio::select! {
                _ = &mut stop => {
                    let _ = self.ws.close(None).await;
                    return None;
                }
                m = self.ws.next() => m,
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
                        && self
                            .ws
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
