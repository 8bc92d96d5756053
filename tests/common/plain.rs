//! A protocol-level client written from docs/protocol.md alone: raw JSON text frames over a
//! WebSocket, no SDK. It keeps positions exactly as the docs say — per channel, the node
//! that delivered its last message and that message's `position`, and the per-origin vector
//! from `subscribed.origins`, updated by every message — resumes with them, sends each
//! publish with `after` (its last ack's origin position on the channel), and records every
//! message it is given, verbatim. It drops nothing: a repeat or a reorder the node lets
//! through shows up in what it recorded. (The delivery contract is the node's, not the
//! SDK's: see DESIGN.md.)

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Where a client is on one channel, as the docs say to keep it.
#[derive(Debug, Clone, Default)]
pub struct ChannelPos {
    /// The node that delivered the last message (or confirmed the subscription).
    pub node: String,
    /// That message's `position` (JSON, as received).
    pub position: Option<Value>,
    /// Per origin, the last `{origin, epoch, seq}` received.
    pub vector: Vec<Value>,
}

impl ChannelPos {
    /// The `resume` object of a `subscribe`.
    pub fn resume(&self) -> Value {
        let mut r = json!({"node": self.node, "origins": self.vector});
        if let Some(p) = &self.position {
            r["position"] = p.clone();
        }
        r
    }
}

/// A message as recorded: its text, id and origin identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    pub channel: String,
    pub text: String,
    pub id: String,
    pub origin: String,
    pub epoch: u64,
    pub seq: u64,
    /// The node that delivered it (empty when read from a log).
    pub node: String,
    /// Its `after`, if it carries one (`origin@epoch:seq`).
    pub after: String,
}

fn after_of(m: &Value) -> String {
    m.get("after").map_or(String::new(), |a| {
        format!(
            "{}@{}:{}",
            a["origin"].as_str().unwrap_or(""),
            u64_of(&a["epoch"]),
            u64_of(&a["seq"])
        )
    })
}

/// The state a plain client keeps across connections.
#[derive(Debug, Default)]
pub struct PlainState {
    pub channels: HashMap<String, ChannelPos>,
    /// Per channel, the last ack's `{origin, epoch, seq}`: sent as `after`.
    pub acked: HashMap<String, Value>,
    /// Every message received, in order, across connections.
    pub got: Vec<Got>,
    /// Every `discontinuity` frame received.
    pub discontinuities: Vec<Value>,
}

/// One connection of a plain client.
pub struct Plain {
    ws: Socket,
    /// The node this connection is to (from `connected`).
    pub node: String,
    next_request: u32,
}

