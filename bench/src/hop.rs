//! One hop between servers: a Tern backbone link, or a NATS gateway.
//!
//! - added latency: the same fixed-rate publish stream measured with the subscriber on the
//!   publisher's server (same-node delivery) and on the other server (one hop); the hop adds
//!   the difference.
//! - link throughput: one publisher on one server, one subscriber on the other, the rate
//!   raised until delivery falls behind.
//! - CPU per replicated message: each server's CPU time over a fixed-rate run below the
//!   knee, divided by the messages (a steadier figure than the knee for comparing builds).

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tern_proto::types::NodeId;

use crate::fanout::{self, LatencyReport, ThroughputReport};
use crate::process::{CpuMeter, TernServer};
use crate::target::Target;

/// Figures for one hop.
#[derive(Debug, Clone)]
pub struct HopReport {
    /// Subscriber on the publisher's server.
    pub local: LatencyReport,
    /// Subscriber on the other server.
    pub remote: LatencyReport,
    /// Sustained messages/s over the hop.
    pub link: ThroughputReport,
    /// CPU microseconds per replicated message on (publishing, receiving) server, at
    /// [`CPU_RATE`] messages/s; `None` without both PIDs (or where `/proc` is unreadable).
    pub cpu_per_message_us: Option<(f64, f64)>,
}

/// Publish rate (messages/s) of the CPU-per-message run: below the knee of a 2-core machine.
pub const CPU_RATE: u64 = 50_000;

/// How a hop is measured.
#[derive(Debug, Clone, Copy)]
pub struct HopParams {
    /// Publish rate of the latency runs (messages/s).
    pub rate: u64,
    /// Length of each latency run.
    pub duration: Duration,
    /// Length of each throughput step (and of the CPU run).
    pub step: Duration,
    /// Payload bytes.
    pub payload: usize,
    /// Stop raising the rate past this many deliveries per second.
    pub max: u64,
}

/// Measures a hop. `same` publishes and subscribes on server A; `hop` publishes on A and
/// subscribes on B; `pids` (A, B) for the CPU per message.
pub async fn measure(
    same: &Target,
    hop: &Target,
    pids: Option<[u32; 2]>,
    p: HopParams,
) -> anyhow::Result<HopReport> {
    let HopParams { rate, duration, step, payload, max } = p;
    // Warm-up: links established, interest known, before anything is measured.
    fanout::latency(hop, None, 1, 200, Duration::from_secs(1), payload).await?;
    let local = fanout::latency(same, None, 1, rate, duration, payload).await?;
    let remote = fanout::latency(hop, None, 1, rate, duration, payload).await?;
    let link = fanout::throughput(hop, None, 1, step, payload, max).await?;
    let cpu_per_message_us = match pids {
        Some([a, b]) => {
            let meters = [CpuMeter::start(Some(a)), CpuMeter::start(Some(b))];
            let run = fanout::latency(hop, None, 1, CPU_RATE, step, payload).await?;
            let per = |m: &CpuMeter| m.cpu_seconds().map(|s| s * 1e6 / run.delivered.max(1) as f64);
            per(&meters[0]).zip(per(&meters[1]))
        }
        None => None,
    };
    Ok(HopReport { local, remote, link, cpu_per_message_us })
}

/// `tern edge` processes joined by the backbone (a full mesh), with development
/// certificates in a temporary directory.
pub struct TernPair {
    /// The nodes.
    pub nodes: Vec<TernServer>,
    dir: PathBuf,
}

impl TernPair {
    /// Starts two nodes.
    pub async fn spawn() -> anyhow::Result<Self> {
        Self::spawn_with(|_| String::new()).await
    }

    /// Starts two nodes, appending `extra(i)` to node `i`'s configuration.
    pub async fn spawn_with(extra: impl Fn(usize) -> String) -> anyhow::Result<Self> {
        Self::mesh(2, "", extra).await
    }

    /// Starts `n` nodes (regions `bench-a`, `bench-b`, …), with `limits` added to their
    /// `[limits]` and `extra(i)` appended to node `i`'s configuration.
    pub async fn mesh(
        n: usize,
        limits: &str,
        extra: impl Fn(usize) -> String,
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("tern-bench-mesh-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        tern_backbone::certs::init_ca(&dir)?;
        let ids: Vec<NodeId> = (0..n)
            .map(|i| NodeId::parse(&format!("bench-{}/edge-1", (b'a' + i as u8) as char)))
            .collect::<Result<_, _>>()?;
        let free_udp =
            || -> anyhow::Result<SocketAddr> { Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?) };
        let free_tcp = || -> anyhow::Result<SocketAddr> {
            Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
        };
        let udp: Vec<SocketAddr> = (0..n).map(|_| free_udp()).collect::<Result<_, _>>()?;
        let mut configs = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let (cert, key) = tern_backbone::certs::issue_node(&dir, id)?;
            let mut toml = format!(
                "[node]\nregion = \"{}\"\nname = \"{}\"\n[listen]\nclient = \"{}\"\n\
                 {}{limits}[backbone]\nlisten = \"{}\"\n\
                 ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                id.region(),
                id.name(),
                free_tcp()?,
                crate::process::LOAD_LIMITS,
                udp[i],
                dir.join("ca.pem").display(),
                cert.display(),
                key.display(),
            );
            for (j, other) in ids.iter().enumerate().filter(|(j, _)| *j != i) {
                toml += &format!("[[backbone.peers]]\nid = \"{other}\"\naddr = \"{}\"\n", udp[j]);
            }
            let path = dir.join(format!("{}.toml", id.region()));
            std::fs::write(&path, toml + &extra(i))?;
            configs.push(path);
        }
        let mut nodes = Vec::new();
        for config in &configs {
            nodes.push(
                TernServer::spawn_with(&["--config", config.to_str().context("path")?]).await?,
            );
        }
        Ok(Self { nodes, dir })
    }

    /// Stops the nodes and removes the certificates.
    pub async fn stop(self) {
        for node in self.nodes {
            node.stop().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
