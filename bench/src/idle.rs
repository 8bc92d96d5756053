//! Idle connections: open many WebSocket connections, each subscribed to its own channel;
//! report the server's memory per connection and the connection setup rate (handshake and
//! subscription confirmed).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::watch;

use crate::process::rss_bytes;
use crate::target::Target;

/// Idle-connection figures.
#[derive(Debug, Clone)]
pub struct IdleReport {
    /// Connections opened.
    pub connections: usize,
    /// Connections that failed to open.
    pub failed: usize,
    /// Connections per second (WebSocket + protocol handshake + subscribe).
    pub per_sec: f64,
    /// Server RSS growth per connection, in bytes.
    pub rss_per_conn: Option<f64>,
}

/// Client source addresses: 127.0.0.1, then .2, .3… every `per_ip` connections, so large
/// runs do not exhaust one address's ephemeral ports.
pub(crate) fn local_ip(i: usize, per_ip: usize) -> IpAddr {
    let n = (i / per_ip) as u32 + 1;
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + n.min(250)))
}

/// Opens `n` idle subscribed connections with `concurrency` handshakes in flight.
pub async fn idle(
    target: &Target,
    server_pid: Option<u32>,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<IdleReport> {
    let before = server_pid.and_then(|p| rss_bytes(p).ok());
    let (stop, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let prefix = format!("idle-{}", std::process::id());
    let results: Vec<anyhow::Result<tokio::task::JoinHandle<()>>> =
        futures_util::stream::iter(0..n)
            .map(|i| {
                let target = target.clone();
                let mut stop_rx = stop_rx.clone();
                let channel = format!("{prefix}-{i}");
                async move {
                    let sub = target.subscriber(&channel, Some(local_ip(i, 20_000))).await?;
                    Ok(tokio::spawn(async move {
                        let stopped = async move {
                            let _ = stop_rx.wait_for(|s| *s).await;
                        };
                        let _ = sub.read(stopped, |_| {}).await;
                    }))
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
    let elapsed = started.elapsed();
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        eprintln!("  first connection error: {e:#}");
    }
    let opened = n - failed;
    // Let the server settle (allocator, deferred frees) before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server_pid.and_then(|p| rss_bytes(p).ok());
    let rss_per_conn = match (before, after) {
        (Some(b), Some(a)) if opened > 0 => Some(a.saturating_sub(b) as f64 / opened as f64),
        _ => None,
    };
    let _ = stop.send(true);
    for task in results.into_iter().flatten() {
        let _ = task.await;
    }
    Ok(IdleReport {
        connections: opened,
        failed,
        per_sec: opened as f64 / elapsed.as_secs_f64(),
        rss_per_conn,
    })
}
