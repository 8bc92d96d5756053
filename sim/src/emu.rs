//! Link emulation in user space: UDP relays between nodes (the backbone's QUIC runs through
//! them) and TCP relays on every client's last mile, each applying per-direction delay,
//! jitter, loss, an optional bandwidth cap and partitions.
//!
//! Timing: tokio timers fire on a ~1 ms grid, too coarse for the figures we want. Every
//! packet therefore goes through one [`Scheduler`] thread that waits on a channel with a
//! timeout until shortly before the earliest deadline and spins the last stretch, then
//! sends. How late each packet left compared with its deadline is recorded and printed in
//! every report (the emulator's own timing error).
//!
//! ```text
//!  UDP: node A ──▶ relay socket ──(drop? delay+jitter)──▶ Scheduler ──send_to──▶ node B
//!  TCP: client ──▶ relay conn ──read──(delay, in order)──▶ Scheduler ──▶ writer task ──▶ edge
//! ```
//! Memory is bounded: a TCP direction holds at most [`TCP_IN_FLIGHT`] bytes in the delay
//! line (the reader waits for room: back-pressure, like a real pipe), and the scheduler's
//! UDP queue drops beyond [`UDP_QUEUE`] datagrams (like a router queue).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::profile::Direction;

/// Bytes one TCP relay direction may hold in its delay line.
pub const TCP_IN_FLIGHT: usize = 4 << 20;
/// Datagrams the scheduler holds before dropping new ones.
pub const UDP_QUEUE: usize = 200_000;
/// The scheduler spins (instead of sleeping) for this long before a deadline.
const SPIN: Duration = Duration::from_micros(400);

enum Action {
    Udp { socket: Arc<std::net::UdpSocket>, to: SocketAddr, data: Bytes },
    Stream { to: mpsc::UnboundedSender<Chunk>, chunk: Chunk },
}

/// A piece of a TCP stream (or its end, `data` empty and `permit` none).
struct Chunk {
    data: Bytes,
    _permit: Option<OwnedSemaphorePermit>,
}

struct Job {
    due: Instant,
    order: u64,
    action: Action,
}

impl PartialEq for Job {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.order) == (o.due, o.order)
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Job {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.order).cmp(&(o.due, o.order))
    }
}

/// The emulator's timing error: how late packets left relative to their deadline.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct TimingError {
    /// Packets sent.
    pub packets: u64,
    /// Median lateness, µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// 99.9th percentile, µs.
    pub p999_us: u64,
    /// Worst, µs.
    pub max_us: u64,
    /// Datagrams dropped because the scheduler queue was full.
    pub queue_drops: u64,
}

/// The precise delay line shared by every emulated link.
#[derive(Clone)]
pub struct Scheduler {
    tx: std::sync::mpsc::Sender<Job>,
    order: Arc<AtomicUsize>,
    queued_udp: Arc<AtomicUsize>,
    queue_drops: Arc<AtomicUsize>,
    lateness: Arc<Mutex<Histogram<u64>>>,
}

impl Scheduler {
    /// Starts the scheduler thread. It ends when every handle is dropped.
    pub fn start() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let lateness = Arc::new(Mutex::new(
            Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
        ));
        let queued_udp = Arc::new(AtomicUsize::new(0));
        let (l2, q2) = (lateness.clone(), queued_udp.clone());
        std::thread::Builder::new()
            .name("tern-sim-links".into())
            .spawn(move || run_scheduler(rx, l2, q2))
            .expect("spawn the link scheduler");
        Self {
            tx,
            order: Arc::new(AtomicUsize::new(0)),
            queued_udp,
            queue_drops: Arc::new(AtomicUsize::new(0)),
            lateness,
        }
    }

    fn push(&self, due: Instant, action: Action) {
        if matches!(action, Action::Udp { .. }) {
            if self.queued_udp.load(Ordering::Relaxed) >= UDP_QUEUE {
                self.queue_drops.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.queued_udp.fetch_add(1, Ordering::Relaxed);
        }
        let order = self.order.fetch_add(1, Ordering::Relaxed) as u64;
        let _ = self.tx.send(Job { due, order, action });
    }

    /// The timing error so far.
    pub fn timing(&self) -> TimingError {
        let h = self.lateness.lock().unwrap_or_else(PoisonError::into_inner);
        TimingError {
            packets: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            queue_drops: self.queue_drops.load(Ordering::Relaxed) as u64,
        }
    }

    /// Forgets the timing recorded so far (between runs).
    pub fn reset_timing(&self) {
        self.lateness.lock().unwrap_or_else(PoisonError::into_inner).reset();
    }
}

