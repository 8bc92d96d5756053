//! A read storm (`tern bench reads`): a history namespace holding 500 messages of 60 KB,
//! then 32 HTTP readers and 8 WebSockets with 4 readers each, every reader paging through
//! the whole history at once, while a bystander's live messages are timed. Prints the
//! node's resident memory before, at its peak and 10 s after, and the bystander's delivery
//! latency during the storm, beside the goals.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tern_client::{Client, ClientOptions};
use tern_proto::client::{HistoryRequest, Publish, client_frame, message, publish, server_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::history::Raw;
use crate::process::{TernServer, rss_bytes};

/// Messages in the history, and their size.
const MESSAGES: usize = 500;
const MESSAGE_BYTES: usize = 60_000;
const HTTP_READERS: usize = 32;
const WS_CONNECTIONS: usize = 8;
const WS_READERS: usize = 4;
/// The bystander's live rate.
const BYSTANDER_RATE: u64 = 100;

/// Everything `tern bench reads` measured.
#[derive(Debug)]
pub struct ReadStorm {
    /// The node's resident memory before the storm, bytes.
    pub rss_start: u64,
    /// Its highest sample (every 20 ms) during the storm.
    pub rss_peak: u64,
    /// 10 s after the storm.
    pub rss_settled: u64,
    /// Whole-history reads completed.
    pub reads: u64,
    /// Pages refused for load (and asked again).
    pub refused: u64,
    /// Pages served.
    pub pages: u64,
    /// How long the storm took.
    pub storm: Duration,
    /// Bystander delivery latency, µs: p50, p99, max.
    pub bystander_us: (u64, u64, u64),
    /// Messages the bystander got.
    pub bystander_messages: u64,
}

/// Runs the read storm against a node it starts, with `extra` appended to its config.
pub async fn run(extra: &str) -> anyhow::Result<()> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let dir = std::env::temp_dir().join(format!("tern-bench-reads-{nanos}"));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nregion = \"bench\"\nname = \"reads\"\n[listen]\nclient = \"127.0.0.1:0\"\n{}{}\n[history]\ndata_dir = \"{}\"\n[[history.namespaces]]\nname = \"log\"\nmax_messages = 100000\n",
            crate::process::LOAD_LIMITS,
            extra,
            dir.join("data").display()
        ),
    )?;
    let server = TernServer::spawn_with(&["--config", config.to_str().unwrap_or_default()]).await?;
    eprintln!("[reads] tern edge pid {}", server.pid);
    let r = storm(&server).await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    print(&r?);
    Ok(())
}

