//! Backbone frames between two nodes.

use bytes::Bytes;
use tern_proto::types::{ChannelName, Epoch, NodeId, Seq};

/// What a receiver holds of one origin channel: used in `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Have {
    /// The channel.
    pub channel: ChannelName,
    /// The origin epoch the position belongs to.
    pub epoch: Epoch,
    /// Everything up to and including this sequence was delivered.
    pub delivered: Seq,
}

/// A frame on a peer link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Sent when a link comes up: the sender's epoch, and what it holds of the recipient's
    /// channels, so the recipient resends the rest.
    Hello {
        /// The sender's current epoch.
        epoch: Epoch,
        /// Positions the sender holds of the recipient's own channels.
        have: Vec<Have>,
    },
    /// Sent on every link now and then: the sender's epoch, so a peer learns of a restart
    /// without its log even when no message of the new epoch reaches it.
    Heartbeat {
        /// The sender's current epoch.
        epoch: Epoch,
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
}