/// A 64-bit integer of the JSON mapping: a string (absent when 0).
pub fn u64_of(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

/// What a failed step saw.
#[derive(Debug)]
pub enum PlainError {
    /// The connection ended or failed.
    Closed(String),
    /// No answer in time.
    Timeout,
}

impl Plain {
    /// Connects to `base` (`ws://host:port`) and sends `connect`.
    pub async fn connect(base: &str) -> Result<Self, PlainError> {
        let url = format!("{base}/v1/ws");
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await
        .map_err(|_| PlainError::Timeout)?
        .map_err(|e| PlainError::Closed(e.to_string()))?;
        let mut c = Self { ws, node: String::new(), next_request: 0 };
        c.send(json!({"connect": {"protocol": 1, "agent": "plain-test/1"}})).await?;
        let mut ignored = PlainState::default();
        loop {
            let f = c.frame(&mut ignored, Duration::from_secs(5)).await?;
            if let Some(connected) = f.get("connected") {
                c.node = connected["node"].as_str().unwrap_or_default().to_owned();
                return Ok(c);
            }
        }
    }

    async fn send(&mut self, frame: Value) -> Result<(), PlainError> {
        self.ws
            .send(Ws::text(frame.to_string()))
            .await
            .map_err(|e| PlainError::Closed(e.to_string()))
    }

    fn request_id(&mut self) -> u32 {
        self.next_request += 1;
        self.next_request
    }

    /// Reads the next frame, recording deliveries, positions and discontinuities in `st`.
    pub async fn frame(
        &mut self,
        st: &mut PlainState,
        wait: Duration,
    ) -> Result<Value, PlainError> {
        loop {
            let msg = tokio::time::timeout(wait, self.ws.next())
                .await
                .map_err(|_| PlainError::Timeout)?;
            let text = match msg {
                Some(Ok(Ws::Text(t))) => t.to_string(),
                Some(Ok(Ws::Close(f))) => return Err(PlainError::Closed(format!("{f:?}"))),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(PlainError::Closed(e.to_string())),
                None => return Err(PlainError::Closed("end of stream".into())),
            };
            let f: Value = serde_json::from_str(&text).expect("the node sends JSON");
            self.note(st, &f);
            return Ok(f);
        }
    }

    /// Applies a frame to the positions, as the docs say.
    fn note(&self, st: &mut PlainState, f: &Value) {
        if let Some(messages) = f.pointer("/deliver/messages").and_then(Value::as_array) {
            for m in messages {
                let channel = m["channel"].as_str().unwrap_or_default().to_owned();
                let origin = m["origin"].as_str().unwrap_or_default().to_owned();
                let (epoch, seq) = (u64_of(&m["originEpoch"]), u64_of(&m["originSeq"]));
                st.got.push(Got {
                    channel: channel.clone(),
                    text: m["text"].as_str().unwrap_or_default().to_owned(),
                    id: m["id"].as_str().unwrap_or_default().to_owned(),
                    origin: origin.clone(),
                    epoch,
                    seq,
                    node: self.node.clone(),
                    after: after_of(m),
                });
                let pos = st.channels.entry(channel).or_default();
                pos.node.clone_from(&self.node);
                pos.position = m.get("position").cloned();
                let entry =
                    json!({"origin": origin, "epoch": epoch.to_string(), "seq": seq.to_string()});
                match pos.vector.iter_mut().find(|v| v["origin"] == m["origin"]) {
                    Some(v) => *v = entry,
                    None => pos.vector.push(entry),
                }
            }
        } else if let Some(s) = f.get("subscribed") {
            if s.get("resumed").and_then(Value::as_bool) != Some(true) {
                let channel = s["channel"].as_str().unwrap_or_default().to_owned();
                let pos = st.channels.entry(channel).or_default();
                pos.node.clone_from(&self.node);
                pos.position = s.get("position").cloned();
                pos.vector =
                    s.get("origins").and_then(Value::as_array).cloned().unwrap_or_default();
            }
        } else if let Some(d) = f.get("discontinuity") {
            st.discontinuities.push(d.clone());
        }
    }

    /// Subscribes to `channel` — resuming where `st` says it left off, if it was
    /// subscribed before — and waits for `subscribed` (or `error`).
    pub async fn subscribe(
        &mut self,
        st: &mut PlainState,
        channel: &str,
    ) -> Result<Value, PlainError> {
        let request_id = self.request_id();
        let mut sub = json!({"requestId": request_id, "channel": channel});
        if let Some(pos) = st.channels.get(channel) {
            sub["resume"] = pos.resume();
        }
        self.send(json!({ "subscribe": sub })).await?;
        self.answer(st, request_id, &["subscribed", "error"]).await
    }

    /// Publishes `text` with id `id` on `channel` (with `after` from the last ack there)
    /// and waits for its `ack` or `nack`.
    pub async fn publish(
        &mut self,
        st: &mut PlainState,
        channel: &str,
        id: &str,
        text: &str,
    ) -> Result<Value, PlainError> {
        let request_id = self.request_id();
        let mut p = json!({"requestId": request_id, "channel": channel, "id": id, "text": text});
        if let Some(after) = st.acked.get(channel) {
            p["after"] = after.clone();
        }
        self.send(json!({ "publish": p })).await?;
        let f = self.answer(st, request_id, &["ack", "nack"]).await?;
        if let Some(a) = f.get("ack") {
            if a.get("origin").and_then(Value::as_str).is_some_and(|o| !o.is_empty()) {
                let after = json!({"origin": a["origin"], "epoch": a["originEpoch"], "seq": a["originSeq"]});
                st.acked.insert(channel.to_owned(), after);
            }
        }
        Ok(f)
    }

    /// Reads frames until the answer to `request_id` (one of `kinds`).
    async fn answer(
        &mut self,
        st: &mut PlainState,
        request_id: u32,
        kinds: &[&str],
    ) -> Result<Value, PlainError> {
        loop {
            let f = self.frame(st, Duration::from_secs(30)).await?;
            for k in kinds {
                if let Some(body) = f.get(*k) {
                    if body.get("requestId").and_then(Value::as_u64) == Some(u64::from(request_id))
                    {
                        return Ok(f);
                    }
                }
            }
        }
    }

    /// Sends a `heartbeat` (the node answers it).
    pub async fn heartbeat(&mut self) -> Result<(), PlainError> {
        self.send(json!({"heartbeat": {"nonce": "1"}})).await
    }
}

/// Every message of `channel` in a node's log, oldest first, through the HTTP history API
/// (paged, as documented).
pub async fn log_of(base_http: &str, channel: &str) -> Vec<Got> {
    let mut out = Vec::new();
    let mut from: Option<u64> = None;
    loop {
        let mut url =
            format!("{base_http}/v1/channels/{channel}/messages?direction=forwards&limit=1000");
        if let Some(f) = from {
            url += &format!("&from={f}");
        }
        let body = http_get(&url).await;
        let v: Value = serde_json::from_str(&body).expect("history JSON");
        for m in v["messages"].as_array().cloned().unwrap_or_default() {
            out.push(Got {
                channel: channel.to_owned(),
                text: m["text"].as_str().unwrap_or_default().to_owned(),
                id: m["id"].as_str().unwrap_or_default().to_owned(),
                origin: m["origin"].as_str().unwrap_or_default().to_owned(),
                epoch: u64_of(&m["originEpoch"]),
                seq: u64_of(&m["originSeq"]),
                node: String::new(),
                after: after_of(&m),
            });
        }
        match v["next"].get("from").and_then(Value::as_str).and_then(|f| f.parse().ok()) {
            Some(f) => from = Some(f),
            None => return out,
        }
    }
}

/// A plain HTTP/1.1 GET; the body.
pub async fn http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) =
        rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut s = TcpStream::connect(host).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return dechunk(body);
    }
    body.to_owned()
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = body.split_once("\r\n") else { return out };
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
}
