//! Backbone frames between two nodes.

use bytes::Bytes;
use tern_proto::types::{ChannelName, Epoch, NodeId, Seq};

use super::presence::PresenceFrame;

/// What a receiver holds of one origin channel: used in `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Have {
    /// The channel.
    pub channel: ChannelName,
    /// The origin epoch the position belongs to.
    pub epoch: Epoch,
    /// Everything up to and including this sequence was delivered.
    pub delivered: Seq,
    /// The interest generation (0 for channels replicated to every node).
    pub generation: u64,
}

/// A channel a receiver wants from now on, with no position yet: used in `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// The channel.
    pub channel: ChannelName,
    /// The interest generation.
    pub generation: u64,
}

/// A frame on a peer link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Sent when a link comes up: the sender's epoch, and which of the recipient's channels
    /// it wants, so the recipient resends what follows its positions and starts the rest.
    /// Channels listed nowhere are not sent, except replicate-all namespaces.
    Hello {
        /// The sender's current epoch.
        epoch: Epoch,
        /// Positions the sender holds of the recipient's own channels.
        have: Vec<Have>,
        /// Channels the sender wants with no position yet.
        want: Vec<Want>,
    },
    /// The sender gains interest in the recipient's `channel` (or loses it, `withdraw`).
    /// `generation` grows with every interest the sender registers: a frame with an older `generation`
    /// than the recipient recorded for the channel is stale and ignored.
    Interest {
        /// The channel.
        channel: ChannelName,
        /// The interest generation.
        generation: u64,
        /// True to withdraw.
        withdraw: bool,
    },
    /// The reply to an interest: the recipient's stream of the sender's `channel` begins
    /// after `after` in `epoch`. Sent on the channel's lane, ahead of its data.
    Start {
        /// The channel.
        channel: ChannelName,
        /// The sender's epoch.
        epoch: Epoch,
        /// The stream begins after this sequence.
        after: Seq,
        /// The interest generation this answers.
        generation: u64,
    },
    /// Sent on every link now and then: the sender's epoch, so a peer learns of a restart
    /// without its log even when no message of the new epoch reaches it.
    Heartbeat {
        /// The sender's current epoch.
        epoch: Epoch,
        /// Whether the sender received the recipient's `Hello` since the link came up; if
        /// not, the recipient sends it again.
        greeted: bool,
        /// Whether the recipient acknowledged everything of the sender's it lacked at its
        /// `Hello`: it caught up with the sender (readiness after a restart).
        caught_up: bool,
    },
    /// One message. Keeps its origin identity wherever it travels.
    Data {
        /// The origin node.
        origin: NodeId,
        /// The origin's epoch.
        epoch: Epoch,
        /// The channel.
        channel: ChannelName,
        /// The origin sequence.
        seq: Seq,
        /// The encoded message.
        payload: Bytes,
    },
    /// Cumulative: the sender delivered the recipient's `channel` up to `seq` in `epoch`.
    Ack {
        /// The channel.
        channel: ChannelName,
        /// The recipient's epoch.
        epoch: Epoch,
        /// Delivered up to here.
        seq: Seq,
    },
    /// The sender is missing `from..=to` of the recipient's `channel`.
    Nack {
        /// The channel.
        channel: ChannelName,
        /// The recipient's epoch.
        epoch: Epoch,
        /// First missing sequence.
        from: Seq,
        /// Last missing sequence.
        to: Seq,
    },
    /// The origin's `epoch` of `channel` ended at `last` (after a restart with its log): a
    /// recipient that delivered up to `last` continues in `next` without a discontinuity
    /// (one behind asks for the rest first). `last: None`: the origin lost the rest of that
    /// epoch (restarted without its log); the recipient reports it and moves on to `next`.
    /// Sent on the channel's lane, ahead of the next epoch's data.
    End {
        /// The channel.
        channel: ChannelName,
        /// The epoch that ended.
        epoch: Epoch,
        /// Its last sequence, if the origin still knows it.
        last: Option<Seq>,
        /// The epoch that follows.
        next: Epoch,
    },
    /// Asks the recipient for the newest message of its own `channel` it sequenced (`Head`):
    /// a node about to sequence a publish from a client that moved from the recipient waits
    /// until it holds that message.
    HeadRequest {
        /// The channel.
        channel: ChannelName,
        /// Echoed in the answer.
        nonce: u64,
    },
    /// The answer to `HeadRequest`: the newest message of the sender's `channel` it
    /// sequenced, sent or not yet (`seq` 0: none).
    Head {
        /// The channel.
        channel: ChannelName,
        /// Its origin epoch.
        epoch: Epoch,
        /// Its sequence.
        seq: Seq,
        /// The request's nonce.
        nonce: u64,
    },
    /// The origin no longer holds anything up to `through` of `channel`: the recipient must
    /// skip it and report a discontinuity.
    Gone {
        /// The channel.
        channel: ChannelName,
        /// The origin's epoch.
        epoch: Epoch,
        /// Last sequence that is gone.
        through: Seq,
    },
    /// Presence: handled by [`Presence`](super::Presence), not by the replica.
    Presence(PresenceFrame),
}
