//! Shared helpers for the tests that run the real `tern` binary.
#![allow(dead_code)]

pub mod plain;
pub mod proxy;

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The binary under test: the one cargo built, or `TERN_BIN` when set (to loop a test
/// against a copy while the workspace is rebuilt).
pub fn tern() -> String {
    std::env::var("TERN_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tern").to_owned())
}

/// Starts `tern edge ARGS…` and waits for its first stdout line ("… listening on ADDR …"),
/// which it returns with the child (killed when dropped).
pub async fn spawn_edge<I, S>(args: I, wait: Duration) -> (Child, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = Command::new(tern())
        .arg("edge")
        .args(args)
        .env("RUST_LOG", "warn")
        // A collector set in the caller's environment must not receive every test node.
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(wait, lines.next_line()).await.unwrap().unwrap().unwrap();
    assert!(line.contains("listening"), "{line}");
    (child, line)
}

/// The regions of the process clusters the tests start.
pub const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];

/// Three `tern edge` configurations (one node per region of [`REGIONS`]) for a backbone
/// mesh on loopback, with development certificates made by `tern certs` in `dir`.
pub struct ProcessCluster {
    /// Client addresses.
    pub client: Vec<SocketAddr>,
    /// Configuration files.
    pub configs: Vec<PathBuf>,
}

impl ProcessCluster {
    /// [`ProcessCluster::write`] with the `chat` namespace's history kept, in
    /// `dir/data-REGION`, and replicated.
    pub fn write_with_history(dir: &Path) -> Self {
        let data = dir.to_path_buf();
        Self::write(dir, move |r| {
            format!(
                "[history]\ndata_dir = \"{}/data-{r}\"\n[[history.namespaces]]\nname = \"chat\"\n\
                 max_messages = 100000\nmax_age = \"1h\"\n",
                data.display()
            )
        })
    }

    /// Starts every node and waits until each answers `/readyz` (its peers caught up).
    pub async fn start_all(&self, wait: Duration) -> Vec<Child> {
        let mut nodes = Vec::new();
        for i in 0..self.configs.len() {
            nodes.push(self.start(i, wait).await);
        }
        for i in 0..self.configs.len() {
            ready(&self.http(i), wait).await;
        }
        nodes
    }

    /// Writes certificates and configurations; `extra(region)` is appended to each.
    pub fn write(dir: &Path, extra: impl Fn(&str) -> String) -> Self {
        Self::write_with(dir, extra, |_, _, addr| addr)
    }

    /// As [`ProcessCluster::write`], with every backbone link through a [`UdpRelay`] the
    /// test can block (keyed by the pair of node indexes, lower first).
    pub async fn write_relayed(
        dir: &Path,
        extra: impl Fn(&str) -> String,
    ) -> (Self, std::collections::BTreeMap<(usize, usize), UdpRelay>) {
        let relays = std::sync::Mutex::new(std::collections::BTreeMap::new());
        let cluster = Self::write_with(dir, extra, |i, j, addr| {
            let relay = UdpRelay::bind(addr);
            let front = relay.addr;
            relays.lock().unwrap().insert((i.min(j), i.max(j)), relay);
            front
        });
        let relays = relays.into_inner().unwrap();
        for r in relays.values() {
            r.run();
        }
        (cluster, relays)
    }

    /// Writes the configurations; `peer_addr(me, peer, addr)` is the backbone address node
    /// `me` dials for `peer` (whose own is `addr`). Only the dialer (the smaller node id)
    /// uses it.
    fn write_with(
        dir: &Path,
        extra: impl Fn(&str) -> String,
        peer_addr: impl Fn(usize, usize, SocketAddr) -> SocketAddr,
    ) -> Self {
        let d = dir.to_str().unwrap();
        let run = |args: &[&str]| {
            assert!(std::process::Command::new(tern()).args(args).status().unwrap().success());
        };
        run(&["certs", "init", "--dir", d]);
        for r in REGIONS {
            run(&["certs", "node", &format!("{r}/edge-1"), "--dir", d]);
        }
        let free_tcp = || TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let free_udp = || UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let client: Vec<SocketAddr> = REGIONS.iter().map(|_| free_tcp()).collect();
        let backbone: Vec<SocketAddr> = REGIONS.iter().map(|_| free_udp()).collect();
        let mut configs = Vec::new();
        for (i, r) in REGIONS.iter().enumerate() {
            let mut toml = format!(
                "[node]\nregion = \"{r}\"\nname = \"edge-1\"\n[listen]\nclient = \"{}\"\n\
                 [heartbeat]\ninterval = \"500ms\"\nidle_timeout = \"20s\"\n\
                 [limits]\npublish_rate = 1000000\npublish_burst = 1000000\n\
                 frame_rate = 1000000\nframe_burst = 1000000\npublish_order_wait = \"30s\"\n\
                 [backbone]\nlisten = \"{}\"\nca = \"{d}/ca.pem\"\ncert = \"{d}/{r}-edge-1.pem\"\nkey = \"{d}/{r}-edge-1.key\"\n",
                client[i], backbone[i]
            );
            for (j, r2) in REGIONS.iter().enumerate() {
                if j != i {
                    // The smaller node id dials.
                    let dials = format!("{}/edge-1", REGIONS[i]) < format!("{r2}/edge-1");
                    let addr = if dials { peer_addr(i, j, backbone[j]) } else { backbone[j] };
                    // By name: resolved at every dial, as in a container or Kubernetes.
                    toml += &format!(
                        "[[backbone.peers]]\nid = \"{r2}/edge-1\"\naddr = \"localhost:{}\"\n",
                        addr.port()
                    );
                }
            }
            toml += &extra(r);
            let path = dir.join(format!("{r}.toml"));
            std::fs::write(&path, toml).unwrap();
            configs.push(path);
        }
        Self { client, configs }
    }

