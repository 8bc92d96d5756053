//! Per-connection outboxes: the bounded queue between channels and a session's writer.
//!
//! A publish pushes one `Arc<EncodedMessage>` into the outbox of every subscriber; the
//! message's bytes are encoded at most once per wire format and shared. The session drains
//! its whole outbox in one step and packs the messages into few frames, so a busy
//! subscriber costs one WebSocket frame (one write) for many messages. The queue is a
//! mutex-guarded deque, and the session is woken only when it goes from empty to
//! non-empty: under load a publish costs each subscriber one short lock, not a wake-up.
//!
//! Overflow policy: an outbox holds at most `limits.send_queue_messages` live items and
//! `limits.send_queue_bytes` payload bytes of them. A push that would exceed either marks
//! the outbox overflowed; the channel drops that subscriber, and the session closes the
//! connection with 4001 (slow consumer). Publishers and other subscribers never wait for a
//! slow reader, and memory stays bounded. The client resumes and picks up the rest from the
//! channel log (see `crate::resume`).
//!
//! Replays the client asked for (a rewind, a resume's replay, a history page) are queued in
//! the same order but outside those limits ([`Outbox::push_replay`]): each is bounded where
//! it is made, and the session writes it as fast as the client reads, taking more from the
//! outbox only once it wrote what it took. So a client that reads always gets a replay of
//! any size, and one that does not is cut off by the session's write stall (the idle
//! timeout) or by its live traffic overflowing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tern_proto::client::server_frame;
use tern_proto::codec::EncodedMessage;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// An item queued for a session's writer.
#[derive(Debug)]
pub enum Outgoing {
    /// A message to deliver.
    Message(Arc<EncodedMessage>),
    /// A control frame that must stay in order with deliveries (e.g. `Unsubscribed`).
    /// Boxed: queue slots stay two words wide, so pushing and popping deliveries is cheap.
    Frame(Box<server_frame::Kind>),
    /// A frame already encoded in the connection's wire format (a session's reply that
    /// must stay behind what is queued).
    Encoded(bytes::Bytes),
    /// A frame that holds a resource until it is written or dropped (a history page holds
    /// its connection's read slot).
    Held(Box<(server_frame::Kind, Held)>),
    /// A frame many connections get (presence events, snapshot pages), encoded at most
    /// once per wire format.
    Shared(Arc<SharedFrame>),
}

/// A server frame shared by many connections, encoded once per format on first use.
#[derive(Debug)]
pub struct SharedFrame {
    kind: server_frame::Kind,
    /// Its protobuf size: what it costs in a send queue.
    len: usize,
    json: std::sync::OnceLock<bytes::Bytes>,
    protobuf: std::sync::OnceLock<bytes::Bytes>,
}

impl SharedFrame {
    /// `kind`, to be shared.
    pub fn new(kind: server_frame::Kind) -> Arc<Self> {
        let frame = tern_proto::client::ServerFrame { kind: Some(kind) };
        let len = prost::Message::encoded_len(&frame);
        let kind = frame.kind.unwrap_or(server_frame::Kind::Heartbeat(Default::default()));
        Arc::new(Self {
            kind,
            len,
            json: std::sync::OnceLock::new(),
            protobuf: std::sync::OnceLock::new(),
        })
    }

    /// The frame in `format`.
    pub fn encoded(&self, format: tern_proto::codec::Format) -> bytes::Bytes {
        let cell = match format {
            tern_proto::codec::Format::Json => &self.json,
            tern_proto::codec::Format::Protobuf => &self.protobuf,
        };
        cell.get_or_init(|| tern_proto::codec::encode_server(self.kind.clone(), format)).clone()
    }
}

/// Whatever an [`Outgoing::Held`] frame keeps until it leaves: dropped with the frame.
pub struct Held(pub Box<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Held")
    }
}

/// The bytes of `m`'s payload and the fields that grow with it.
fn message_bytes(m: &tern_proto::client::Message) -> usize {
    let data = match &m.data {
        Some(tern_proto::client::message::Data::Text(t)) => t.len(),
        Some(tern_proto::client::message::Data::Binary(b)) => b.len(),
        None => 0,
    };
    data + m.name.len() + m.id.len() + m.channel.len()
}