async fn storm(server: &TernServer) -> anyhow::Result<ReadStorm> {
    let url = server.url.clone();
    let addr = url.trim_start_matches("ws://").to_owned();
    // The history: 500 messages of 60 KB.
    let mut p = Raw::open(&url).await?;
    let body = "x".repeat(MESSAGE_BYTES);
    for i in 0..MESSAGES {
        p.send(client_frame::Kind::Publish(Publish {
            request_id: i as u32 + 1,
            channel: "log:storm".into(),
            data: Some(publish::Data::Text(body.clone())),
            ..Default::default()
        }))
        .await?;
    }
    let mut acked = 0;
    while acked < MESSAGES {
        if let server_frame::Kind::Ack(_) = p.recv().await? {
            acked += 1;
        }
    }
    drop(p);
    // The bystander: a live channel, timed end to end.
    let base = Instant::now();
    let mut sub = Raw::open(&url).await?;
    sub.subscribe("chat:bystander", None).await?;
    let publisher = Client::connect(&url, ClientOptions::default()).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let pacer = {
        let (publisher, stop) = (publisher.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / BYSTANDER_RATE));
            while !stop.is_cancelled() {
                tick.tick().await;
                let at = base.elapsed().as_micros().to_string();
                let _ = publisher.publish("chat:bystander", at).await;
            }
        })
    };
    let timed = tokio_util::sync::CancellationToken::new();
    let until = timed.clone();
    let timing = tokio::spawn(async move {
        let mut h = Histogram::<u64>::new(3).expect("a histogram");
        loop {
            let next = tokio::select! {
                _ = until.cancelled() => return h,
                next = sub.recv() => next,
            };
            match next {
                Ok(server_frame::Kind::Deliver(d)) => {
                    for m in d.messages {
                        if let Some(message::Data::Text(t)) = m.data {
                            let sent: u64 = t.parse().unwrap_or(0);
                            let now = base.elapsed().as_micros() as u64;
                            let _ = h.record(now.saturating_sub(sent));
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => return h,
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_start = rss_bytes(server.pid)?;
    // Peak memory, sampled while the storm runs.
    let peak = Arc::new(AtomicU64::new(rss_start));
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (peak, sampling, pid) = (peak.clone(), sampling.clone(), server.pid);
        tokio::spawn(async move {
            while !sampling.is_cancelled() {
                if let Ok(rss) = rss_bytes(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let mut readers = Vec::new();
    for _ in 0..HTTP_READERS {
        let (addr, counters) = (addr.clone(), counters.clone());
        readers.push(tokio::spawn(async move { http_reader(&addr, &counters).await }));
    }
    for _ in 0..WS_CONNECTIONS {
        let (url, counters) = (url.clone(), counters.clone());
        readers.push(tokio::spawn(async move { ws_readers(&url, &counters).await }));
    }
    for r in readers {
        r.await??;
    }
    let storm = started.elapsed();
    sampling.cancel();
    let _ = sampler.await;
    stop.cancel();
    let _ = pacer.await;
    publisher.close().await;
    // Memory given back once the storm is over.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss_settled = rss_bytes(server.pid)?;
    timed.cancel();
    let h = timing.await?;
    Ok(ReadStorm {
        rss_start,
        rss_peak: peak.load(Ordering::Relaxed),
        rss_settled,
        reads: counters.reads.load(Ordering::Relaxed),
        refused: counters.refused.load(Ordering::Relaxed),
        pages: counters.pages.load(Ordering::Relaxed),
        storm,
        bystander_us: (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max()),
        bystander_messages: h.len(),
    })
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    refused: AtomicU64,
    pages: AtomicU64,
}

/// Pages through the whole history over HTTP (limit 1,000), retrying refused pages.
async fn http_reader(addr: &str, counters: &Counters) -> anyhow::Result<()> {
    let mut from: Option<u64> = None;
    let mut got = 0;
    loop {
        let path = match from {
            Some(f) => format!("/v1/channels/log:storm/messages?limit=1000&from={f}"),
            None => "/v1/channels/log:storm/messages?limit=1000".to_owned(),
        };
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(out.len());
        let status = std::str::from_utf8(&out[..split.min(12)])?
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_owned();
        if status != "200" {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        counters.pages.fetch_add(1, Ordering::Relaxed);
        let page: serde_json::Value = serde_json::from_slice(&out[(split + 4).min(out.len())..])?;
        got += page["messages"].as_array().map_or(0, Vec::len);
        match page["next"]["from"].as_str().and_then(|f| f.parse().ok()) {
            Some(f) => from = Some(f),
            None => break,
        }
    }
    anyhow::ensure!(got == MESSAGES, "an HTTP reader got {got} messages");
    counters.reads.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// One WebSocket with [`WS_READERS`] readers, each paging through the whole history
/// (limit 1,000) with its own requests in flight at once; refused pages are asked again.
async fn ws_readers(url: &str, counters: &Counters) -> anyhow::Result<()> {
    let mut c = Raw::open(url).await?;
    // Per reader: the next `from`, messages so far, done.
    let mut state: Vec<(Option<u64>, usize, bool)> = vec![(None, 0, false); WS_READERS];
    let request = |reader: usize, from: Option<u64>| {
        client_frame::Kind::History(HistoryRequest {
            request_id: reader as u32 + 1,
            channel: "log:storm".into(),
            limit: 1000,
            from,
            ..Default::default()
        })
    };
    for r in 0..WS_READERS {
        c.send(request(r, None)).await?;
    }
    while state.iter().any(|s| !s.2) {
        match c.recv().await? {
            server_frame::Kind::History(page) => {
                let r = page.request_id as usize - 1;
                counters.pages.fetch_add(1, Ordering::Relaxed);
                state[r].1 += page.messages.len();
                match page.next_from {
                    Some(f) => {
                        state[r].0 = Some(f);
                        c.send(request(r, Some(f))).await?;
                    }
                    None => {
                        anyhow::ensure!(state[r].1 == MESSAGES, "a WS reader got {}", state[r].1);
                        state[r].2 = true;
                        counters.reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            server_frame::Kind::Error(e) if e.request_id > 0 => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                let r = e.request_id as usize - 1;
                c.send(request(r, state[r].0)).await?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0))
}

fn print(r: &ReadStorm) {
    let (p50, p99, max) = r.bystander_us;
    println!();
    println!(
        "== read storm: {MESSAGES} messages of {} KB; {HTTP_READERS} HTTP readers and \
         {WS_CONNECTIONS} WebSockets × {WS_READERS} readers, each paging through all of it ==",
        MESSAGE_BYTES / 1000
    );
    println!(
        "reads {} (pages {}, refused for load and retried {}) in {:.1} s",
        r.reads,
        r.pages,
        r.refused,
        r.storm.as_secs_f64()
    );
    println!(
        "node RSS: start {}, peak {}, 10 s after {} ({:+.0} % of start; goal: at most +20 %)",
        mib(r.rss_start),
        mib(r.rss_peak),
        mib(r.rss_settled),
        (r.rss_settled as f64 / r.rss_start.max(1) as f64 - 1.0) * 100.0
    );
    println!(
        "bystander ({} messages at {BYSTANDER_RATE}/s): p50 {:.1} ms, p99 {:.1} ms, worst {:.1} ms (goal: worst under 100 ms)",
        r.bystander_messages,
        p50 as f64 / 1000.0,
        p99 as f64 / 1000.0,
        max as f64 / 1000.0
    );
}