    /// Starts node `i` and waits until it listens.
    pub async fn start(&self, i: usize, wait: Duration) -> Child {
        spawn_edge([OsStr::new("--config"), self.configs[i].as_os_str()], wait).await.0
    }

    /// Node `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        format!("ws://{}", self.client[i])
    }

    /// Node `i`'s HTTP base URL.
    pub fn http(&self, i: usize) -> String {
        format!("http://{}", self.client[i])
    }
}

/// Stops a node gracefully (SIGTERM) and waits for it to exit.
pub async fn sigterm(child: &mut Child) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(ok.success(), "kill -TERM {pid}");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    assert!(status.is_ok(), "the node exits after SIGTERM within its grace");
}

/// One HTTP/1.1 request to `addr` (`host:port`) with `headers` and a text body; the status
/// and the body.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Waits until node `http`'s `/readyz` answers 200.
pub async fn ready(http: &str, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let ok = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let host = http.strip_prefix("http://")?;
            let mut s = tokio::net::TcpStream::connect(host).await.ok()?;
            let req = format!("GET /readyz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.ok()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.ok()?;
            Some(buf.starts_with(b"HTTP/1.1 200"))
        }
        .await;
        if ok == Some(true) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{http} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A UDP relay in front of one node's backbone port, for one peer link: what the dialer
/// sends to [`UdpRelay::addr`] goes to the node, and the node's answers back, unless the
/// relay is blocked (then both directions are dropped, as a partition would).
pub struct UdpRelay {
    /// Where the dialer sends.
    pub addr: SocketAddr,
    front: std::net::UdpSocket,
    back: std::net::UdpSocket,
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl UdpRelay {
    fn bind(target: SocketAddr) -> Self {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(target).unwrap();
        front.set_nonblocking(true).unwrap();
        back.set_nonblocking(true).unwrap();
        Self { addr: front.local_addr().unwrap(), front, back, blocked: Default::default() }
    }

    fn run(&self) {
        use std::sync::atomic::Ordering;
        let front = std::sync::Arc::new(
            tokio::net::UdpSocket::from_std(self.front.try_clone().unwrap()).unwrap(),
        );
        let back = std::sync::Arc::new(
            tokio::net::UdpSocket::from_std(self.back.try_clone().unwrap()).unwrap(),
        );
        let client = std::sync::Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
        let (f, b, c, blocked) =
            (front.clone(), back.clone(), client.clone(), self.blocked.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                // Errors (an ICMP "port unreachable" while a node restarts) are not the end.
                let Ok((n, from)) = f.recv_from(&mut buf).await else { continue };
                *c.lock().unwrap() = Some(from);
                if !blocked.load(Ordering::Relaxed) {
                    let _ = b.send(&buf[..n]).await;
                }
            }
        });
        let blocked = self.blocked.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok(n) = back.recv(&mut buf).await else { continue };
                let to = *client.lock().unwrap();
                if let Some(to) = to.filter(|_| !blocked.load(std::sync::atomic::Ordering::Relaxed))
                {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
    }

    /// Drops everything both ways while `on`.
    pub fn block(&self, on: bool) {
        self.blocked.store(on, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A message's text payload (the tests publish text).
pub fn text(m: &tern_client::Message) -> String {
    match &m.data {
        Some(tern_proto::client::message::Data::Text(t)) => t.clone(),
        other => panic!("expected text, got {other:?}"),
    }
}
