//! `tern`: one CLI, thin dispatch to the crates.

#[cfg(feature = "otlp")]
mod otlp;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use tern_client::{Client, ClientOptions, Event, Payload};
use tern_edge::{Config, Server};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "tern", version, about = "Tern: a self-hosted, multi-region realtime edge relay")]
struct Cli {
    /// Log lines as `text` (colour only on a terminal, and never with NO_COLOR set) or
    /// `json` (one object per line: timestamp, level, target, fields, spans), on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "TERN_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run an edge node. Without --config, a dev node on 127.0.0.1:7400 with defaults.
    Edge {
        /// TOML config file (see deploy/edge.example.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Client listen address; overrides the config.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Directory of the durable history log; overrides `[history] data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Check the configuration (every value, as at start-up) and exit: 0 and a summary
        /// when it would start, non-zero naming the field otherwise. Files it names
        /// (certificates, keys) are read only at start-up.
        #[arg(long)]
        check: bool,
    },
    /// Subscribe to channels and print each message as a JSON line.
    Sub {
        /// Node URL, e.g. ws://127.0.0.1:7400
        url: String,
        /// Channels to subscribe to.
        #[arg(required = true)]
        channels: Vec<String>,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Publish one message and print the ack as JSON.
    Pub {
        /// Node URL, e.g. ws://127.0.0.1:7400
        url: String,
        /// Channel.
        channel: String,
        /// Payload (text).
        data: String,
        /// Event name.
        #[arg(long, default_value = "")]
        name: String,
        /// Idempotency key (generated when absent).
        #[arg(long)]
        id: Option<String>,
    },
    /// Benchmarks: fan-out latency and throughput, idle connections, NATS side by side.
    Bench(tern_bench::BenchArgs),
    /// Latency simulation: real nodes behind emulated global links, per region pair, beside
    /// a single-region hub. Writes results.json and report.html.
    Sim {
        /// Built-in scenario (global, broadcast, partition, lossy) or a TOML file.
        #[arg(long, default_value = "global")]
        scenario: String,
        /// Output directory (default: sim-results/SCENARIO).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override the scenario's publishing time, e.g. 10s.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
    },
    /// Mint a signed client token (HS256) for development and tests; prints it.
    Token {
        /// The app secret shared with the nodes (`[auth] hs256_secret`, at least 32 bytes).
        #[arg(long, env = "TERN_HS256_SECRET")]
        secret: String,
        /// Client id (the token's subject).
        #[arg(long)]
        client_id: String,
        /// Lifetime, e.g. 1h.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Capability: PATTERN=op[,op…] (ops: subscribe, publish, history, presence);
        /// repeatable. Example: --capability 'chat:*=subscribe,publish'.
        #[arg(long = "capability", required = true)]
        capabilities: Vec<String>,
    },
    /// Development certificates: the backbone's (mutual TLS with a cluster CA) and a client
    /// listener's (`[tls]`).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a cluster CA: DIR/ca.pem and DIR/ca.key.
    Init {
        /// Directory for the files.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
    /// Issue a node certificate signed by the CA in DIR: DIR/REGION-NAME.pem and .key.
    Node {
        /// Node id, `region/name` (e.g. eu-west/edge-1).
        id: String,
        /// Directory holding the CA.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
    /// Issue a client-listener certificate (`[tls]`, wss://) for HOSTs, signed by the CA in
    /// DIR: DIR/server.pem and DIR/server.key; clients trust DIR/ca.pem.
    Server {
        /// DNS names or IP addresses the certificate names (e.g. localhost 127.0.0.1).
        #[arg(required = true)]
        hosts: Vec<String>,
        /// Directory holding the CA.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
    /// Revoke a node's certificate (DIR/REGION-NAME.pem): adds it to the CA's revocation
    /// list DIR/crl.pem, which nodes load with `backbone.crl`.
    Revoke {
        /// Node id, `region/name` (e.g. eu-west/edge-1).
        id: String,
        /// Directory holding the CA and the node's certificate.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

/// Keeps the trace export (`--features otlp`) running; dropped, it flushes what is left.
/// (The field is only held: its `Drop` is the point.)
struct TraceGuard(
    #[cfg(feature = "otlp")]
    #[allow(dead_code)]
    Option<otlp::Guard>,
);

fn init_tracing(default: &str, format: LogFormat) -> anyhow::Result<TraceGuard> {
    use std::io::IsTerminal as _;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt.json().with_current_span(true).with_span_list(true).boxed(),
        LogFormat::Text => {
            // Colour codes only where someone reads them: not in log files or pipes.
            let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            fmt.with_ansi(ansi).boxed()
        }
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otlp")]
    {
        let (layer, guard) = otlp::layer()?.unzip();
        registry.with(layer).init();
        Ok(TraceGuard(guard))
    }
    #[cfg(not(feature = "otlp"))]
    {
        registry.init();
        Ok(TraceGuard())
    }
}

/// The allocator: jemalloc. glibc's keeps the memory of large buffers it freed (its mmap
/// threshold grows with the largest block freed, and each of up to 8 × CPUs arenas keeps
/// its own free memory): after a storm of history reads a node held +64 % of its memory
/// for good (`tern bench reads`); jemalloc returns freed pages to the system.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The simulator runs many nodes in one process: only their warnings by default.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // The trace export (`--features otlp`) runs on the runtime: set up inside it, flushed
    // (the guard dropped) before it stops.
    let _traces = {
        let _in_runtime = rt.enter();
        init_tracing(
            if matches!(cli.command, Command::Sim { .. }) { "warn" } else { "info" },
            cli.log_format,
        )?
    };
    rt.block_on(async move {
        match cli.command {
            Command::Edge { config, listen, data_dir, check } => {
                edge(config, listen, data_dir, check).await
            }
            Command::Sub { url, channels, count } => sub(&url, &channels, count).await,
            Command::Pub { url, channel, data, name, id } => {
                publish(&url, &channel, data, &name, id.as_deref()).await
            }
            Command::Bench(args) => tern_bench::run(args).await,
            Command::Certs { command } => certs(command),
            Command::Token { secret, client_id, ttl, capabilities } => {
                token(&secret, client_id, ttl, &capabilities)
            }
            Command::Sim { scenario, out, duration } => sim(&scenario, out, duration).await,
        }
    })
}

async fn edge(
    config: Option<PathBuf>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    check: bool,
) -> anyhow::Result<()> {
    let mut cfg = match &config {
        Some(path) => Config::from_file(path)?,
        None => {
            tracing::warn!("no --config: starting a dev node with default settings");
            Config::default()
        }
    };
    if let Some(addr) = listen {
        cfg.listen.client = addr;
    }
    if let Some(dir) = &data_dir {
        cfg.history.data_dir.clone_from(dir);
        if cfg.history.namespaces.is_empty() {
            tracing::warn!(
                dir = %dir.display(),
                "--data-dir given, but no [[history.namespaces]] is configured: this node keeps \
                 NO history (nothing is written to the directory). List the namespaces to keep \
                 in the config (see deploy/edge.example.toml, [history])"
            );
        }
    }
    let older_origins = !cfg.websocket.allowed_origins.is_empty();
    let settings = cfg.validate()?;
    if check {
        let c = &settings.config;
        println!(
            "config OK: node {}, clients on {}, auth {:?}, {} backbone peer(s), {} history \
             namespace(s), {} region URL(s)",
            settings.node,
            c.listen.client,
            settings.auth.mode(),
            c.backbone.as_ref().map_or(0, |b| b.peers.len()),
            c.history.namespaces.len(),
            c.regions.len()
        );
        return Ok(());
    }
    if older_origins {
        tracing::warn!(
            "websocket.allowed_origins is deprecated: its origins now guard the HTTP API too; \
             list them in [cors] allowed_origins"
        );
    }
    if settings.config.cors.allowed_origins.is_empty() {
        tracing::info!(
            "no browser origins allowed ([cors] allowed_origins and [[regions]] are empty): \
             browser pages get 403 on the WebSocket and the HTTP API (a dev node still serves \
             its own loopback origin: /demo/); servers and SDKs, which send no Origin, are served"
        );
    }
    if settings.auth.mode() == tern_edge::auth::AuthMode::Dev {
        tracing::warn!(
            "auth.mode = \"dev\": anonymous clients may subscribe and publish anywhere. Never \
             expose this node to untrusted clients; set [auth] mode = \"token\" (see \
             deploy/edge.example.toml)"
        );
    }
    let shutdown = CancellationToken::new();
    let server = Server::bind(settings, shutdown.clone()).await?;
    let addr = server.local_addr();
    println!("tern edge {} listening on {addr} (ws://{addr}/v1/ws)", server.node().settings().node);
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; shutting down");
        shutdown.cancel();
    });
    server.run().await;
    signals.abort();
    Ok(())
}

fn token(
    secret: &str,
    client_id: String,
    ttl: std::time::Duration,
    capabilities: &[String],
) -> anyhow::Result<()> {
    if secret.len() < 32 {
        anyhow::bail!("--secret must be at least 32 bytes (as the nodes require)");
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let mut capability = std::collections::BTreeMap::new();
    for c in capabilities {
        let (pattern, ops) = tern_edge::auth::parse_capability(c).map_err(anyhow::Error::msg)?;
        capability.insert(pattern, ops);
    }
    let claims = tern_edge::auth::Claims {
        sub: client_id,
        exp: now + ttl.as_secs(),
        iat: Some(now),
        capability,
    };
    println!("{}", tern_edge::auth::mint_hs256(secret, &claims).map_err(anyhow::Error::msg)?);
    Ok(())
}

async fn sim(
    scenario: &str,
    out: Option<PathBuf>,
    duration: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let mut s = tern_sim::Scenario::load(scenario)?;
    if let Some(d) = duration {
        s.duration = d;
    }
    let out = out.unwrap_or_else(|| PathBuf::from("sim-results").join(&s.name));
    let started = std::time::Instant::now();
    let log = |line: &str| eprintln!("[{:>5.1}s] {line}", started.elapsed().as_secs_f64());
    let (tern, hub) =
        tern_sim::simulate(&s, &out, &log).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    for r in std::iter::once(&tern).chain(hub.as_ref()) {
        if !r.integrity.clean() {
            anyhow::bail!("{}: messages were lost, repeated or reordered (see the table)", r.label);
        }
    }
    Ok(())
}

fn certs(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init { dir } => {
            tern_backbone::certs::init_ca(&dir)?;
            println!("cluster CA written to {}", dir.join("ca.pem").display());
        }
        CertsCommand::Node { id, dir } => {
            let node = tern_proto::types::NodeId::parse(&id)?;
            let (cert, key) = tern_backbone::certs::issue_node(&dir, &node)?;
            println!("{node}: {} and {}", cert.display(), key.display());
        }
        CertsCommand::Server { hosts, dir } => {
            let (cert, key) = tern_backbone::certs::issue_server(&dir, &hosts)?;
            println!("[tls]\ncert = {:?}\nkey = {:?}", cert.display(), key.display());
        }
        CertsCommand::Revoke { id, dir } => {
            let node = tern_proto::types::NodeId::parse(&id)?;
            let crl = tern_backbone::certs::revoke_node(&dir, &node)?;
            println!(
                "{node} revoked in {}: copy it to every node ([backbone] crl); they apply it within 5 s",
                crl.display()
            );
        }
    }
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn sub(url: &str, channels: &[String], count: Option<u64>) -> anyhow::Result<()> {
    let client = Client::connect(url, ClientOptions::default()).await?;
    let mut streams = Vec::new();
    for c in channels {
        streams.push(client.subscribe(c).await.with_context(|| format!("subscribe {c}"))?);
    }
    eprintln!("subscribed to {}", channels.join(", "));
    let mut all = futures_util::stream::select_all(streams);
    let mut seen = 0u64;
    while let Some(event) = all.next().await {
        match event {
            Event::Message(m) => println!("{}", serde_json::to_string(&m)?),
            Event::Discontinuity { reason } => {
                println!("{}", serde_json::json!({ "discontinuity": { "reason": reason } }))
            }
        }
        seen += 1;
        if count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    client.close().await;
    Ok(())
}

async fn publish(
    url: &str,
    channel: &str,
    data: String,
    name: &str,
    id: Option<&str>,
) -> anyhow::Result<()> {
    let client = Client::connect(url, ClientOptions::default()).await?;
    let ack = client.publish_with(channel, name, id, Payload::Text(data)).await?;
    println!("{}", serde_json::to_string(&ack)?);
    client.close().await;
    Ok(())
}
