//! Reads and replays of big messages over real sockets: a history page, a rewind and a
//! resume of messages near the size limit arrive whole for a client that reads at a normal
//! pace, in frames within the limit the node announced, in both encodings; a client that
//! stops reading is still cut off.

use crate::common;

use std::time::Duration;

use common::{TestNode, WAIT, eventually};
use futures_util::{SinkExt, StreamExt};
use tern_edge::config::HistoryNamespace;
use tern_proto::client::{
    self, HistoryRequest, Publish, Rewind, Subscribe, client_frame, message, server_frame,
};
use tern_proto::codec::{self, Format};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Near the default `limits.max_message_bytes` (64 KiB).
const BIG: usize = 60_000;

fn data_dir(tag: &str) -> std::path::PathBuf {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::env::temp_dir().join(format!("tern-large-{tag}-{}-{nanos}", std::process::id()))
}

async fn node(dir: &std::path::Path, edit: impl FnOnce(&mut tern_edge::Config)) -> TestNode {
    let dir = dir.to_path_buf();
    TestNode::start(move |cfg| {
        cfg.history.data_dir = dir;
        cfg.history.namespaces = vec![HistoryNamespace {
            name: "log".into(),
            max_messages: 5000,
            max_age: Duration::from_secs(3600),
        }];
        edit(cfg);
    })
    .await
}

/// `i` as a text of `len` bytes that starts with its number.
fn big_text(i: usize, len: usize) -> String {
    let mut t = format!("{i:05}:");
    t.extend(std::iter::repeat_n('x', len - t.len()));
    t
}

