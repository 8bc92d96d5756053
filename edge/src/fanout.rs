//! Per-connection outboxes: the bounded queue between channels and a session's writer.
//!
//! A publish pushes one `Arc<EncodedMessage>` into the outbox of every subscriber; the
//! message's bytes are encoded at most once per wire format and shared. The session drains
//! its outbox in batches, so a busy subscriber costs one WebSocket frame (one write) for
//! many messages.
//!
//! Overflow policy: an outbox holds at most `limits.send_queue_messages` items and
//! `limits.send_queue_bytes` payload bytes. A push that would exceed either marks the
//! outbox overflowed; the channel drops that subscriber, and the session closes the
//! connection with 4001 (slow consumer). Publishers and other subscribers never wait for a
//! slow reader, and memory stays bounded. (Once resume lands, the client picks up the rest
//! from the channel log.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tern_proto::client::server_frame;
use tern_proto::codec::EncodedMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// An item queued for a session's writer.
#[derive(Debug)]
pub enum Outgoing {
    /// A message to deliver.
    Message(Arc<EncodedMessage>),
    /// A control frame that must stay in order with deliveries (e.g. `Unsubscribed`).
    Frame(server_frame::Kind),
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

#[derive(Debug)]
struct Shared {
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    overflow: CancellationToken,
}

/// The sending half, held by every channel the connection is subscribed to.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
}

/// The receiving half, owned by the session.
#[derive(Debug)]
pub struct OutboxReceiver {
    rx: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
}

/// Creates an outbox bounded by `max_items` and `max_bytes`.
pub fn outbox(max_items: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = mpsc::channel(max_items);
    let shared = Arc::new(Shared {
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        overflow: CancellationToken::new(),
    });
    (Outbox { tx, shared: shared.clone() }, OutboxReceiver { rx, shared })
}

impl Outbox {
    /// Queues an item without waiting. Returns false when the outbox overflowed (now or
    /// before): the connection is being closed as a slow consumer and should be dropped.
    pub fn push(&self, item: Outgoing) -> bool {
        if self.shared.overflow.is_cancelled() {
            return false;
        }
        let cost = item.cost();
        let queued = self.shared.queued_bytes.fetch_add(cost, Ordering::Relaxed) + cost;
        if queued > self.shared.max_bytes || self.tx.try_send(item).is_err() {
            self.shared.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
            self.shared.overflow.cancel();
            return false;
        }
        true
    }
}

impl OutboxReceiver {
    /// Waits for the next item.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        let item = self.rx.recv().await?;
        self.release(&item);
        Some(item)
    }

    /// Takes the next item if one is queued.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        let item = self.rx.try_recv().ok()?;
        self.release(&item);
        Some(item)
    }

    fn release(&self, item: &Outgoing) {
        self.shared.queued_bytes.fetch_sub(item.cost(), Ordering::Relaxed);
    }

    /// A token cancelled when the outbox overflows.
    pub fn overflow(&self) -> CancellationToken {
        self.shared.overflow.clone()
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
        let (tx, mut rx) = outbox(2, 1 << 20);
        assert!(tx.push(msg(1)));
        assert!(tx.push(msg(1)));
        assert!(!tx.push(msg(1)), "third item overflows a 2-item outbox");
        rx.overflow().cancelled().await;
        assert!(rx.try_recv().is_some());
        assert!(!tx.push(msg(1)), "an overflowed outbox stays closed");

        let (tx, mut rx) = outbox(100, 1000);
        assert!(tx.push(msg(500)));
        assert!(!tx.push(msg(500)), "1000 bytes + overhead overflow a 1000-byte outbox");
        assert!(rx.recv().await.is_some());
    }
}
