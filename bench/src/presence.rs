//! Presence at scale: `members` connections enter one channel on node A of a three-node
//! mesh, while a watcher on each node (a `presence: true` subscription) counts the frames and
//! bytes it gets. Reported per mode (events batched, as by default; one frame per event):
//! how long after the last enter was acknowledged all three watchers held every member, the
//! frames and bytes per watcher, and the growth of each node's memory per member (node A also
//! holds the members' connections, opened before the measure starts; the members carry no
//! data, so this is the cost beyond their data).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tern_proto::client::{
    ClientFrame, PresenceAction, PresenceRequest, ServerFrame, Subscribe, client_frame,
    server_frame,
};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::hop::TernPair;
use crate::process::rss_bytes;
use crate::target::{Target, Ws};

/// The figures of one mode.
#[derive(Debug, Clone)]
pub struct PresenceReport {
    /// The mode.
    pub mode: &'static str,
    /// Members entered.
    pub members: usize,
    /// From the last enter's acknowledgement until all three watchers held every member.
    pub agree: Duration,
    /// Frames and bytes each watcher got for the enters (A's, B's, C's).
    pub frames: [usize; 3],
    /// See `frames`.
    pub bytes: [usize; 3],
    /// Memory growth per member on A (the owner) and B (a peer), in bytes.
    pub memory: [Option<f64>; 2],
}

const CHANNEL: &str = "room:bench";

fn frame(kind: client_frame::Kind) -> WsMessage {
    WsMessage::Binary(ClientFrame { kind: Some(kind) }.encode_to_vec().into())
}

async fn expect(ws: &mut Ws, want: impl Fn(&server_frame::Kind) -> bool) -> anyhow::Result<()> {
    while let Some(msg) = ws.next().await {
        if let WsMessage::Binary(b) = msg? {
            match ServerFrame::decode(b)?.kind {
                Some(k) if want(&k) => return Ok(()),
                Some(server_frame::Kind::Error(e)) => anyhow::bail!("tern error: {}", e.reason),
                _ => {}
            }
        }
    }
    anyhow::bail!("connection closed")
}

/// A connected connection to `url`.
async fn open(url: &str, i: usize) -> anyhow::Result<Ws> {
    let target = Target::tern(url);
    let mut ws = target.open_from(url, Some(crate::idle::local_ip(i, 20_000))).await?;
    let connect = tern_proto::client::Connect { protocol: 1, ..Default::default() };
    ws.send(frame(client_frame::Kind::Connect(connect))).await?;
    expect(&mut ws, |k| matches!(k, server_frame::Kind::Connected(_))).await?;
    Ok(ws)
}

/// A watcher: its snapshot read, it counts members, frames and bytes from then on, and
/// notes when it holds `target` members.
struct Watcher {
    frames: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
    done: tokio::sync::oneshot::Receiver<Instant>,
}

async fn watcher(url: &str, target: usize) -> anyhow::Result<Watcher> {
    let mut ws = open(url, 0).await?;
    let sub =
        Subscribe { request_id: 1, channel: CHANNEL.into(), presence: true, ..Default::default() };
    ws.send(frame(client_frame::Kind::Subscribe(sub))).await?;
    expect(&mut ws, |k| matches!(k, server_frame::Kind::PresenceReply(r) if r.next.is_empty()))
        .await?;
    let (frames, bytes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (tx, done) = tokio::sync::oneshot::channel();
    let (f, b) = (frames.clone(), bytes.clone());
    tokio::spawn(async move {
        let mut members = 0usize;
        let mut tx = Some(tx);
        while let Some(Ok(msg)) = ws.next().await {
            let WsMessage::Binary(data) = msg else { continue };
            let Ok(ServerFrame { kind: Some(server_frame::Kind::Presence(e)) }) =
                ServerFrame::decode(data.clone())
            else {
                continue;
            };
            f.fetch_add(1, Ordering::Relaxed);
            b.fetch_add(data.len(), Ordering::Relaxed);
            for ev in e.events {
                match PresenceAction::try_from(ev.action) {
                    Ok(PresenceAction::Enter) => members += 1,
                    Ok(PresenceAction::Leave) => members = members.saturating_sub(1),
                    _ => {}
                }
            }
            if members >= target {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Instant::now());
                }
            }
        }
    });
    Ok(Watcher { frames, bytes, done })
}

