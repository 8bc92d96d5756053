//! The server under test: spawned as a separate process (so its own memory and CPU can be
//! read from /proc), or an already running one given by PID.

use std::time::Instant;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The `[limits]` of benchmark nodes: the load generator opens all its connections from one
/// address and publishes as fast as it can over a few connections, so the per-address and
/// per-connection rate limits are lifted.
pub const LOAD_LIMITS: &str = "[limits]\nmax_connections_per_ip = 1000000\n\
    publish_rate = 100000000\npublish_burst = 100000000\n\
    frame_rate = 100000000\nframe_burst = 100000000\n";

/// A `tern edge` child process on a free loopback port.
pub struct TernServer {
    child: Child,
    /// `ws://127.0.0.1:PORT`
    pub url: String,
    /// Its PID.
    pub pid: u32,
}

impl TernServer {
    /// Starts `tern edge` from the current executable on a free loopback port. The load
    /// generator opens all its connections from one address, so the per-address limit is
    /// lifted.
    pub async fn spawn() -> anyhow::Result<Self> {
        Self::spawn_config("").await
    }

    /// [`TernServer::spawn`] with `extra` TOML appended to its configuration.
    pub async fn spawn_config(extra: &str) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let path =
            std::env::temp_dir().join(format!("tern-bench-{}-{nanos}.toml", std::process::id()));
        std::fs::write(&path, format!("[listen]\nclient = \"127.0.0.1:0\"\n{LOAD_LIMITS}{extra}"))?;
        let server = Self::spawn_with(&["--config", path.to_str().context("path")?]).await;
        let _ = std::fs::remove_file(&path);
        server
    }

    /// Starts `tern edge ARGS…` from the current executable.
    pub async fn spawn_with(args: &[&str]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("edge")
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn tern edge")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = lines.next_line().await?.context("tern edge exited before listening")?;
        // "tern edge NODE listening on ADDR (ws://ADDR/v1/ws)"
        let addr = line
            .split_whitespace()
            .skip_while(|w| *w != "on")
            .nth(1)
            .context("unexpected start-up line")?
            .to_owned();
        let pid = child.id().context("no pid")?;
        Ok(Self { child, url: format!("ws://{addr}"), pid })
    }

    /// Stops the server (SIGKILL; the benchmark is over).
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Resident set size of `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse()?;
            return Ok(kb * 1024);
        }
    }
    bail!("no VmRSS for pid {pid}")
}

/// CPU time (user + system) used by `pid` so far, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name.
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// Measures a server's CPU use over an interval.
pub struct CpuMeter {
    pid: Option<u32>,
    start: Instant,
    cpu: f64,
}

impl CpuMeter {
    /// Starts measuring (does nothing without a PID).
    pub fn start(pid: Option<u32>) -> Self {
        let cpu = pid.and_then(|p| cpu_seconds(p).ok()).unwrap_or(0.0);
        Self { pid, start: Instant::now(), cpu }
    }

    /// Server CPU seconds used since start.
    pub fn cpu_seconds(&self) -> Option<f64> {
        Some(cpu_seconds(self.pid?).ok()? - self.cpu)
    }

    /// Server CPU use since start, in percent of one core.
    pub fn percent(&self) -> Option<f64> {
        let now = cpu_seconds(self.pid?).ok()?;
        Some((now - self.cpu) / self.start.elapsed().as_secs_f64() * 100.0)
    }
}
