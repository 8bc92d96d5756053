//! The durable log's cost: publish ack latency and publish throughput on a channel whose
//! namespace keeps history (acks wait for the log write), per sync policy and durability
//! level, beside a channel without history on the same node; and how long a client that
//! missed 10,000 messages takes to resume, on the same node and on another region.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tern_client::{Client, ClientOptions, Durability};
use tern_proto::client::{
    Connect, Message, OriginPosition, Resume, Subscribe, client_frame, server_frame,
};
use tern_proto::codec::{self, Format};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::hop::TernPair;
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
    durability: Durability,
) -> anyhow::Result<LogReport> {
    let publish = async |c: &Client| {
        c.publish_durable(channel, "", None, "x".repeat(64), durability).await.map(|_| ())
    };
    // Ack latency: one publisher at a fixed rate.
    let client = Client::connect(url, ClientOptions::default()).await?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let end = Instant::now() + duration;
    let mut next = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep_until(next.into()).await;
        let t = Instant::now();
        publish(&client).await?;
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
                c.publish_durable(&channel, "", None, "x".repeat(64), durability).await?;
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

fn history_section(dir: &std::path::Path, sync: &str) -> String {
    format!(
        "[history]\ndata_dir = \"{}\"\nsync = \"{sync}\"\n[[history.namespaces]]\nname = \"log\"\nmax_messages = 100000\n",
        dir.display()
    )
}

/// A raw protobuf WebSocket client (the benchmark needs positions the SDK keeps inside).
pub(crate) struct Raw {
    pub(crate) ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    pub(crate) node: String,
}

impl Raw {
    pub(crate) async fn open(url: &str) -> anyhow::Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async(format!("{url}/v1/ws?format=proto")).await?;
        let mut raw = Self { ws, node: String::new() };
        raw.send(client_frame::Kind::Connect(Connect { protocol: 1, ..Default::default() }))
            .await?;
        if let server_frame::Kind::Connected(c) = raw.recv().await? {
            raw.node = c.node;
        }
        Ok(raw)
    }

    pub(crate) async fn send(&mut self, kind: client_frame::Kind) -> anyhow::Result<()> {
        self.ws.send(WsMessage::Binary(codec::encode_client(kind, Format::Protobuf))).await?;
        Ok(())
    }

    pub(crate) async fn recv(&mut self) -> anyhow::Result<server_frame::Kind> {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), self.ws.next()).await?;
            match next {
                Some(Ok(WsMessage::Binary(b))) => return Ok(codec::decode_server(&b, false)?),
                Some(Ok(_)) => continue,
                other => anyhow::bail!("connection ended: {other:?}"),
            }
        }
    }

    /// Subscribes (resuming from `resume` when given); returns once subscribed.
    pub(crate) async fn subscribe(
        &mut self,
        channel: &str,
        resume: Option<Resume>,
    ) -> anyhow::Result<()> {
        let frame = Subscribe {
            request_id: 1,
            channel: channel.into(),
            rewind: None,
            resume,
            presence: false,
        };
        self.send(client_frame::Kind::Subscribe(frame)).await?;
        loop {
            if let server_frame::Kind::Subscribed(_) = self.recv().await? {
                return Ok(());
            }
        }
    }

    /// Reads until `n` messages arrived; returns the last.
    async fn messages(&mut self, n: usize) -> anyhow::Result<Message> {
        let mut got = 0;
        let mut last = None;
        while got < n {
            if let server_frame::Kind::Deliver(d) = self.recv().await? {
                got += d.messages.len();
                last = d.messages.into_iter().last().or(last);
            }
        }
        last.ok_or_else(|| anyhow::anyhow!("no message"))
    }
}

/// Time for a client that missed `missed` messages to have them all again after it comes
/// back, on `back_url` (the node it left, or another region).
async fn resume_time(
    pub_url: &str,
    back_url: &str,
    channel: &str,
    missed: usize,
) -> anyhow::Result<Duration> {
    let mut sub = Raw::open(pub_url).await?;
    sub.subscribe(channel, None).await?;
    let publisher = Client::connect(pub_url, ClientOptions::default()).await?;
    publisher.publish(channel, "seen").await?;
    let last = sub.messages(1).await?;
    let resume = Resume {
        node: sub.node.clone(),
        position: last.position,
        origins: vec![OriginPosition {
            origin: last.origin.clone(),
            epoch: last.origin_epoch,
            seq: last.origin_seq,
        }],
    };
    drop(sub); // gone without a goodbye
    let mut tasks = Vec::new();
    for p in 0..8 {
        let (publisher, channel) = (publisher.clone(), channel.to_owned());
        tasks.push(tokio::spawn(async move {
            for k in (p..missed).step_by(8) {
                publisher.publish(&channel, format!("{k:>64}")).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    publisher.close().await;
    // Let replication reach the other region's log.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let mut back = Raw::open(back_url).await?;
    back.subscribe(channel, Some(resume)).await?;
    back.messages(missed).await?;
    Ok(t.elapsed())
}

async fn node(dir: &std::path::Path, sync: &str) -> anyhow::Result<TernServer> {
    let config = dir.join(format!("{sync}.toml"));
    std::fs::write(
        &config,
        format!(
            "[node]\nregion = \"bench\"\nname = \"{sync}\"\n[listen]\nclient = \"127.0.0.1:0\"\n{}{}",
            crate::process::LOAD_LIMITS,
            history_section(&dir.join(sync), sync)
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
            let local = Durability::Local;
            reports.push(
                measure(&server.url, "plain:bench", plain, rate, duration, publishers, local)
                    .await?,
            );
        }
        let label = format!("history, sync = {sync}");
        let r = measure(
            &server.url,
            "log:bench",
            &label,
            rate,
            duration,
            publishers,
            Durability::Local,
        )
        .await;
        server.stop().await;
        reports.push(r?);
    }
    // Replicated durability, and resume, on two regions joined by the backbone.
    let pair =
        TernPair::spawn_with(|i| history_section(&dir.join(format!("pair-{i}")), "group")).await?;
    let (a, b) = (pair.nodes[0].url.clone(), pair.nodes[1].url.clone());
    eprintln!("[history] two regions: pids {} and {}", pair.nodes[0].pid, pair.nodes[1].pid);
    let label = "history, sync = group, replicated";
    let r =
        measure(&a, "log:repl", label, rate, duration, publishers, Durability::Replicated).await;
    let missed = 10_000;
    let same = resume_time(&a, &a, "log:resume-same", missed).await;
    let other = resume_time(&a, &b, "log:resume-other", missed).await;
    pair.stop().await;
    reports.push(r?);
    let (same, other) = (same?, other?);
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
    println!("(ms; the log runs on this machine's disk: `group` fsyncs every group of writes;");
    println!(" `replicated` also waits for a node of another region, here over loopback QUIC)");
    println!();
    println!(
        "== resume: a client that missed {missed} messages comes back (connect → all replayed) =="
    );
    let rate = |d: Duration| missed as f64 / d.as_secs_f64();
    println!(
        "same node (by log position)        {:>8.1} ms  {:>10.0} msgs/s",
        same.as_secs_f64() * 1000.0,
        rate(same)
    );
    println!(
        "another region (by origin vector)  {:>8.1} ms  {:>10.0} msgs/s",
        other.as_secs_f64() * 1000.0,
        rate(other)
    );
    Ok(())
}
