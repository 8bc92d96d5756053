//! The Tern load generator (`tern bench`). It runs as its own process, apart from the
//! server, so the server's memory and CPU can be read from /proc.
//!
//! - [`target`]: the systems driven (a Tern node; a NATS server's WebSocket listener).
//! - [`fanout`]: 1 → N latency at a fixed rate, and the highest sustained delivery rate.
//! - [`idle`]: memory per idle connection and the connection setup rate.
//! - [`process`]: the server process and its /proc figures.
//!
//! The figures are printed, never asserted: a shared 2-core machine is too noisy for that.

pub mod fanout;
pub mod history;
pub mod hop;
pub mod idle;
pub mod presence;
pub mod process;
pub mod reads;
pub mod target;

use std::time::Duration;

use clap::{Args, Subcommand};

use crate::fanout::{LatencyReport, ThroughputReport};
use crate::idle::IdleReport;
use crate::process::TernServer;
use crate::target::Target;

/// `tern bench` arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    kind: Option<BenchKind>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Clone, Args)]
struct Common {
    /// Drive an already running Tern node at this URL instead of spawning one.
    #[arg(long, global = true)]
    url: Option<String>,
    /// PID of that node, to read its memory and CPU.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Also drive a NATS server's WebSocket listener (ws://IP:PORT) and compare.
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// PID of the NATS server.
    #[arg(long, global = true)]
    nats_pid: Option<u32>,
    /// For `bench backbone`: a second NATS server, joined to --nats-url by a gateway.
    #[arg(long, global = true)]
    nats_remote_url: Option<String>,
    /// Publish rate (messages/s) for the backbone hop latency.
    #[arg(long, global = true, default_value_t = 1000)]
    hop_rate: u64,
    /// Subscriber counts for the fan-out benchmarks.
    #[arg(long, global = true, value_delimiter = ',', default_value = "100,1000")]
    subscribers: Vec<usize>,
    /// Publish rate (messages/s) for the latency benchmark.
    #[arg(long, global = true, default_value_t = 100)]
    rate: u64,
    /// Length of the latency run.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Length of each throughput step.
    #[arg(long, global = true, default_value = "2s", value_parser = parse_duration)]
    step: Duration,
    /// Payload size in bytes (at least 8: the send timestamp).
    #[arg(long, global = true, default_value_t = 64)]
    payload: usize,
    /// Idle connections to open.
    #[arg(long, global = true, default_value_t = 10_000)]
    connections: usize,
    /// Connection handshakes in flight at once.
    #[arg(long, global = true, default_value_t = 256)]
    concurrency: usize,
    /// How Tern's subscribers get their frames (latency, throughput, idle): `websocket`, an
    /// HTTP streaming session (`stream`), or plain server-sent events (`sse`); publishers keep
    /// the WebSocket.
    #[arg(long, global = true, value_enum, default_value_t = target::Transport::Websocket)]
    transport: target::Transport,
    /// Stop raising the rate past this many deliveries per second.
    #[arg(long, global = true, default_value_t = 20_000_000)]
    max_deliveries: u64,
}

