//! The durable log's cost: publish ack latency and publish throughput on a channel whose
//! namespace keeps history (acks wait for the log write), per sync policy, beside a channel
//! without history on the same node.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tern_client::{Client, ClientOptions};

use crate::process::TernServer;

/// Figures for one channel kind.
#[derive(Debug, Clone)]
pub struct LogReport {
    /// What was measured.
    pub label: String,
    /// Publish → ack, µs: p50, p99, p99.9.
    pub ack_us: (u64, u64, u64),
    /// Acked publishes per second with `publishers` concurrent publishers.
    pub acks_per_sec: f64,
}

async fn measure(
    url: &str,
    channel: &str,
    label: &str,
    rate: u64,
    duration: Duration,
    publishers: usize,
) -> anyhow::Result<LogReport> {
    // Ack latency: one publisher at a fixed rate.
    let client = Client::connect(url, ClientOptions::default()).await?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let end = Instant::now() + duration;
    let mut next = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep_until(next.into()).await;
        let t = Instant::now();
        client.publish(channel, "x".repeat(64)).await?;
        h.record(t.elapsed().as_micros().max(1) as u64)?;
        next += period;
    }
    client.close().await;
    // Throughput: concurrent publishers, each waiting for its ack before the next publish.
    let acked = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let (url, channel, acked) = (url.to_owned(), channel.to_owned(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let c = Client::connect(&url, ClientOptions::default()).await?;
            while Instant::now() < end {
                c.publish(&channel, "x".repeat(64)).await?;
                acked.fetch_add(1, Ordering::Relaxed);
            }
            c.close().await;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(LogReport {
        label: label.to_owned(),
        ack_us: (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.value_at_quantile(0.999)),
        acks_per_sec: acked.load(Ordering::Relaxed) as f64 / duration.as_secs_f64(),
    })
}

async fn node(dir: &std::path::Path, sync: &str) -> anyhow::Result<TernServer> {
    let config = dir.join(format!("{sync}.toml"));
    std::fs::write(
        &config,
        format!(
            "[node]\nregion = \"bench\"\nname = \"{sync}\"\n[listen]\nclient = \"127.0.0.1:0\"\n\
             [history]\ndata_dir = \"{}\"\nsync = \"{sync}\"\n[[history.namespaces]]\nname = \"log\"\nmax_messages = 100000\n",
            dir.join(sync).display()
        ),
    )?;
    TernServer::spawn_with(&["--config", config.to_str().unwrap_or_default()]).await
}

/// Runs the history benchmark and prints its table.
pub async fn run(rate: u64, duration: Duration, publishers: usize) -> anyhow::Result<()> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let dir = std::env::temp_dir().join(format!("tern-bench-history-{nanos}"));
    std::fs::create_dir_all(&dir)?;
    let mut reports = Vec::new();
    for sync in ["group", "interval"] {
        let server = node(&dir, sync).await?;
        eprintln!("[history] sync = {sync}: tern edge pid {}", server.pid);
        if sync == "group" {
            let plain = "no history (acked when sequenced)";
            reports.push(
                measure(&server.url, "plain:bench", plain, rate, duration, publishers).await?,
            );
        }
        let label = format!("history, sync = {sync}");
        let r = measure(&server.url, "log:bench", &label, rate, duration, publishers).await;
        server.stop().await;
        reports.push(r?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!();
    println!(
        "== durable log: publish ack latency at {rate}/s (one publisher) and acked publishes/s ({publishers} publishers, each waiting for its ack) =="
    );
    println!("{:<36} {:>9} {:>9} {:>9} {:>12}", "channel", "ack p50", "ack p99", "p99.9", "acks/s");
    for r in &reports {
        let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
        println!(
            "{:<36} {:>9} {:>9} {:>9} {:>12.0}",
            r.label,
            ms(r.ack_us.0),
            ms(r.ack_us.1),
            ms(r.ack_us.2),
            r.acks_per_sec
        );
    }
    println!("(ms; the log runs on this machine's disk: `group` fsyncs every group of writes)");
    Ok(())
}
