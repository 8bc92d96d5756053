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

/// Two `tern edge` processes joined by the backbone, with development certificates in a
/// temporary directory.
pub struct TernPair {
    /// The two nodes.
    pub nodes: [TernServer; 2],
    dir: PathBuf,
}

impl TernPair {
    /// Starts the pair.
    pub async fn spawn() -> anyhow::Result<Self> {
        Self::spawn_with(|_| String::new()).await
    }

    /// Starts the pair, appending `extra(i, dir)` to node `i`'s configuration.
    pub async fn spawn_with(extra: impl Fn(usize) -> String) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("tern-bench-pair-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        tern_backbone::certs::init_ca(&dir)?;
        let ids = [NodeId::parse("bench-a/edge-1")?, NodeId::parse("bench-b/edge-1")?];
        let free_udp =
            || -> anyhow::Result<SocketAddr> { Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?) };
        let free_tcp = || -> anyhow::Result<SocketAddr> {
            Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
        };
        let udp = [free_udp()?, free_udp()?];
        let mut configs = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let (cert, key) = tern_backbone::certs::issue_node(&dir, id)?;
            let other = 1 - i;
            let toml = format!(
                "[node]\nregion = \"{}\"\nname = \"{}\"\n[listen]\nclient = \"{}\"\n\
                 {}[backbone]\nlisten = \"{}\"\n\
                 ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[[backbone.peers]]\nid = \"{}\"\naddr = \"{}\"\n",
                id.region(),
                id.name(),
                free_tcp()?,
                crate::process::LOAD_LIMITS,
                udp[i],
                dir.join("ca.pem").display(),
                cert.display(),
                key.display(),
                ids[other],
                udp[other],
            );
            let path = dir.join(format!("{}.toml", id.region()));
            std::fs::write(&path, toml + &extra(i))?;
            configs.push(path);
        }
        let a = TernServer::spawn_with(&["--config", configs[0].to_str().context("path")?]).await?;
        let b = TernServer::spawn_with(&["--config", configs[1].to_str().context("path")?]).await?;
        Ok(Self { nodes: [a, b], dir })
    }

    /// Stops both nodes and removes the certificates.
    pub async fn stop(self) {
        let [a, b] = self.nodes;
        a.stop().await;
        b.stop().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