async fn measure(
    mode: &'static str,
    members: usize,
    limits: &str,
    presence: &str,
) -> anyhow::Result<PresenceReport> {
    let section = format!("[presence]\nrate = 1000000\nburst = 1000000\n{presence}");
    // A port picked free may still be held by the previous run's closing connections:
    // pick again.
    let mut tries = 0;
    let mesh = loop {
        match TernPair::mesh(3, limits, |_| section.clone()).await {
            Ok(m) => break m,
            Err(e) if tries < 5 => {
                tries += 1;
                eprintln!("[presence/{mode}] starting the nodes failed ({e:#}); again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let urls: Vec<String> = mesh.nodes.iter().map(|n| n.url.clone()).collect();
    let pids: Vec<u32> = mesh.nodes.iter().map(|n| n.pid).collect();
    // The links come up and the nodes catch up with each other.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let result = async {
        let mut watchers = Vec::new();
        for url in &urls {
            watchers.push(watcher(url, members).await?);
        }
        eprintln!("[presence/{mode}] opening {members} connections to node A");
        let conns: Vec<anyhow::Result<Ws>> = futures_util::stream::iter(0..members)
            .map(|i| {
                let url = urls[0].clone();
                async move { open(&url, i + 1).await }
            })
            .buffer_unordered(256)
            .collect()
            .await;
        let mut conns: Vec<Ws> = conns.into_iter().collect::<Result<_, _>>()?;
        tokio::time::sleep(Duration::from_secs(12)).await;
        let before: Vec<Option<u64>> = pids.iter().map(|p| rss_bytes(*p).ok()).collect();
        eprintln!("[presence/{mode}] entering");
        for (i, ws) in conns.iter_mut().enumerate() {
            let enter = PresenceRequest {
                request_id: 1,
                channel: CHANNEL.into(),
                action: PresenceAction::Enter as i32,
                ..Default::default()
            };
            ws.feed(frame(client_frame::Kind::Presence(enter))).await?;
            if i % 64 == 63 {
                ws.flush().await?;
            }
        }
        for ws in &mut conns {
            ws.flush().await?;
        }
        for ws in &mut conns {
            expect(ws, |k| matches!(k, server_frame::Kind::PresenceReply(_))).await?;
        }
        let last = Instant::now();
        let mut agree = Duration::ZERO;
        for w in &mut watchers {
            let at = tokio::time::timeout(Duration::from_secs(120), &mut w.done)
                .await
                .context("a watcher never held every member")??;
            agree = agree.max(at.saturating_duration_since(last));
        }
        // The frames of the burst are freed by now; jemalloc returns freed pages within its
        // 10 s decay, so what stays is the members'.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let after: Vec<Option<u64>> = pids.iter().map(|p| rss_bytes(*p).ok()).collect();
        let per = |i: usize| match (before[i], after[i]) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / members as f64),
            _ => None,
        };
        let count = |f: &dyn Fn(&Watcher) -> usize| [0, 1, 2].map(|i| f(&watchers[i]));
        Ok(PresenceReport {
            mode,
            members,
            agree,
            frames: count(&|w| w.frames.load(Ordering::Relaxed)),
            bytes: count(&|w| w.bytes.load(Ordering::Relaxed)),
            memory: [per(0), per(1)],
        })
    }
    .await;
    mesh.stop().await;
    result
}

/// Heap bytes per member in the replication core, from jemalloc's count of allocated bytes
/// (the allocator of the `tern` binary; `None` elsewhere): `n` members with no data entered
/// on one node's presence state (the owner), then replicated in memory to a peer's.
fn core_memory(n: usize) -> Option<(f64, f64)> {
    use bytes::Bytes;
    use tern_backbone::core::{MemberKey, Presence, PresenceConfig};
    use tern_proto::types::{ChannelName, Epoch, NodeId};
    let allocated = || {
        tikv_jemalloc_ctl::epoch::advance().ok()?;
        tikv_jemalloc_ctl::stats::allocated::read().ok()
    };
    let (a_id, b_id) = (NodeId::parse("a/edge-1").ok()?, NodeId::parse("b/edge-1").ok()?);
    let room = ChannelName::parse(CHANNEL).ok()?;
    let config = PresenceConfig::default();
    let now = std::time::Instant::now();
    let mut a = Presence::new(a_id.clone(), Epoch(1), std::slice::from_ref(&b_id), config.clone());
    let mut b = Presence::new(b_id.clone(), Epoch(1), std::slice::from_ref(&a_id), config);
    let start = allocated()?;
    for i in 0..n {
        let key = MemberKey { client_id: format!("user-{i:06}"), connection_id: i.to_string() };
        a.put(&room, key, Bytes::new());
    }
    a.flush();
    while a.poll_event().is_some() {}
    let owner = allocated()?.saturating_sub(start) as f64 / n as f64;
    let before = allocated()?;
    a.handle_link_up(now, &b_id);
    b.handle_link_up(now, &a_id);
    loop {
        let mut moved = false;
        while let Some((_, f)) = a.poll_transmit() {
            b.handle_frame(now, &a_id, f);
            moved = true;
        }
        while let Some((_, f)) = b.poll_transmit() {
            a.handle_frame(now, &b_id, f);
            moved = true;
        }
        while b.poll_event().is_some() {}
        if !moved {
            break;
        }
    }
    if b.member_count(&room) != n {
        return None;
    }
    let peer = allocated()?.saturating_sub(before) as f64 / n as f64;
    Some((owner, peer))
}

/// Runs both modes and prints the figures.
pub async fn run(members: usize) -> anyhow::Result<()> {
    let batched = measure("batched", members, "", "").await?;
    // A frame per event: a burst of enters is as many frames queued for each watcher, more
    // than the default send queue (1,024) holds: raised here so the watchers survive it.
    let queue = "send_queue_messages = 1000000\nsend_queue_bytes = 1000000000\n";
    let single = measure("per event", members, queue, "batch_over = 1000000000\n").await?;
    println!();
    println!(
        "== presence: {members} members enter one channel on node A (3 nodes on loopback; \
         a watcher per node) =="
    );
    println!(
        "{:<10} {:>17} {:>24} {:>30} {:>20}",
        "events",
        "all agree after",
        "frames per watcher A/B/C",
        "bytes per watcher A/B/C",
        "memory/member A, B"
    );
    for r in [&batched, &single] {
        let mem = |m: Option<f64>| m.map_or("-".into(), |b| format!("{b:.0} B"));
        println!(
            "{:<10} {:>14.0} ms {:>24} {:>30} {:>20}",
            r.mode,
            r.agree.as_secs_f64() * 1000.0,
            format!("{}/{}/{}", r.frames[0], r.frames[1], r.frames[2]),
            format!("{}/{}/{}", r.bytes[0], r.bytes[1], r.bytes[2]),
            format!("{}, {}", mem(r.memory[0]), mem(r.memory[1])),
        );
    }
    let core = core_memory(100_000);
    if let Some((owner, peer)) = core {
        println!(
            "replication core, 100,000 members without data (jemalloc's allocated bytes): \
             {owner:.0} B per member on the owner, {peer:.0} B on a peer"
        );
    }
    let cut = single.frames[1] as f64 / batched.frames[1].max(1) as f64;
    println!(
        "batching cuts a watcher's frames {cut:.0}× (aim ≥ 10×); all agree {:.0} ms after the \
         last enter (aim ≤ 1 s); memory per member beyond its data {} (aim ≤ 256 B)",
        batched.agree.as_secs_f64() * 1000.0,
        core.map_or("-".into(), |(o, p)| format!("{:.0} B", o.max(p))),
    );
    let _ = batched.members;
    Ok(())
}
