//! Subscriptions: a stream of events for one channel.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use tern_proto::client::Message;
use tokio::sync::mpsc;

use crate::driver::Command;

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq)]
// Nearly every event is a message: boxing it would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// A message, in the channel's delivery order.
    Message(Message),
    /// Messages were missed and cannot be replayed (away longer than the resume window,
    /// past the log's retention, or a channel without history). Fetch history or
    /// resynchronise if the application needs every message.
    Discontinuity {
        /// Why.
        reason: String,
    },
}

/// A live subscription. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    pub(crate) channel: String,
    pub(crate) id: u64,
    pub(crate) rx: mpsc::Receiver<Event>,
    pub(crate) cmd: mpsc::Sender<Command>,
}

impl Subscription {
    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }
}

impl Stream for Subscription {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Best effort; if the queue is full, the driver notices the closed stream on the
        // next delivery and unsubscribes then.
        let _ = self
            .cmd
            .try_send(Command::Drop { channel: std::mem::take(&mut self.channel), id: self.id });
    }
}
