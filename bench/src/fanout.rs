//! Fan-out: 1 publisher → N subscribers on one channel.
//!
//! - latency: a fixed publish rate; each 64-byte payload carries its send time; every
//!   delivery's latency goes into an HdrHistogram.
//! - throughput: the publish rate doubles each step (then bisects) until delivery falls
//!   behind; the highest rate at which every subscriber received everything in time is the
//!   sustained figure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use tokio::sync::watch;

use crate::process::CpuMeter;
use crate::target::Target;

/// Latency figures for one run.
#[derive(Debug, Clone)]
pub struct LatencyReport {
    /// Subscribers.
    pub subscribers: usize,
    /// Publishes per second.
    pub rate: u64,
    /// Messages published.
    pub published: u64,
    /// Deliveries expected (published × subscribers) and received.
    pub expected: u64,
    /// Deliveries received.
    pub delivered: u64,
    /// Subscribers that were disconnected.
    pub dropped_subscribers: usize,
    /// Latency percentiles in microseconds: p50, p90, p99, p99.9, max.
    pub percentiles_us: [u64; 5],
    /// Server CPU, percent of one core.
    pub server_cpu: Option<f64>,
}

/// Per-subscriber delivery counters (one each, so subscribers never contend on a counter).
#[derive(Default)]
struct Counters(Vec<Arc<AtomicU64>>);

