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

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::client::Message;

    fn msg(origin: &str, epoch: u64, seq: u64) -> Arc<EncodedMessage> {
        Arc::new(EncodedMessage::new(Message {
            origin: origin.into(),
            origin_epoch: epoch,
            origin_seq: seq,
            ..Message::default()
        }))
    }

    fn pos(origin: &str, epoch: u64, seq: u64) -> OriginPosition {
        OriginPosition { origin: origin.into(), epoch, seq }
    }

    /// A client ahead of this node for origin `a` (it had a's messages up to 5 from another
    /// node) gets a's messages only from 6 on, as this node catches up; other origins, and
    /// a newer epoch of `a`, pass.
    #[test]
    fn a_resumed_member_skips_what_its_client_had() {
        let (tx, mut rx) =
            crate::fanout::outbox(64, 1 << 20, tokio_util::sync::CancellationToken::new());
        let client = [pos("a", 1, 5), pos("b", 1, 2)];
        let here = [pos("a", 1, 3), pos("b", 1, 9)];
        let mut m = Member::resumed(tx, &client, &here);
        assert_eq!(m.floor, [pos("a", 1, 5)], "only where the client is ahead");
        for (o, e, s) in [("a", 1, 4), ("b", 1, 10), ("a", 1, 5), ("a", 1, 6), ("a", 1, 7)] {
            assert!(m.offer(&msg(o, e, s)));
        }
        assert!(m.floor.is_empty(), "the stream passed the client's position");
        let mut got = std::collections::VecDeque::new();
        rx.drain(&mut got);
        let seqs: Vec<(String, u64)> = got
            .iter()
            .map(|o| match o {
                Outgoing::Message(m) => (m.message().origin.clone(), m.message().origin_seq),
                other => panic!("only messages were queued, got {other:?}"),
            })
            .collect();
        assert_eq!(seqs, [("b".into(), 10), ("a".into(), 6), ("a".into(), 7)]);
    }
}