fn run_scheduler(
    rx: std::sync::mpsc::Receiver<Job>,
    lateness: Arc<Mutex<Histogram<u64>>>,
    queued_udp: Arc<AtomicUsize>,
) {
    let mut heap: BinaryHeap<Reverse<Job>> = BinaryHeap::new();
    let mut late = Vec::with_capacity(1024);
    let mut due_now = Vec::with_capacity(1024);
    loop {
        let Some(Reverse(next)) = heap.peek() else {
            match rx.recv() {
                Ok(job) => heap.push(Reverse(job)),
                Err(_) => return,
            }
            continue;
        };
        let due = next.due;
        let now = Instant::now();
        if due > now + SPIN {
            match rx.recv_timeout(due - now - SPIN) {
                Ok(job) => heap.push(Reverse(job)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    if heap.is_empty() {
                        return;
                    }
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
            }
            continue;
        }
        // Spin to the deadline, still taking in new jobs (one may be due sooner).
        while Instant::now() < due {
            while let Ok(job) = rx.try_recv() {
                heap.push(Reverse(job));
            }
            if heap.peek().is_some_and(|Reverse(j)| j.due < due) {
                break;
            }
            std::hint::spin_loop();
        }
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(j)| j.due <= now) {
            let Reverse(job) = heap.pop().expect("peeked");
            late.push(now.saturating_duration_since(job.due).as_micros() as u64);
            due_now.push(job.action);
        }
        // Recorded before the packets leave, so whoever sees a packet arrive also sees
        // it counted in `timing()`.
        if !late.is_empty() {
            let mut h = lateness.lock().unwrap_or_else(PoisonError::into_inner);
            for v in late.drain(..) {
                let _ = h.record(v.max(1));
            }
        }
        for action in due_now.drain(..) {
            match action {
                Action::Udp { socket, to, data } => {
                    queued_udp.fetch_sub(1, Ordering::Relaxed);
                    // Non-blocking: a full socket buffer drops the datagram, as a router would.
                    let _ = socket.send_to(&data, to);
                }
                Action::Stream { to, chunk } => {
                    let _ = to.send(chunk);
                }
            }
        }
    }
}

/// Per-relay randomness and bandwidth state for one direction.
struct DirState {
    model: Direction,
    rng: StdRng,
    free_at: Instant,
    last_due: Instant,
}

impl DirState {
    fn new(model: Direction, seed: u64) -> Self {
        let now = Instant::now();
        Self { model, rng: StdRng::seed_from_u64(seed), free_at: now, last_due: now }
    }

    /// When a packet of `len` bytes arriving now leaves the link, or `None` if lost.
    ///
    /// Jitter is queueing delay: packets of one direction never overtake each other (a
    /// real path reorders rarely; independent per-packet jitter would reorder constantly
    /// and make QUIC and TCP see losses that a real link would not cause).
    fn due(&mut self, len: usize) -> Option<Instant> {
        if self.model.loss > 0.0 && self.rng.random::<f64>() < self.model.loss {
            return None;
        }
        let now = Instant::now();
        self.free_at = self.free_at.max(now) + self.model.serialization(len);
        let due = (self.free_at + self.model.delay + self.model.draw_jitter(&mut self.rng))
            .max(self.last_due);
        self.last_due = due;
        Some(due)
    }
}

impl DirState {
    /// When a segment that was lost (and is retransmitted after `rto`) arrives.
    fn lost_due(&mut self, rto: Duration) -> Instant {
        let now = Instant::now();
        self.free_at = self.free_at.max(now);
        self.free_at + self.model.delay + self.model.draw_jitter(&mut self.rng) + rto
    }
}

/// A UDP relay between one pair of nodes. The dialing node is configured with the relay's
/// address as its peer's; the relay forwards to the peer and back.
pub struct UdpRelay {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    /// While set, every datagram is dropped.
    pub cut: Arc<AtomicBool>,
}

