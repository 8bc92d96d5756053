//! Shared helpers for the edge end-to-end tests: a real node on a loopback port, and raw
//! WebSocket clients that speak hand-written JSON or protobuf frames.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tern_backbone::certs;
use tern_edge::config::{BackboneSection, PeerConfig};
use tern_edge::node::Node;
use tern_edge::{Config, Server};
use tern_proto::types::NodeId;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub mod transport;

/// Upper bound for any single wait in a test; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct TestNode {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestNode {
    pub async fn start(edit: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = Config::default();
        cfg.listen.client = "127.0.0.1:0".parse().unwrap();
        // Test clients often hold a socket without reading it: do not wait long for them.
        cfg.timeouts.close = Duration::from_millis(500);
        cfg.timeouts.shutdown_grace = Duration::from_secs(2);
        // Tests publish in bulk over one connection; the rate-limit tests set their own.
        cfg.limits.publish_rate = u32::MAX;
        cfg.limits.publish_burst = u32::MAX;
        cfg.limits.frame_rate = u32::MAX;
        cfg.limits.frame_burst = u32::MAX;
        edit(&mut cfg);
        let shutdown = CancellationToken::new();
        let server = Server::bind(cfg.validate().unwrap(), shutdown.clone()).await.unwrap();
        let addr = server.local_addr();
        let node = server.node().clone();
        let task = tokio::spawn(server.run());
        Self { addr, node, shutdown, task }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A raw client speaking hand-written JSON text frames.
pub struct RawJson {
    pub ws: Ws,
}

impl RawJson {
    pub async fn open(addr: SocketAddr) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?format=json"))
            .await
            .unwrap();
        Self { ws }
    }

    /// Opens and sends Connect, returning the Connected frame.
    pub async fn connected(addr: SocketAddr) -> (Self, serde_json::Value) {
        let mut c = Self::open(addr).await;
        c.send(r#"{"connect":{"protocol":1,"clientId":"raw"}}"#).await;
        let v = c.recv().await;
        assert!(v.get("connected").is_some(), "expected connected, got {v}");
        (c, v)
    }

    pub async fn send(&mut self, text: &str) {
        self.ws.send(WsMessage::Text(text.into())).await.unwrap();
    }

    /// Next JSON frame (skipping pings); panics on close.
    pub async fn recv(&mut self) -> serde_json::Value {
        // One deadline across the node's pings.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg =
                tokio::time::timeout_at(deadline, self.ws.next()).await.expect("frame in time");
            match msg {
                Some(Ok(WsMessage::Text(t))) => return serde_json::from_str(&t).unwrap(),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Reads until the node closes; returns the close code.
    pub async fn close_code(&mut self) -> Option<u16> {
        close_code(&mut self.ws).await
    }
}

/// Reads frames until a Close frame arrives; returns its code (None if the stream ended
/// without one).
pub async fn close_code<S>(ws: &mut WebSocketStream<S>) -> Option<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let read = async {
        let mut code = None;
        // Keep reading after the Close frame: that sends the close reply the node waits for.
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(WsMessage::Close(frame)) => code = frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        code
    };
    tokio::time::timeout(WAIT, read).await.expect("close in time")
}

pub fn code(c: u16) -> CloseCode {
    CloseCode::from(c)
}

/// Polls `f` until it is true or WAIT passes.
pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Sends a raw HTTP/1.1 request and returns (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    http_with(addr, method, path, "", content_type, body).await
}

/// [`http`] with extra header lines (each ending in `\r\n`).
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let (status, _, body) = http_full(addr, method, path, extra_headers, content_type, body).await;
    (status, body)
}

/// [`http_with`], also returning the response's header lines (lower-cased names).
pub async fn http_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, Vec<(String, String)>, String) {
    let headers = format!("Host: test\r\n{extra_headers}Content-Type: {content_type}\r\n");
    http_request(addr, method, path, &headers, body).await
}

/// Sends a raw HTTP/1.1 request with exactly these header lines (each ending in `\r\n`;
/// `Content-Length` and `Connection: close` are added); returns the status, the response's
/// header lines (lower-cased names) and its body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

pub fn free_udp_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("tern-{tag}-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// Real nodes joined by the QUIC backbone, and the directory of their certificates.
pub struct Cluster {
    pub nodes: Vec<TestNode>,
    pub dir: PathBuf,
}

pub fn section(dir: &Path, me: usize, ids: &[NodeId], addrs: &[SocketAddr]) -> BackboneSection {
    let (cert, key) = certs::node_files(dir, &ids[me]);
    BackboneSection {
        listen: addrs[me],
        ca: dir.join("ca.pem"),
        cert,
        key,
        crl: None,
        lanes: 4,
        lane_queue: 4096,
        retention: 20_000,
        retention_bytes: 256 << 20,
        send_window: 8192,
        replicate_all: Vec::new(),
        interest_grace: Duration::from_secs(120),
        interest_wait: Duration::from_secs(5),
        ready_wait: Duration::from_secs(10),
        order_wait: Duration::from_secs(10),
        peers: (0..ids.len())
            .filter(|&i| i != me)
            .map(|i| PeerConfig { id: ids[i].to_string(), addr: addrs[i].to_string() })
            .collect(),
    }
}

/// One node per region (`REGION/edge-1`), each with `edit(index, config)` applied.
pub async fn cluster(regions: &[&str], edit: impl Fn(usize, &mut Config)) -> Cluster {
    let dir = temp_dir("cluster");
    certs::init_ca(&dir).unwrap();
    let ids: Vec<NodeId> =
        regions.iter().map(|r| NodeId::parse(&format!("{r}/edge-1")).unwrap()).collect();
    for id in &ids {
        certs::issue_node(&dir, id).unwrap();
    }
    let addrs: Vec<SocketAddr> = ids.iter().map(|_| free_udp_port()).collect();
    let mut nodes = Vec::new();
    for (i, r) in regions.iter().enumerate() {
        let b = section(&dir, i, &ids, &addrs);
        let region = r.to_string();
        nodes.push(
            TestNode::start(|cfg| {
                cfg.node.region = region;
                cfg.backbone = Some(b);
                edit(i, cfg);
            })
            .await,
        );
    }
    Cluster { nodes, dir }
}
