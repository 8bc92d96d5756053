//! A channel's local subscribers, and the one hot loop that fans a message out to them.

use std::collections::HashMap;
use std::sync::Arc;

use tern_proto::client::OriginPosition;
use tern_proto::codec::EncodedMessage;
use tern_proto::types::ConnectionId;

use crate::fanout::{Outbox, Outgoing};

/// A live subscriber.
#[derive(Debug)]
pub(super) struct Member {
    pub(super) outbox: Outbox,
    /// A resumed subscription whose client is ahead of this node for some origins (it had
    /// their messages from another node, and this one is still catching up with them):
    /// those origins' messages up to the client's position are not delivered again. An
    /// entry leaves once the origin's stream here passed it; empty for everyone else (no
    /// allocation), so the hot loop pays one branch.
    floor: Vec<OriginPosition>,
}

impl Member {
    pub(super) fn new(outbox: Outbox) -> Self {
        Self { outbox, floor: Vec::new() }
    }

    /// A member resuming with the client's vector `client`, on a channel whose vector here
    /// is `here`.
    pub(super) fn resumed(
        outbox: Outbox,
        client: &[OriginPosition],
        here: &[OriginPosition],
    ) -> Self {
        let ahead: Vec<OriginPosition> = client
            .iter()
            .filter(|c| {
                !here.iter().any(|h| h.origin == c.origin && (h.epoch, h.seq) >= (c.epoch, c.seq))
            })
            .cloned()
            .collect();
        Self { outbox, floor: ahead }
    }

    /// Queues `m`, unless the client had it already. False when the outbox overflowed: the
    /// member is dropped and its session closes as a slow consumer.
    pub(super) fn offer(&mut self, m: &Arc<EncodedMessage>) -> bool {
        if !self.floor.is_empty() {
            let msg = m.message();
            if let Some(i) = self.floor.iter().position(|p| p.origin == msg.origin) {
                if self.floor[i].covers(msg) {
                    return true;
                }
                // The origin's stream passed the client's position.
                self.floor.swap_remove(i);
                if self.floor.is_empty() {
                    self.floor = Vec::new();
                }
            }
        }
        self.outbox.push(Outgoing::Message(m.clone()))
    }
}

/// Queues `m` to every member; overflowed ones are dropped (their sessions close with 4001).
pub(super) fn fan_out(members: &mut HashMap<ConnectionId, Member>, m: &Arc<EncodedMessage>) {
    members.retain(|_, member| member.offer(m));
}
