//! A TCP proxy in front of a cluster for one client: it cuts connections with a reset on
//! demand, and picks the node for the first new connection after a cut (the same one or
//! another, at random; new connections before the next cut go to the same node, as a load
//! balancer with sticky sessions routes an HTTP session's requests), and can refuse what proxies in the field refuse: WebSocket upgrades (answered
//! 403, as corporate proxies do), and streamed HTTP answers (held until they end, as
//! buffering proxies do).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Makes dropping `s` send a TCP reset. (A zero linger never blocks, which is why tokio's
/// deprecation of `set_linger` does not apply here.)
#[allow(deprecated)]
pub fn reset_on_close(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

/// What a [`Proxy`] lets through. It reads the head of each connection's first request
/// (clients open a new connection for an upgrade or a session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Everything.
    Open,
    /// Everything but WebSocket upgrades.
    NoWebSocket,
    /// Neither WebSocket upgrades nor HTTP streaming: a streaming session's answer is held
    /// until it ends (a buffering proxy), so only long polling works.
    PollOnly,
}

/// What to do with a connection.
enum Admit {
    /// Pass it on, after the bytes read.
    Pass(Vec<u8>),
    /// Pass the request on, and hold the answer until it ends.
    Hold(Vec<u8>),
    /// Refused (answered and closed) or gone.
    No,
}

/// Reads the head of the first request on `client` and decides by `gate`; a refused one
/// is answered 403 and closed.
async fn admit(client: &mut TcpStream, gate: Gate) -> Admit {
    if gate == Gate::Open {
        return Admit::Pass(Vec::new());
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            let n = client.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    });
    if read.await.ok().flatten().is_none() {
        return Admit::No;
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let upgrade = text.lines().any(|l| l.starts_with("upgrade:") && l.contains("websocket"));
    let stream = text.lines().next().is_some_and(|l| l.contains("transport=stream"));
    if gate == Gate::PollOnly && stream {
        return Admit::Hold(head);
    }
    if upgrade {
        let body = "blocked by proxy policy\n";
        let answer = format!(
            "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = client.write_all(answer.as_bytes()).await;
        let _ = client.shutdown().await;
        // Until the client closes: a reset now could cut the answer.
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf)).await;
        return Admit::No;
    }
    Admit::Pass(head)
}

/// Passes the request in `head` on and holds the answer until `upstream` ends it (up to
/// 16 MiB), then sends it whole.
async fn hold(mut client: TcpStream, mut upstream: TcpStream, head: Vec<u8>) {
    if upstream.write_all(&head).await.is_err() {
        return;
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while answer.len() < 16 << 20 {
        match upstream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let _ = client.write_all(&answer).await;
}

/// A TCP proxy in front of a cluster for one client.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
}

struct ProxyState {
    rng: StdRng,
    targets: Vec<SocketAddr>,
    last: Option<usize>,
    /// Pipes of the open connections.
    open: Vec<AbortHandle>,
    connections: usize,
    failovers: usize,
    refused: usize,
    /// While set, new connections are refused (the client stays away).
    hold: bool,
    /// Whether the next connection picks its node anew (after a cut).
    pick: bool,
}

impl Proxy {
    /// Starts a proxy to `targets` (the first preferred; others at random after a cut).
    pub async fn start(targets: Vec<SocketAddr>, seed: u64, gate: Gate) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ProxyState {
            rng: StdRng::seed_from_u64(seed),
            targets,
            last: None,
            open: Vec::new(),
            connections: 0,
            failovers: 0,
            refused: 0,
            hold: false,
            pick: true,
        }));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                // Every close is a reset: no FIN, no close frame.
                reset_on_close(&client);
                let order = {
                    let mut s = st.lock().unwrap();
                    if s.hold {
                        continue; // dropped: reset
                    }
                    let n = s.targets.len();
                    let stay = !std::mem::take(&mut s.pick) || s.rng.random_bool(0.5);
                    let first = match s.last {
                        Some(l) if stay => l,
                        _ => s.rng.random_range(0..n),
                    };
                    (0..n).map(|k| (first + k) % n).collect::<Vec<_>>()
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let (head, held) = match admit(&mut client, gate).await {
                        Admit::Pass(head) => (head, false),
                        Admit::Hold(head) => (head, true),
                        Admit::No => {
                            st.lock().unwrap().refused += 1;
                            return;
                        }
                    };
                    if held {
                        st.lock().unwrap().refused += 1;
                    }
                    for i in order {
                        let target = st.lock().unwrap().targets[i];
                        let Ok(mut upstream) = TcpStream::connect(target).await else { continue };
                        reset_on_close(&upstream);
                        let pipe = if held {
                            tokio::spawn(hold(client, upstream, head))
                        } else {
                            if upstream.write_all(&head).await.is_err() {
                                return;
                            }
                            tokio::spawn(async move {
                                let (mut a, mut b) = (client, upstream);
                                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                            })
                        };
                        let mut s = st.lock().unwrap();
                        s.connections += 1;
                        if s.last.is_some_and(|l| l != i) {
                            s.failovers += 1;
                        }
                        s.last = Some(i);
                        s.open.retain(|p| !p.is_finished());
                        s.open.push(pipe.abort_handle());
                        return;
                    }
                });
            }
        });
        Self { addr, state }
    }

    /// Resets every open connection.
    pub fn cut(&self) {
        let mut s = self.state.lock().unwrap();
        s.pick = true;
        for p in s.open.drain(..) {
            p.abort();
        }
    }

    /// While `on`, new connections are reset at once.
    pub fn hold(&self, on: bool) {
        self.state.lock().unwrap().hold = on;
    }

    /// Connections passed on, of them to another node than the one before, and refused
    /// (or held: [`Gate::PollOnly`]'s streams).
    pub fn counts(&self) -> (usize, usize, usize) {
        let s = self.state.lock().unwrap();
        (s.connections, s.failovers, s.refused)
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}
