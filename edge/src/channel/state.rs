//! One channel's state, guarded by its lock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use tern_proto::client::{Message, OriginPosition};
use tern_proto::codec::EncodedMessage;
use tern_proto::types::{ChannelName, ConnectionId, NodeId};

use super::dedupe::Dedupe;
use super::members::Member;
use crate::fanout::Outbox;

#[derive(Debug, Default)]
pub(super) struct ChannelState {
    /// The channel's name, set when the registry creates it.
    pub(super) name: Option<ChannelName>,
    /// Last origin sequence this node assigned (this epoch).
    pub(super) seq: u64,
    /// Last log offset assigned.
    pub(super) offset: u64,
    /// Of those, the last delivered to subscribers (and, for the sequence, handed to the
    /// backbone). On a channel that keeps history a message is delivered once it is in the
    /// log, so the two differ while writes are in flight; elsewhere they are equal.
    pub(super) shown_seq: u64,
    pub(super) shown_offset: u64,
    /// Live subscribers.
    pub(super) members: HashMap<ConnectionId, Member>,
    /// First subscribers waiting for the peers to confirm the channel (see
    /// [`super::Hub::subscribe`]).
    pub(super) pending: Vec<PendingSub>,
    /// Whether this node asked the backbone for the channel (it has, or had until the
    /// last one left, local subscribers).
    pub(super) interested: bool,
    pub(super) dedupe: Dedupe,
    /// Set when the registry dropped this channel; holders must look it up again.
    pub(super) removed: bool,
    /// Own sequences (this epoch) a node of another region acknowledged.
    pub(super) replicated: u64,
    /// The newest messages delivered on a channel that keeps history (at most
    /// [`super::REWIND_MAX`]), so a rewind is served under the channel lock, seamlessly
    /// joined to the live stream.
    pub(super) recent: VecDeque<Arc<EncodedMessage>>,
    /// `recent` was dropped while the channel sat idle (see [`super::Hub::sweep`]); it is
    /// read back from the log before the channel is used again.
    pub(super) tail_evicted: bool,
    /// When the channel last logged a message (history channels: the ones with a tail).
    pub(super) last_message: Option<Instant>,
    /// Per other origin, the newest message accepted here (newest epoch only), or a
    /// position its stream skipped past (a gap reported as lost): nothing up to it is
    /// accepted again.
    pub(super) remote: Vec<OriginPosition>,
    /// Per other origin, the newest message delivered to subscribers (what
    /// `Subscribed.origins` reports).
    pub(super) shown: Vec<OriginPosition>,
    /// Messages sequenced but not yet delivered: waiting for their log write (history
    /// channels), in log order.
    pub(super) unreleased: VecDeque<Unreleased>,
    /// Replicated messages waiting for an earlier message of their publisher from another
    /// origin (see [`super::order`]), in arrival order, and their payload bytes.
    pub(super) held: VecDeque<Held>,
    pub(super) held_bytes: usize,
}

/// A message waiting for its log write before it is delivered.
#[derive(Debug)]
pub(super) struct Unreleased {
    /// The store ticket to wait for (0: none; delivered with the next release).
    pub(super) ticket: u64,
    pub(super) message: Arc<EncodedMessage>,
    /// Sequenced by this node (handed to the backbone once released).
    pub(super) own: bool,
}

/// A replicated message held for its publisher's order (see [`super::order`]).
#[derive(Debug)]
pub(super) struct Held {
    /// Payload bytes (counted against the channel's hold budget).
    pub(super) bytes: usize,
    pub(super) origin: NodeId,
    pub(super) message: Message,
    /// The publisher's earlier message it must follow (`None`: it only waits for earlier
    /// held messages of the same origin).
    pub(super) after: Option<OriginPosition>,
    pub(super) since: Instant,
}

#[derive(Debug)]
pub(super) struct PendingSub {
    pub(super) conn: ConnectionId,
    pub(super) outbox: Outbox,
    pub(super) request_id: u32,
    /// A resumed subscription's vector (without history: it only needs the floor).
    pub(super) resume: Option<Vec<tern_proto::client::OriginPosition>>,
}

/// The log offset a message was delivered at on this node.
pub(super) fn offset_of(m: &EncodedMessage) -> u64 {
    m.message().position.map_or(0, |p| p.offset)
}

/// Records `origin`'s position (epoch, seq) in a vector, if newer than the one it holds.
pub(super) fn note_origin(vector: &mut Vec<OriginPosition>, origin: &str, epoch: u64, seq: u64) {
    match vector.iter_mut().find(|p| p.origin == origin) {
        Some(p) if (epoch, seq) > (p.epoch, p.seq) => {
            p.epoch = epoch;
            p.seq = seq;
        }
        Some(_) => {}
        None => vector.push(OriginPosition { origin: origin.to_owned(), epoch, seq }),
    }
}

/// Whether `vector` holds `origin` at `(epoch, seq)` or beyond.
pub(super) fn reaches(vector: &[OriginPosition], origin: &str, epoch: u64, seq: u64) -> bool {
    vector.iter().any(|p| p.origin == origin && (p.epoch, p.seq) >= (epoch, seq))
}
