//! Per-connection outboxes: the bounded queue between channels and a session's writer.
//!
//! A publish pushes one `Arc<EncodedMessage>` into the outbox of every subscriber; the
//! message's bytes are encoded at most once per wire format and shared. The session drains
//! its whole outbox in one step and packs the messages into few frames, so a busy
//! subscriber costs one WebSocket frame (one write) for many messages. The queue is a
//! mutex-guarded deque, and the session is woken only when it goes from empty to
//! non-empty: under load a publish costs each subscriber one short lock, not a wake-up.
//!
//! Overflow policy: an outbox holds at most `limits.send_queue_messages` items and
//! `limits.send_queue_bytes` payload bytes. A push that would exceed either marks the
//! outbox overflowed; the channel drops that subscriber, and the session closes the
//! connection with 4001 (slow consumer). Publishers and other subscribers never wait for a
//! slow reader, and memory stays bounded. The client resumes and picks up the rest from the
//! channel log (see `crate::resume`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
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
}

impl Outgoing {
    /// Bytes this item is charged against `send_queue_bytes`.
    pub fn cost(&self) -> usize {
        const OVERHEAD: usize = 128;
        match self {
            Self::Message(m) => {
                let msg = m.message();
                let data = match &msg.data {
                    Some(tern_proto::client::message::Data::Text(t)) => t.len(),
                    Some(tern_proto::client::message::Data::Binary(b)) => b.len(),
                    None => 0,
                };
                OVERHEAD + data + msg.name.len() + msg.id.len() + msg.channel.len()
            }
            Self::Frame(_) => OVERHEAD,
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Outgoing>,
    bytes: usize,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when the queue goes from empty to non-empty.
    notify: Notify,
    max_items: usize,
    max_bytes: usize,
    overflowed: AtomicBool,
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
        stop,
    });
    (Outbox { shared: shared.clone() }, OutboxReceiver { shared })
}

impl Outbox {
    /// Queues an item without waiting. Returns false when the outbox overflowed (now or
    /// before): the connection is being closed as a slow consumer and should be dropped.
    pub fn push(&self, item: Outgoing) -> bool {
        let shared = &*self.shared;
        if shared.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        let cost = item.cost();
        let mut q = shared.lock();
        if q.items.len() >= shared.max_items || q.bytes + cost > shared.max_bytes {
            drop(q);
            shared.overflowed.store(true, Ordering::Relaxed);
            shared.stop.cancel();
            return false;
        }
        let was_empty = q.items.is_empty();
        q.items.push_back(item);
        q.bytes += cost;
        drop(q);
        if was_empty {
            shared.notify.notify_one();
        }
        true
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

    /// Moves everything queued into `into` (expected empty) in one step.
    pub fn drain(&mut self, into: &mut VecDeque<Outgoing>) {
        let mut q = self.shared.lock();
        std::mem::swap(&mut q.items, into);
        q.bytes = 0;
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