impl Outgoing {
    /// Bytes this item is charged against `send_queue_bytes`.
    pub fn cost(&self) -> usize {
        const OVERHEAD: usize = 128;
        match self {
            Self::Message(m) => OVERHEAD + message_bytes(m.message()),
            Self::Frame(_) => OVERHEAD,
            Self::Encoded(b) => OVERHEAD + b.len(),
            Self::Shared(f) => OVERHEAD + f.len,
            Self::Held(h) => {
                OVERHEAD
                    + match &h.0 {
                        server_frame::Kind::History(page) => {
                            page.messages.iter().map(|m| OVERHEAD + message_bytes(m)).sum()
                        }
                        _ => 0,
                    }
            }
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Outgoing>,
    /// Bytes of the counted items (not replays).
    bytes: usize,
    /// Items queued as replays (not counted against `max_items`).
    replayed: usize,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when the queue goes from empty to non-empty.
    notify: Notify,
    max_items: usize,
    max_bytes: usize,
    overflowed: AtomicBool,
    /// The cost of the replay items queued: read without the lock on every session turn.
    replay_bytes: AtomicUsize,
    /// The session's stop token, cancelled on overflow.
    stop: CancellationToken,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // The critical sections cannot panic half-way; a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending half, held by every channel the connection is subscribed to.
#[derive(Debug, Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The receiving half, owned by the session.
#[derive(Debug)]
pub struct OutboxReceiver {
    shared: Arc<Shared>,
}

/// Creates an outbox bounded by `max_items` and `max_bytes`. On overflow it cancels `stop`
/// (the session's token) after marking itself overflowed.
pub fn outbox(
    max_items: usize,
    max_bytes: usize,
    stop: CancellationToken,
) -> (Outbox, OutboxReceiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        notify: Notify::new(),
        max_items,
        max_bytes,
        overflowed: AtomicBool::new(false),
        replay_bytes: AtomicUsize::new(0),
        stop,
    });
    (Outbox { shared: shared.clone() }, OutboxReceiver { shared })
}

impl Outbox {
    /// Queues an item without waiting. Returns false when the outbox overflowed (now or
    /// before): the connection is being closed as a slow consumer and should be dropped.
    pub fn push(&self, item: Outgoing) -> bool {
        self.push_as(item, true)
    }

    /// Queues an item of a replay the connection asked for (a rewind, a resume, a history
    /// page), in order with everything else but outside the queue's limits: a replay is
    /// bounded where it is made (at most [`crate::channel::REWIND_MAX`] messages of the
    /// channel's in-memory tail, a history page within the frame limit), and the session
    /// writes it as fast as the client reads. Returns false when the outbox overflowed.
    pub fn push_replay(&self, item: Outgoing) -> bool {
        self.push_as(item, false)
    }

    fn push_as(&self, item: Outgoing, counted: bool) -> bool {
        let shared = &*self.shared;
        if shared.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        let cost = item.cost();
        let mut q = shared.lock();
        if counted
            && (q.items.len() >= q.replayed + shared.max_items || q.bytes + cost > shared.max_bytes)
        {
            drop(q);
            shared.overflowed.store(true, Ordering::Relaxed);
            shared.stop.cancel();
            return false;
        }
        let was_empty = q.items.is_empty();
        q.items.push_back(item);
        if counted {
            q.bytes += cost;
        } else {
            q.replayed += 1;
            shared.replay_bytes.fetch_add(cost, Ordering::Relaxed);
        }
        drop(q);
        if was_empty {
            shared.notify.notify_one();
        }
        true
    }

    /// Whether nothing is queued (a reply written now would not overtake anything queued).
    pub fn is_empty(&self) -> bool {
        self.shared.lock().items.is_empty()
    }

    /// The cost of the replay items queued (see [`Outbox::push_replay`]).
    pub fn replay_bytes(&self) -> usize {
        self.shared.replay_bytes.load(Ordering::Relaxed)
    }
}

impl OutboxReceiver {
    /// Resolves once something is queued.
    pub async fn ready(&self) {
        loop {
            // A push between this check and the wait leaves a permit in `notify`.
            if !self.shared.lock().items.is_empty() {
                return;
            }
            self.shared.notify.notified().await;
        }
    }

    /// Moves everything queued to the end of `into` in one step; returns its
    /// [`Outgoing::cost`].
    pub fn drain(&mut self, into: &mut VecDeque<Outgoing>) -> usize {
        let mut q = self.shared.lock();
        if into.is_empty() {
            std::mem::swap(&mut q.items, into);
        } else {
            into.append(&mut q.items);
        }
        q.replayed = 0;
        // Replays' cost moves under the lock, as it grows.
        let replays = self.shared.replay_bytes.swap(0, Ordering::Relaxed);
        std::mem::take(&mut q.bytes) + replays
    }

    /// Whether the outbox overflowed.
    pub fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::client::{Message, message};

    fn msg(len: usize) -> Outgoing {
        Outgoing::Message(Arc::new(EncodedMessage::new(Message {
            data: Some(message::Data::Text("x".repeat(len))),
            ..Default::default()
        })))
    }

    #[tokio::test]
    async fn overflow_by_count_and_by_bytes() {
        let stop = CancellationToken::new();
        let (tx, mut rx) = outbox(2, 1 << 20, stop.clone());
        assert!(tx.push(msg(1)));
        assert!(tx.push(msg(1)));
        assert!(!stop.is_cancelled() && !rx.overflowed());
        assert!(!tx.push(msg(1)), "third item overflows a 2-item outbox");
        assert!(stop.is_cancelled() && rx.overflowed());
        let mut got = VecDeque::new();
        rx.ready().await;
        rx.drain(&mut got);
        assert_eq!(got.len(), 2);
        assert!(!tx.push(msg(1)), "an overflowed outbox stays closed");

        let (tx, mut rx) = outbox(100, 1000, CancellationToken::new());
        assert!(tx.push(msg(500)));
        assert!(!tx.push(msg(500)), "1000 bytes + overhead overflow a 1000-byte outbox");
        let mut got = VecDeque::new();
        rx.drain(&mut got);
        assert_eq!(got.len(), 1);
    }
}