impl UdpRelay {
    /// Binds a relay on loopback. `to_target` applies to datagrams towards the target,
    /// `to_source` to the replies. Runs until `stop`.
    pub async fn bind(
        sched: &Scheduler,
        to_target: Direction,
        to_source: Direction,
        seed: u64,
        stop: CancellationToken,
    ) -> std::io::Result<Self> {
        let std_sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
        std_sock.set_nonblocking(true)?;
        let send = Arc::new(std_sock.try_clone()?);
        let recv = UdpSocket::from_std(std_sock)?;
        let addr = recv.local_addr()?;
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let cut = Arc::new(AtomicBool::new(false));
        let (sched, t2, c2) = (sched.clone(), target.clone(), cut.clone());
        tokio::spawn(async move {
            let mut fwd = DirState::new(to_target, seed);
            let mut back = DirState::new(to_source, seed ^ 0xB4C);
            let mut source: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65_536];
            loop {
                let (n, from) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = recv.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
                };
                let Some(target) = *t2.lock().unwrap_or_else(PoisonError::into_inner) else {
                    continue;
                };
                if c2.load(Ordering::Relaxed) {
                    continue;
                }
                let (state, to) = if from == target {
                    let Some(s) = source else { continue };
                    (&mut back, s)
                } else {
                    source = Some(from);
                    (&mut fwd, target)
                };
                if let Some(due) = state.due(n) {
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    sched.push(due, Action::Udp { socket: send.clone(), to, data });
                }
            }
        });
        Ok(Self { addr, target, cut })
    }

    /// The address peers send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where datagrams go (set once the target node is bound).
    pub fn set_target(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(PoisonError::into_inner) = Some(target);
    }
}

/// A TCP relay on a client's last mile: every connection accepted is forwarded to `target`
/// with `up` applied towards it and `down` back. Loss on a TCP path shows up as a
/// retransmission delay (one RTO: 200 ms plus the path's round trip), never as lost bytes.
pub async fn tcp_relay(
    sched: &Scheduler,
    target: SocketAddr,
    up: Direction,
    down: Direction,
    seed: u64,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sched = sched.clone();
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let (client, _) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            };
            n += 1;
            let (sched, stop) = (sched.clone(), stop.clone());
            let seed = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9));
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else { return };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let rto = Duration::from_millis(200) + 2 * (up.delay + down.delay);
                let a = pump(cr, sw, sched.clone(), DirState::new(up, seed), rto, stop.clone());
                let b = pump(sr, cw, sched, DirState::new(down, seed ^ 0xD0), rto, stop);
                tokio::join!(a, b);
            });
        }
    });
    Ok(addr)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    sched: Scheduler,
    mut state: DirState,
    rto: Duration,
    stop: CancellationToken,
) {
    let budget = Arc::new(Semaphore::new(TCP_IN_FLIGHT));
    let (tx, mut rx) = mpsc::unbounded_channel::<Chunk>();
    let writer = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if chunk.data.is_empty() {
                break;
            }
            if to.write_all(&chunk.data).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => 0,
            r = from.read(&mut buf) => r.unwrap_or(0),
        };
        let now = Instant::now();
        if n == 0 {
            let due = state.last_due.max(now);
            sched.push(
                due,
                Action::Stream {
                    to: tx.clone(),
                    chunk: Chunk { data: Bytes::new(), _permit: None },
                },
            );
            break;
        }
        let Ok(permit) = budget.clone().acquire_many_owned(n as u32).await else { break };
        // In order, like TCP: a chunk never overtakes the one before it. A lost segment
        // costs a retransmission timeout.
        let due = match state.due(n) {
            Some(d) => d,
            None => state.lost_due(rto),
        };
        let due = due.max(state.last_due);
        state.last_due = due;
        let chunk = Chunk { data: Bytes::copy_from_slice(&buf[..n]), _permit: Some(permit) };
        sched.push(due, Action::Stream { to: tx.clone(), chunk });
    }
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_relay_delays_each_way_and_keeps_order() {
        let sched = Scheduler::start();
        let stop = CancellationToken::new();
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let d = Direction::fixed(Duration::from_millis(30));
        let relay = tcp_relay(&sched, echo_addr, d, d, 1, stop.clone()).await.unwrap();
        let mut c = TcpStream::connect(relay).await.unwrap();
        let start = Instant::now();
        c.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert!(
            start.elapsed() >= Duration::from_millis(60),
            "a round trip is never below 2 × 30 ms"
        );
        stop.cancel();
        assert!(sched.timing().packets >= 2);
    }
}