fn number_of(m: &client::Message) -> usize {
    match &m.data {
        Some(message::Data::Text(t)) => t[..5].parse().unwrap(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// A client that speaks the wire format of its choice and refuses any frame over the
/// `maxFrameBytes` its `connected` frame announced.
struct Client {
    ws: common::Ws,
    format: Format,
    max_frame: usize,
    /// The node's id, from `connected`.
    node: String,
}

impl Client {
    async fn connect(n: &TestNode, format: Format) -> Self {
        let name = if format == Format::Json { "json" } else { "protobuf" };
        let url = format!("ws://{}/v1/ws?format={name}", n.addr);
        let max_frame = n.node.settings().config.limits.max_frame_bytes;
        let config = WebSocketConfig::default()
            .max_message_size(Some(max_frame))
            .max_frame_size(Some(max_frame));
        let (ws, _) =
            tokio_tungstenite::connect_async_with_config(url, Some(config), false).await.unwrap();
        let mut c = Self { ws, format, max_frame, node: String::new() };
        c.send(client_frame::Kind::Connect(client::Connect {
            protocol: 1,
            client_id: "big".into(),
            ..Default::default()
        }))
        .await;
        match c.recv().await {
            server_frame::Kind::Connected(k) => {
                let announced = k.limits.unwrap().max_frame_bytes as usize;
                assert_eq!(announced, max_frame, "the node announces its frame limit");
                c.node = k.node;
            }
            other => panic!("expected connected, got {other:?}"),
        }
        c
    }

    async fn send(&mut self, kind: client_frame::Kind) {
        let bytes = codec::encode_client(kind, self.format);
        let msg = match self.format {
            Format::Json => WsMessage::Text(String::from_utf8(bytes.to_vec()).unwrap().into()),
            Format::Protobuf => WsMessage::Binary(bytes),
        };
        self.ws.send(msg).await.unwrap();
    }

    /// The next frame; every frame must be within the announced limit (the WebSocket
    /// library refuses a bigger one, which fails here).
    async fn recv(&mut self) -> server_frame::Kind {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next()).await.expect("in time");
            let (payload, text) = match next {
                Some(Ok(WsMessage::Text(t))) => (t.as_bytes().to_vec(), true),
                Some(Ok(WsMessage::Binary(b))) => (b.to_vec(), false),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                other => panic!("expected a frame, got {other:?}"),
            };
            assert!(payload.len() <= self.max_frame, "a frame of {} bytes", payload.len());
            return codec::decode_server(&payload, text).unwrap();
        }
    }

    /// Subscribes to `channel`; returns the `subscribed` frame.
    async fn subscribe(&mut self, request_id: u32, channel: &str) -> client::Subscribed {
        let frame = Subscribe { request_id, channel: channel.into(), ..Default::default() };
        self.send(client_frame::Kind::Subscribe(frame)).await;
        match self.recv().await {
            server_frame::Kind::Subscribed(s) => s,
            other => panic!("expected subscribed, got {other:?}"),
        }
    }

    /// Sends a `subscribe` resuming where `from` (an earlier `subscribed` on this node) left.
    async fn send_resume(&mut self, request_id: u32, channel: &str, from: client::Subscribed) {
        let resume = client::Resume {
            node: self.node.clone(),
            position: from.position,
            origins: from.origins,
        };
        let frame = Subscribe {
            request_id,
            channel: channel.into(),
            resume: Some(resume),
            ..Default::default()
        };
        self.send(client_frame::Kind::Subscribe(frame)).await;
    }

    /// Sends a `subscribe` rewinding the channel's last 100 messages.
    async fn send_rewind(&mut self, request_id: u32, channel: &str) {
        let frame = Subscribe {
            request_id,
            channel: channel.into(),
            rewind: Some(Rewind { count: 100, since_ms: 0 }),
            ..Default::default()
        };
        self.send(client_frame::Kind::Subscribe(frame)).await;
    }

    /// Publishes `texts` pipelined and waits for every ack.
    async fn publish_all(&mut self, channel: &str, texts: impl Iterator<Item = String>) {
        let mut sent = 0;
        for (i, text) in texts.enumerate() {
            self.send(client_frame::Kind::Publish(Publish {
                request_id: i as u32 + 1,
                channel: channel.into(),
                data: Some(client::publish::Data::Text(text)),
                ..Default::default()
            }))
            .await;
            sent += 1;
        }
        let mut acked = 0;
        while acked < sent {
            match self.recv().await {
                server_frame::Kind::Ack(_) => acked += 1,
                other => panic!("expected an ack, got {other:?}"),
            }
        }
    }

    /// Reads deliveries until `n` messages arrived; returns them.
    async fn messages(&mut self, n: usize) -> Vec<client::Message> {
        let mut got = Vec::new();
        while got.len() < n {
            match self.recv().await {
                server_frame::Kind::Deliver(d) => got.extend(d.messages),
                server_frame::Kind::Discontinuity(d) => panic!("unexpected discontinuity {d:?}"),
                other => panic!("expected deliveries, got {other:?}"),
            }
        }
        got
    }

    /// Reads a whole history, following `nextFrom`; returns the message numbers and the
    /// number of pages.
    async fn history(&mut self, channel: &str, forwards: bool) -> (Vec<usize>, usize) {
        let (mut got, mut pages, mut from) = (Vec::new(), 0, None);
        loop {
            pages += 1;
            self.send(client_frame::Kind::History(HistoryRequest {
                request_id: pages,
                channel: channel.into(),
                limit: 1000,
                forwards,
                from,
                ..Default::default()
            }))
            .await;
            let page = match self.recv().await {
                server_frame::Kind::History(p) => p,
                other => panic!("expected a history page, got {other:?}"),
            };
            assert_eq!(page.request_id, pages);
            assert!(!page.messages.is_empty() || page.next_from.is_none(), "an empty page ends");
            got.extend(page.messages.iter().map(number_of));
            match page.next_from {
                Some(next) => from = Some(next),
                None => return (got, pages as usize),
            }
        }
    }
}

/// The history page from the field report (161 messages of 2,000 B in one request), and
/// 1,000 messages of 60 KB paged both ways, in both encodings.
#[tokio::test]
async fn history_pages_of_big_messages_arrive_whole() {
    let dir = data_dir("history");
    let n = node(&dir, |_| {}).await;
    let mut publisher = Client::connect(&n, Format::Protobuf).await;
    publisher.publish_all("log:b2", (1..=161).map(|i| big_text(i, 2000))).await;
    publisher.publish_all("log:big", (1..=1000).map(|i| big_text(i, BIG))).await;
    for format in [Format::Json, Format::Protobuf] {
        let mut c = Client::connect(&n, format).await;
        let (got, _) = c.history("log:b2", false).await;
        assert_eq!(got, (1..=161).rev().collect::<Vec<_>>(), "{format:?}");
        let (got, pages) = c.history("log:big", false).await;
        assert_eq!(got, (1..=1000).rev().collect::<Vec<_>>(), "{format:?}: newest first, once");
        assert!(pages > 1, "{format:?}: paged");
        let (got, _) = c.history("log:big", true).await;
        assert_eq!(got, (1..=1000).collect::<Vec<_>>(), "{format:?}: oldest first, once");
        // The connection is still fine.
        c.send(client_frame::Kind::Heartbeat(client::Heartbeat { nonce: 9 })).await;
        assert!(matches!(c.recv().await, server_frame::Kind::Heartbeat(h) if h.nonce == 9));
    }
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rewind of 100 messages of 60 KB, and a resume that missed 1,000 of them, complete for
/// a client that reads at once, then the live stream follows.
#[tokio::test]
async fn a_rewind_and_a_resume_of_big_messages_complete() {
    let dir = data_dir("replay");
    let n = node(&dir, |_| {}).await;
    let mut publisher = Client::connect(&n, Format::Protobuf).await;
    for format in [Format::Json, Format::Protobuf] {
        let channel = format!("log:rewind-{format:?}");
        publisher.publish_all(&channel, (1..=100).map(|i| big_text(i, BIG))).await;
        let mut c = Client::connect(&n, format).await;
        c.send_rewind(1, &channel).await;
        assert!(matches!(c.recv().await, server_frame::Kind::Subscribed(_)));
        let got: Vec<usize> = c.messages(100).await.iter().map(number_of).collect();
        assert_eq!(got, (1..=100).collect::<Vec<_>>(), "{format:?}: the rewind, whole");
        publisher.publish_all(&channel, std::iter::once(big_text(101, 10))).await;
        assert_eq!(number_of(&c.messages(1).await[0]), 101, "{format:?}: then live");
    }

    // A subscriber that leaves, misses 1,000 messages of 60 KB, and resumes.
    for format in [Format::Json, Format::Protobuf] {
        let channel = format!("log:resume-{format:?}");
        let mut c = Client::connect(&n, format).await;
        let s = c.subscribe(1, &channel).await;
        drop(c);
        publisher.publish_all(&channel, (1..=1000).map(|i| big_text(i, BIG))).await;
        let mut c = Client::connect(&n, format).await;
        c.send_resume(2, &channel, s).await;
        assert!(matches!(c.recv().await, server_frame::Kind::Subscribed(s) if s.resumed));
        let got: Vec<usize> = c.messages(1000).await.iter().map(number_of).collect();
        assert_eq!(got, (1..=1000).collect::<Vec<_>>(), "{format:?}: every missed one, once");
        publisher.publish_all(&channel, std::iter::once(big_text(1001, 10))).await;
        assert_eq!(number_of(&c.messages(1).await[0]), 1001, "{format:?}: then live");
    }
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that asks for a large replay and then reads nothing is cut off once the node
/// could write nothing to it for the idle timeout; the node does not hold it.
#[tokio::test]
async fn a_client_that_stops_reading_a_replay_is_cut_off() {
    let dir = data_dir("stall");
    let n = node(&dir, |cfg| {
        cfg.heartbeat.interval = Duration::from_millis(500);
        cfg.heartbeat.idle_timeout = Duration::from_secs(2);
    })
    .await;
    let mut publisher = Client::connect(&n, Format::Protobuf).await;
    let mut c = Client::connect(&n, Format::Json).await;
    let s = c.subscribe(1, "log:stall").await;
    drop(c);
    // More than any socket buffer holds.
    publisher.publish_all("log:stall", (1..=1000).map(|i| big_text(i, BIG))).await;
    // Only the staller stays (an idle publisher would be closed meanwhile and blur the
    // count).
    drop(publisher);
    assert!(eventually(|| n.node.connection_count() == 0).await);
    let before = n.node.connection_count();
    let mut c = Client::connect(&n, Format::Json).await;
    c.send_resume(2, "log:stall", s).await;
    assert!(n.node.connection_count() > before, "connected");
    // Reads nothing: the node gives up on it.
    assert!(eventually(|| n.node.connection_count() == before).await, "the node let it go");
    // What it reads now ends before the replay does.
    let mut messages = 0;
    let mut code = None;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(WAIT, c.ws.next()).await {
        match frame {
            WsMessage::Text(t) => {
                if let Ok(server_frame::Kind::Deliver(d)) = codec::decode_server(t.as_bytes(), true)
                {
                    messages += d.messages.len();
                }
            }
            WsMessage::Close(f) => code = f.map(|f| u16::from(f.code)),
            _ => {}
        }
    }
    assert!(messages < 1000, "cut off before the end ({messages} delivered)");
    assert!(code.is_none() || code == Some(4001), "closed as a slow consumer: {code:?}");
    // The node goes on serving (a new connection: the publisher sat idle past the timeout).
    let mut publisher = Client::connect(&n, Format::Protobuf).await;
    publisher.publish_all("log:stall", std::iter::once(big_text(1001, 10))).await;
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A subscriber that reads at once keeps up with a publisher pipelining big messages on a
/// history channel (released to subscribers a commit group at a time).
#[tokio::test]
async fn a_subscriber_keeps_up_with_a_burst_of_big_messages() {
    let dir = data_dir("burst");
    let n = node(&dir, |_| {}).await;
    let mut c = Client::connect(&n, Format::Json).await;
    c.subscribe(1, "log:burst").await;
    let reader = tokio::spawn(async move {
        let got: Vec<usize> = c.messages(300).await.iter().map(number_of).collect();
        got
    });
    let mut publisher = Client::connect(&n, Format::Protobuf).await;
    publisher.publish_all("log:burst", (1..=300).map(|i| big_text(i, BIG))).await;
    assert_eq!(reader.await.unwrap(), (1..=300).collect::<Vec<_>>());
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that asks for replay after replay (each within its bounds) does not make the
/// node queue them all at once: its requests are read only as fast as it reads what they
/// queued. Here 20 rewinds of 6 MB and then a publish are sent at once; the publish is served
/// only once the client has read most of the rewinds (read at once, it would be served
/// before the first of them went out, with 120 MB queued behind).
#[tokio::test]
async fn requests_are_read_as_fast_as_their_replays_are() {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    const REWINDS: usize = 20;
    let dir = data_dir("gate");
    let n = node(&dir, |_| {}).await;
    let mut publisher = Client::connect(&n, Format::Protobuf).await;
    publisher.publish_all("log:gate", (1..=100).map(|i| big_text(i, BIG))).await;
    let mut witness = Client::connect(&n, Format::Protobuf).await;
    witness.subscribe(1, "chat:gate").await;
    let mut c = Client::connect(&n, Format::Protobuf).await;
    for i in 0..REWINDS {
        c.send_rewind(i as u32 + 1, "log:gate").await;
    }
    c.send(client_frame::Kind::Publish(Publish {
        request_id: 100,
        channel: "chat:gate".into(),
        data: Some(client::publish::Data::Text("served".into())),
        ..Default::default()
    }))
    .await;
    // The client reads everything as fast as it can, counting the rewound messages.
    let read = std::sync::Arc::new(AtomicUsize::new(0));
    let counting = read.clone();
    let reader = tokio::spawn(async move {
        while counting.load(Relaxed) < REWINDS * 100 {
            if let server_frame::Kind::Deliver(d) = c.recv().await {
                counting.fetch_add(d.messages.len(), Relaxed);
            }
        }
        c
    });
    let served = witness.messages(1).await;
    let read_by_then = read.load(Relaxed);
    assert_eq!(number_of_text(&served[0]), "served");
    assert!(
        read_by_then >= REWINDS * 100 / 2,
        "the publish was served when the client had read {read_by_then} of {} rewound messages",
        REWINDS * 100
    );
    let _c = reader.await.unwrap();
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn number_of_text(m: &client::Message) -> &str {
    match &m.data {
        Some(message::Data::Text(t)) => t,
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// History reads hold their share of `limits.history_read_bytes` until their page is
/// written: beyond it a read is refused (`RATE_LIMITED`), and once the page went out the
/// next read is served.
#[tokio::test]
async fn history_reads_share_a_memory_budget() {
    let dir = data_dir("budget");
    let n = node(&dir, |cfg| {
        // One WebSocket read holds 2 × 128 KiB: a budget of 384 KiB fits one at a time.
        cfg.limits.history_page_bytes = 128 * 1024;
        cfg.resume.page_bytes = 128 * 1024;
        cfg.limits.history_read_bytes = 384 * 1024;
    })
    .await;
    let mut publisher = Client::connect(&n, Format::Protobuf).await;
    publisher.publish_all("log:budget", (1..=10).map(|i| big_text(i, BIG))).await;
    let mut c = Client::connect(&n, Format::Protobuf).await;
    let history = |id: u32| {
        codec::encode_client(
            client_frame::Kind::History(HistoryRequest {
                request_id: id,
                channel: "log:budget".into(),
                limit: 10,
                ..Default::default()
            }),
            Format::Protobuf,
        )
    };
    // Both in one write: the second arrives while the first holds the budget.
    c.ws.feed(WsMessage::Binary(history(1))).await.unwrap();
    c.ws.feed(WsMessage::Binary(history(2))).await.unwrap();
    c.ws.flush().await.unwrap();
    let (mut page, mut refused) = (None, None);
    while page.is_none() || refused.is_none() {
        match c.recv().await {
            server_frame::Kind::History(p) => page = Some(p),
            server_frame::Kind::Error(e) => refused = Some(e),
            other => panic!("expected a page and a refusal, got {other:?}"),
        }
    }
    let (page, refused) = (page.unwrap(), refused.unwrap());
    assert_eq!(page.request_id, 1);
    assert_eq!(page.messages.len(), 2, "128 KiB pages hold two 60 KB messages");
    assert_eq!(refused.request_id, 2);
    assert_eq!(refused.code, client::ErrorCode::RateLimited as i32, "{refused:?}");
    // The page went out: the budget is back.
    c.send(client_frame::Kind::History(HistoryRequest {
        request_id: 3,
        channel: "log:budget".into(),
        limit: 10,
        ..Default::default()
    }))
    .await;
    match c.recv().await {
        server_frame::Kind::History(p) => assert_eq!(p.request_id, 3),
        other => panic!("expected page 3, got {other:?}"),
    }
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// An HTTP history answer holds its share of `limits.history_read_bytes` until the client
/// has taken it; a client that stops reading is let go after `timeouts.http_write`, and
/// the share comes back.
#[tokio::test]
async fn an_http_reader_that_stops_reading_gives_its_budget_back() {
    let dir = data_dir("http-stall");
    let n = node(&dir, |cfg| {
        // Pages of 16 MiB, more than the socket buffers between the node and a client
        // hold (Linux: at most 4 MiB sending), and one HTTP read (3 × 16 MiB) at a time.
        cfg.limits.history_page_bytes = 16 << 20;
        cfg.limits.history_read_bytes = 48 << 20;
        cfg.timeouts.http_write = Duration::from_secs(3);
    })
    .await;
    let mut publisher = Client::connect(&n, Format::Protobuf).await;
    publisher.publish_all("log:held", (1..=300).map(|i| big_text(i, BIG))).await;
    let path = "/v1/channels/log:held/messages?limit=1000";

    // Asks for a page through a small receive window, and reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut staller = socket.connect(n.addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut staller, request.as_bytes()).await.unwrap();
    // Its answer has begun: it holds its share of the budget (and reads no more).
    let mut head = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut staller, &mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    // While its answer waits, other reads are refused; once the node let it go, they are
    // served.
    let read = || async {
        let (status, headers, body) = common::http_full(n.addr, "GET", path, "", "", b"").await;
        if status == 503 {
            assert!(headers.iter().any(|(k, v)| k == "retry-after" && v == "1"), "{headers:?}");
        }
        (status, body.len())
    };
    assert_eq!(read().await.0, 503, "the answer nobody reads holds its share of the budget");
    let deadline = tokio::time::Instant::now() + WAIT;
    let served = loop {
        let (status, len) = read().await;
        if status == 200 {
            break len;
        }
        assert!(tokio::time::Instant::now() < deadline, "served again once the staller is let go");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(served > 16_000_000, "a whole page: {served} bytes");

    // The staller's connection was closed before its answer was complete.
    let mut got = Vec::new();
    let _ =
        tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(&mut staller, &mut got))
            .await
            .expect("the node closed the connection");
    assert!(got.len() + head.len() < served, "cut off: {} bytes", got.len());
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `timeouts.http_write` is for HTTP answers: a WebSocket whose replay waits longer than
/// that for the client to read is not cut (replays are paced by the client's reads).
#[tokio::test]
async fn a_websocket_that_pauses_longer_than_http_write_is_not_cut() {
    let dir = data_dir("ws-pause");
    let n = node(&dir, |cfg| cfg.timeouts.http_write = Duration::from_millis(500)).await;
    let mut publisher = Client::connect(&n, Format::Protobuf).await;
    let mut c = Client::connect(&n, Format::Protobuf).await;
    let s = c.subscribe(1, "log:pause").await;
    drop(c);
    // 12 MB: more than the socket buffers between the node and a client that reads nothing.
    publisher.publish_all("log:pause", (1..=200).map(|i| big_text(i, BIG))).await;
    let mut c = Client::connect(&n, Format::Protobuf).await;
    c.send_resume(2, "log:pause", s).await;
    // The replay fills the buffers, then waits for the client well past `http_write`.
    tokio::time::sleep(Duration::from_secs(2)).await;
    match c.recv().await {
        server_frame::Kind::Subscribed(_) => {}
        other => panic!("expected subscribed, got {other:?}"),
    }
    let got: Vec<usize> = c.messages(200).await.iter().map(number_of).collect();
    assert_eq!(got, (1..=200).collect::<Vec<_>>());
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