impl Counters {
    fn total(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

struct Run {
    stop: watch::Sender<bool>,
    delivered: Counters,
    tasks: Vec<tokio::task::JoinHandle<(Histogram<u64>, Option<String>)>>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

async fn start_subscribers(
    target: &Target,
    channel: &str,
    n: usize,
    epoch: Instant,
) -> anyhow::Result<Run> {
    let (stop, stop_rx) = watch::channel(false);
    let mut delivered = Counters::default();
    let mut tasks = Vec::with_capacity(n);
    let mut pending = Vec::new();
    // Open in waves of 100 so the handshakes do not all compete at once.
    for chunk_start in (0..n).step_by(100) {
        pending.clear();
        for _ in chunk_start..(chunk_start + 100).min(n) {
            pending.push(target.subscriber(channel, None));
        }
        for sub in futures_util::future::join_all(pending.drain(..)).await {
            let sub = sub?;
            let mut stop_rx = stop_rx.clone();
            let counter = Arc::new(AtomicU64::new(0));
            delivered.0.push(counter.clone());
            tasks.push(tokio::spawn(async move {
                let mut hist = histogram();
                let stopped = async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                };
                let why = sub
                    .read(stopped, |payload| {
                        if payload.len() >= 8 {
                            let sent =
                                u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                            let now = epoch.elapsed().as_micros() as u64;
                            let _ = hist.record(now.saturating_sub(sent).max(1));
                        }
                        counter.fetch_add(1, Ordering::Relaxed);
                    })
                    .await;
                (hist, why)
            }));
        }
    }
    Ok(Run { stop, delivered, tasks })
}

fn payload(epoch: Instant, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(8));
    b.put_u64_le(epoch.elapsed().as_micros() as u64);
    b.resize(size.max(8), b'x');
    b.freeze()
}

/// Publishes `rate` messages/s for `duration`, in 1 ms ticks. Returns the count published.
async fn publish_at(
    target: &Target,
    channel: &str,
    rate: u64,
    duration: Duration,
    size: usize,
    epoch: Instant,
) -> anyhow::Result<u64> {
    let (mut sink, reader) = target.publisher().await?.split();
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0u64;
    loop {
        tick.tick().await;
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = (elapsed.as_secs_f64() * rate as f64) as u64;
        if due > sent {
            for _ in sent..due {
                sink.feed(channel, payload(epoch, size)).await?;
            }
            sink.flush().await?;
            sent = due;
        }
    }
    // Give acks a moment before closing the publisher.
    tokio::time::sleep(Duration::from_millis(100)).await;
    sink.close().await;
    reader.abort();
    Ok(sent)
}

/// Waits until `expected` deliveries arrived or `grace` passed; returns when it completed.
async fn wait_delivered(delivered: &Counters, expected: u64, grace: Duration) -> Option<Instant> {
    let deadline = Instant::now() + grace;
    loop {
        if delivered.total() >= expected {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn finish(run: Run) -> (Histogram<u64>, usize) {
    let _ = run.stop.send(true);
    let mut hist = histogram();
    let mut dropped = 0;
    for t in run.tasks {
        if let Ok((h, why)) = t.await {
            let _ = hist.add(&h);
            if why.is_some() {
                dropped += 1;
            }
        }
    }
    (hist, dropped)
}

/// Latency at a fixed rate.
pub async fn latency(
    target: &Target,
    server_pid: Option<u32>,
    subscribers: usize,
    rate: u64,
    duration: Duration,
    size: usize,
) -> anyhow::Result<LatencyReport> {
    let epoch = Instant::now();
    let channel = format!("bench-lat-{subscribers}-{}", rand_suffix());
    let run = start_subscribers(target, &channel, subscribers, epoch).await?;
    let cpu = CpuMeter::start(server_pid);
    let published = publish_at(target, &channel, rate, duration, size, epoch).await?;
    let expected = published * subscribers as u64;
    wait_delivered(&run.delivered, expected, Duration::from_secs(5)).await;
    let server_cpu = cpu.percent();
    let delivered = run.delivered.total();
    let (hist, dropped) = finish(run).await;
    let q = |p: f64| hist.value_at_quantile(p);
    Ok(LatencyReport {
        subscribers,
        rate,
        published,
        expected,
        delivered,
        dropped_subscribers: dropped,
        percentiles_us: [q(0.5), q(0.9), q(0.99), q(0.999), hist.max()],
        server_cpu,
    })
}

/// Throughput figures.
#[derive(Debug, Clone)]
pub struct ThroughputReport {
    /// Subscribers.
    pub subscribers: usize,
    /// Highest publish rate at which delivery kept up.
    pub sustained_rate: u64,
    /// Deliveries per second at that rate (measured).
    pub deliveries_per_sec: f64,
    /// Server CPU at that rate.
    pub server_cpu: Option<f64>,
    /// Every step: (publish rate, kept up, deliveries/s).
    pub steps: Vec<(u64, bool, f64)>,
}

async fn step(
    target: &Target,
    server_pid: Option<u32>,
    subscribers: usize,
    rate: u64,
    duration: Duration,
    size: usize,
) -> anyhow::Result<(bool, f64, Option<f64>)> {
    let epoch = Instant::now();
    let channel = format!("bench-tp-{subscribers}-{rate}-{}", rand_suffix());
    let run = start_subscribers(target, &channel, subscribers, epoch).await?;
    let cpu = CpuMeter::start(server_pid);
    let start = Instant::now();
    let published = publish_at(target, &channel, rate, duration, size, epoch).await?;
    let expected = published * subscribers as u64;
    // Kept up: everything arrived within a quarter of the step after publishing ended.
    let done =
        wait_delivered(&run.delivered, expected, duration / 4 + Duration::from_millis(200)).await;
    let server_cpu = cpu.percent();
    let got = run.delivered.total();
    let end = done.unwrap_or_else(Instant::now);
    let per_sec = got as f64 / end.duration_since(start).as_secs_f64();
    let (_, dropped) = finish(run).await;
    Ok((done.is_some() && dropped == 0, per_sec, server_cpu))
}

/// Raises the publish rate until delivery falls behind.
pub async fn throughput(
    target: &Target,
    server_pid: Option<u32>,
    subscribers: usize,
    duration: Duration,
    size: usize,
    max_deliveries: u64,
) -> anyhow::Result<ThroughputReport> {
    let mut steps = Vec::new();
    let mut best: Option<(u64, f64, Option<f64>)> = None;
    let mut rate = (100_000 / subscribers as u64).max(10);
    let mut failed: Option<u64> = None;
    // Doubling, then two bisection steps between the last good and the first bad rate.
    let mut bisect = 0;
    loop {
        if rate * subscribers as u64 > max_deliveries {
            break;
        }
        let (ok, per_sec, cpu) =
            step(target, server_pid, subscribers, rate, duration, size).await?;
        steps.push((rate, ok, per_sec));
        if ok {
            if best.is_none_or(|(r, _, _)| rate > r) {
                best = Some((rate, per_sec, cpu));
            }
        } else {
            failed = Some(failed.map_or(rate, |f| f.min(rate)));
        }
        let good = best.map_or(0, |b| b.0);
        rate = match failed {
            None => rate * 2,
            Some(bad) => {
                bisect += 1;
                if bisect > 2 || bad <= good + good / 16 {
                    break;
                }
                (good + bad) / 2
            }
        };
    }
    let (sustained_rate, deliveries_per_sec, server_cpu) = best.unwrap_or((0, 0.0, None));
    Ok(ThroughputReport { subscribers, sustained_rate, deliveries_per_sec, server_cpu, steps })
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64 % 1_000_000)
}