#[derive(Debug, Subcommand)]
enum BenchKind {
    /// Fan-out latency at a fixed rate (p50/p90/p99/p99.9/max).
    Latency,
    /// Highest sustained deliveries per second.
    Throughput,
    /// Memory per idle connection and connection setup rate.
    Idle,
    /// All of the above (the default).
    All,
    /// One backbone hop: two nodes joined by the backbone; messages/s over the link and the
    /// latency the hop adds (beside NATS gateways with --nats-url and --nats-remote-url).
    Backbone,
    /// The durable log: publish ack latency and throughput on history channels, per sync
    /// policy, beside a channel without history.
    History,
    /// Presence at scale: members entering one channel on one node of three; how soon all
    /// agree, frames and bytes per watcher with and without batching, memory per member.
    Presence {
        /// Members to enter.
        #[arg(long, default_value_t = 10_000)]
        members: usize,
    },
    /// Metrics' cost: fan-out at a fixed load (--rate publishes/s to the largest
    /// --subscribers, for --duration; the server's CPU per delivery) and idle connections
    /// (memory, setup rate) against a node with `[metrics] enabled = true`, then `false`,
    /// three times each, alternating; prints both and the difference (aim: within 5 %).
    Metrics,
    /// A read storm: history pages of big messages read by 64 readers at once; the node's
    /// memory and a bystander's latency.
    Reads {
        /// Lines appended to the node's config (e.g. `[limits]` settings to compare).
        #[arg(long, default_value = "")]
        config: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) =
        s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" | "" => v,
        "m" => v * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Everything measured for one target.
#[derive(Debug, Default)]
struct Results {
    /// The target's name in the tables.
    name: &'static str,
    latency: Vec<LatencyReport>,
    throughput: Vec<ThroughputReport>,
    idle: Option<IdleReport>,
}

async fn run_suite(
    kind: &BenchKind,
    target: &Target,
    pid: Option<u32>,
    c: &Common,
) -> anyhow::Result<Results> {
    let mut r = Results { name: target.name(), ..Results::default() };
    let all = matches!(kind, BenchKind::All);
    // Idle first: the server's memory is read on a fresh process, before other runs
    // leave freed-but-kept heap behind that would hide the per-connection cost.
    if all || matches!(kind, BenchKind::Idle) {
        eprintln!("[{}] idle: opening {} connections", target.name(), c.connections);
        r.idle = Some(idle::idle(target, pid, c.connections, c.concurrency).await?);
    }
    if all || matches!(kind, BenchKind::Latency) {
        for &n in &c.subscribers {
            eprintln!(
                "[{}] latency: 1 → {n} subscribers at {}/s for {:?}",
                target.name(),
                c.rate,
                c.duration
            );
            r.latency.push(fanout::latency(target, pid, n, c.rate, c.duration, c.payload).await?);
        }
    }
    if all || matches!(kind, BenchKind::Throughput) {
        for &n in &c.subscribers {
            eprintln!("[{}] throughput: 1 → {n} subscribers, raising the rate", target.name());
            let t = fanout::throughput(target, pid, n, c.step, c.payload, c.max_deliveries).await?;
            for (rate, ok, per_sec) in &t.steps {
                eprintln!(
                    "    {rate:>7} pub/s → {per_sec:>12.0} deliveries/s {}",
                    if *ok { "kept up" } else { "fell behind" }
                );
            }
            r.throughput.push(t);
        }
    }
    Ok(r)
}

/// Runs the benchmarks and prints the figures (and the goals beside them).
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let kind = args.kind.unwrap_or(BenchKind::All);
    let c = args.common;
    if matches!(kind, BenchKind::Backbone) {
        return backbone(&c).await;
    }
    if matches!(kind, BenchKind::History) {
        return history::run(c.hop_rate.min(1_000), c.duration, 32).await;
    }
    if let BenchKind::Presence { members } = &kind {
        return presence::run(*members).await;
    }
    if matches!(kind, BenchKind::Metrics) {
        return metrics_cost(&c).await;
    }
    if let BenchKind::Reads { config } = &kind {
        return reads::run(config).await;
    }
    let mut spawned = None;
    let (tern_url, tern_pid) = match &c.url {
        Some(u) => (u.clone(), c.server_pid),
        None => {
            let s = TernServer::spawn().await?;
            let out = (s.url.clone(), Some(s.pid));
            eprintln!("spawned tern edge (pid {}) at {}", s.pid, s.url);
            spawned = Some(s);
            out
        }
    };
    let tern = run_suite(&kind, &Target::tern(&tern_url).over(c.transport), tern_pid, &c).await;
    if let Some(s) = spawned {
        s.stop().await;
    }
    let tern = tern?;
    let nats = match &c.nats_url {
        Some(u) => Some(run_suite(&kind, &Target::nats(u), c.nats_pid, &c).await?),
        None => None,
    };
    print_report(&tern, nats.as_ref(), &c);
    Ok(())
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 { format!("{:.2}×", a / b) } else { "-".into() }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

fn print_report(tern: &Results, nats: Option<&Results>, c: &Common) {
    println!();
    println!("== fan-out latency ({}-byte payloads, {} publishes/s) ==", c.payload, c.rate);
    println!(
        "{:<11} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8}",
        "target",
        "subs",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "delivered",
        "dropped",
        "srv cpu"
    );
    let rows = tern
        .latency
        .iter()
        .map(|l| (tern.name, l))
        .chain(nats.into_iter().flat_map(|n| n.latency.iter().map(|l| ("nats", l))));
    for (name, l) in rows {
        let [p50, p90, p99, p999, max] = l.percentiles_us;
        println!(
            "{:<11} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8}",
            name,
            l.subscribers,
            ms(p50),
            ms(p90),
            ms(p99),
            ms(p999),
            ms(max),
            format!("{}/{}", l.delivered, l.expected),
            l.dropped_subscribers,
            opt(l.server_cpu, |v| format!("{v:.0}%"))
        );
    }
    if let Some(l) = tern.latency.iter().find(|l| l.subscribers == 1000) {
        let p99 = l.percentiles_us[2];
        println!(
            "goal: p99 ≤ 5 ms at 100 publishes/s × 1000 subscribers: {} ms → {}",
            ms(p99),
            if p99 <= 5000 && c.rate == 100 { "met" } else { "not met" }
        );
    }

    println!();
    println!("== fan-out throughput (highest sustained) ==");
    println!(
        "{:<11} {:>5} {:>12} {:>15} {:>8} {:>10}",
        "target", "subs", "pub/s", "deliveries/s", "srv cpu", "vs nats"
    );
    for t in &tern.throughput {
        let theirs =
            nats.and_then(|n| n.throughput.iter().find(|x| x.subscribers == t.subscribers));
        println!(
            "{:<11} {:>5} {:>12} {:>15.0} {:>8} {:>10}",
            tern.name,
            t.subscribers,
            t.sustained_rate,
            t.deliveries_per_sec,
            opt(t.server_cpu, |v| format!("{v:.0}%")),
            theirs.map_or("-".into(), |n| ratio(t.deliveries_per_sec, n.deliveries_per_sec))
        );
        if let Some(n) = theirs {
            println!(
                "{:<11} {:>5} {:>12} {:>15.0} {:>8} {:>10}",
                "nats",
                n.subscribers,
                n.sustained_rate,
                n.deliveries_per_sec,
                opt(n.server_cpu, |v| format!("{v:.0}%")),
                "1.00×"
            );
        }
    }
    println!(
        "goal: deliveries/s above NATS's on the same machine and workload (aim 1.5×){}",
        if nats.is_none() { " — run bench/compare-nats.sh to compare" } else { "" }
    );

    println!();
    println!("== idle connections ==");
    println!(
        "{:<11} {:>11} {:>7} {:>12} {:>14}",
        "target", "connections", "failed", "conn/s", "server B/conn"
    );
    let idle_rows = [(tern.name, tern.idle.as_ref()), ("nats", nats.and_then(|n| n.idle.as_ref()))];
    for (name, i) in idle_rows {
        if let Some(i) = i {
            println!(
                "{:<11} {:>11} {:>7} {:>12.0} {:>14}",
                name,
                i.connections,
                i.failed,
                i.per_sec,
                opt(i.rss_per_conn, |v| format!("{v:.0}"))
            );
        }
    }
    if let Some(i) = &tern.idle {
        let per = i.rss_per_conn.unwrap_or(f64::NAN);
        println!(
            "goal: ≤ 8 KiB (8192 B) of server memory per idle connection: {per:.0} B → {}",
            if per <= 8192.0 { "met" } else { "not met" }
        );
        if let Some(n) = nats.and_then(|n| n.idle.as_ref()) {
            println!(
                "goal: connection rate ≥ 1.5× NATS's: {} → {}",
                ratio(i.per_sec, n.per_sec),
                if i.per_sec >= 1.5 * n.per_sec { "met" } else { "not met" }
            );
        }
    }
}

async fn backbone(c: &Common) -> anyhow::Result<()> {
    let pair = hop::TernPair::spawn().await?;
    let (a, b) = (pair.nodes[0].url.clone(), pair.nodes[1].url.clone());
    eprintln!("spawned two tern nodes joined by the backbone: {a} and {b}");
    let pids = [pair.nodes[0].pid, pair.nodes[1].pid];
    let params = hop::HopParams {
        rate: c.hop_rate,
        duration: c.duration,
        step: c.step,
        payload: c.payload,
        max: c.max_deliveries,
    };
    let measure = |same: Target, remote: Target, pids: Option<[u32; 2]>| async move {
        hop::measure(&same, &remote, pids, params).await
    };
    let tern = measure(Target::tern(&a), Target::tern(&a).subscribing_at(&b), Some(pids)).await;
    pair.stop().await;
    let tern = tern?;
    for (rate, ok, per_sec) in &tern.link.steps {
        eprintln!(
            "    tern link {rate:>7} msg/s offered → {per_sec:>10.0} delivered/s {}",
            if *ok { "kept up" } else { "fell behind" }
        );
    }
    let nats = match (&c.nats_url, &c.nats_remote_url) {
        (Some(x), Some(y)) => {
            eprintln!("nats: publishing at {x}, subscribing at {y} (gateway hop)");
            Some(measure(Target::nats(x), Target::nats(x).subscribing_at(y), None).await?)
        }
        _ => None,
    };
    println!();
    println!(
        "== one hop between servers ({} publishes/s, {}-byte payloads) ==",
        c.hop_rate, c.payload
    );
    println!(
        "{:<11} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>14}",
        "target",
        "local p50",
        "local p99",
        "hop p50",
        "hop p99",
        "added p50",
        "added p99",
        "link msg/s"
    );
    let row = |name: &str, h: &hop::HopReport| {
        let (l, r) = (h.local.percentiles_us, h.remote.percentiles_us);
        println!(
            "{:<11} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>14.0}",
            name,
            ms(l[0]),
            ms(l[2]),
            ms(r[0]),
            ms(r[2]),
            ms(r[0].saturating_sub(l[0])),
            ms(r[2].saturating_sub(l[2])),
            h.link.deliveries_per_sec
        );
    };
    row("tern", &tern);
    if let Some(n) = &nats {
        row("nats", n);
    }
    if let Some((a, b)) = tern.cpu_per_message_us {
        println!(
            "tern CPU per replicated message at {} msg/s: publishing node {a:.1} µs, receiving node {b:.1} µs",
            hop::CPU_RATE
        );
    }
    let per = tern.link.deliveries_per_sec;
    println!(
        "goal: ≥ 300,000 messages/s per link: {per:.0} → {}",
        if per >= 300_000.0 { "met" } else { "not met" }
    );
    let added =
        |h: &hop::HopReport| h.remote.percentiles_us[2].saturating_sub(h.local.percentiles_us[2]);
    match &nats {
        Some(n) => println!(
            "goal: added p99 ≤ NATS gateway hop + 0.15 ms: {} ms vs {} ms → {}",
            ms(added(&tern)),
            ms(added(n) + 150),
            if added(&tern) <= added(n) + 150 { "met" } else { "not met" }
        ),
        None => println!(
            "goal: added p99 ≤ NATS gateway hop + 0.15 ms — run bench/compare-nats-gateways.sh to compare"
        ),
    }
    let lost = tern.remote.expected - tern.remote.delivered.min(tern.remote.expected);
    println!("integrity: {lost} lost over the hop");
    Ok(())
}

/// `tern bench metrics`: the same fan-out and idle runs with metrics on and off.
async fn metrics_cost(c: &Common) -> anyhow::Result<()> {
    const ROUNDS: usize = 3;
    let subs = c.subscribers.iter().copied().max().unwrap_or(1000);
    let conns = c.connections.min(5_000);
    // Per run: [deliveries/s, connections/s, RSS bytes per connection].
    let mut on: Vec<[f64; 3]> = Vec::new();
    let mut off: Vec<[f64; 3]> = Vec::new();
    // Alternating, so drift (thermal, other load) falls on both alike.
    for round in 0..2 * ROUNDS {
        let enabled = round % 2 == 0;
        let which = if enabled { "on" } else { "off" };
        let s = TernServer::spawn_config(&format!("[metrics]\nenabled = {enabled}\n")).await?;
        let target = Target::tern(&s.url).over(c.transport);
        // At most 32 handshakes in flight: at the idle benchmark's 256 the setup rate swings
        // between runs far more than 5 % (accept-backlog stalls), hiding any difference.
        let idle = idle::idle(&target, Some(s.pid), conns, c.concurrency.min(32)).await;
        // A fixed load, so the server's CPU per delivery compares (a throughput search
        // moves in rate steps too coarse for a few per cent).
        let l = fanout::latency(&target, Some(s.pid), subs, c.rate, c.duration, c.payload).await;
        s.stop().await;
        let (idle, l) = (idle?, l?);
        let cpu_us = l.server_cpu.unwrap_or(0.0) / 100.0 * c.duration.as_secs_f64() * 1e6;
        let per_delivery = if l.delivered > 0 { cpu_us / l.delivered as f64 } else { 0.0 };
        let row = [per_delivery, idle.per_sec, idle.rss_per_conn.unwrap_or(0.0)];
        eprintln!(
            "[metrics {which}] {:.3} µs CPU per delivery ({}/{} delivered, p99 {} µs), {:.0} \
             connections/s, {:.0} B/connection",
            row[0], l.delivered, l.expected, l.percentiles_us[2], row[1], row[2]
        );
        if enabled { on.push(row) } else { off.push(row) }
    }
    let median = |v: &[[f64; 3]], k: usize| {
        let mut xs: Vec<f64> = v.iter().map(|r| r[k]).collect();
        xs.sort_by(f64::total_cmp);
        (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
    };
    println!();
    println!(
        "== metrics' cost (median of {ROUNDS} runs each, alternating; {} publishes/s to {subs} \
         subscribers for {:?}; {conns} idle connections) ==",
        c.rate, c.duration
    );
    println!(
        "{:<26} {:>26} {:>26} {:>8}",
        "", "metrics on (min–max)", "metrics off (min–max)", "on/off"
    );
    for (k, name) in
        ["server CPU µs per delivery", "connections opened/s", "RSS bytes per connection"]
            .iter()
            .enumerate()
    {
        let (a, a0, a1) = median(&on, k);
        let (b, b0, b1) = median(&off, k);
        let ratio = if b > 0.0 { format!("{:+.1} %", (a / b - 1.0) * 100.0) } else { "-".into() };
        let digits = if k == 0 { 3 } else { 0 };
        println!(
            "{name:<26} {:>26} {:>26} {ratio:>8}",
            format!("{a:.digits$} ({a0:.digits$}–{a1:.digits$})"),
            format!("{b:.digits$} ({b0:.digits$}–{b1:.digits$})")
        );
    }
    println!(
        "aim: within 5 %; where the runs of one setting spread wider than that, the \
         difference is noise"
    );
    Ok(())
}
