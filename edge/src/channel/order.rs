//! A publisher's order across nodes.
//!
//! A client that moves to another node (its node failed, restarted, or became unreachable)
//! sends each publish with `after`: its own last acknowledged message on the channel
//! (origin, epoch, sequence). Two things keep its order:
//!
//! - **Here**, the node sequences the publish only once it holds everything that origin
//!   sequenced of the channel when asked (it asks with a `HeadRequest` when the publish
//!   arrives, so any message the publisher sent there, acknowledged or not, is here first,
//!   and a retried one is recognised by its id) and `after` itself ([`Hub::order_ready`]).
//!   An origin that does not answer (unreachable, crashed) is waited for. Until then the
//!   session holds the publish (and the later ones), at most `limits.publish_order_wait`;
//!   past it the publish is refused with `ERROR_CODE_UNAVAILABLE` (and later ones of the
//!   channel with it, until it is retried) and can be retried. Once a connection's publishes
//!   on a channel were ordered after an origin, later ones naming it carry the head it
//!   waited for then, without asking again.
//! - **Everywhere else**, the message carries `after`, and a node that receives it before it
//!   delivered `after` holds it — and what follows from the same origin — until it did
//!   ([`Hub::deliver_remote`]), at most `order_wait`; past it the message is delivered
//!   anyway (the publisher's earlier message then arrives after it) and a warning is logged.
//!
//! A gap in the origin's stream reported as lost releases what waited on it.

use std::sync::Arc;
use std::time::Instant;

use tern_proto::client::OriginPosition;
use tern_proto::types::{ChannelName, Epoch, NodeId, Seq};

use super::state::{ChannelState, reaches};
use super::{Channel, Hub, lock};

/// Most replicated messages, and payload bytes, one channel holds for their publishers'
/// order; past either the oldest is delivered without waiting further (memory stays
/// bounded).
const HELD_MAX: usize = 4096;
const HELD_BYTES: usize = 16 << 20;

/// Whether a publish that must follow `after` can be sequenced now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderReady {
    /// Sequence it, carrying this `after` in the message (what this node verified: the
    /// origin's head it waited for; `None` when other nodes need not wait for anything).
    Ready(Option<OriginPosition>),
    /// Not yet: this node is not caught up with the origin of `after`. The reason names it.
    Wait(String),
}

impl Hub {
    /// Whether this node can sequence a publish on `channel` that must follow the
    /// publisher's message `after` now (see the module docs). `probe` holds the question to
    /// `after`'s origin (asked on the first call). Ready carries the origin's head, for the
    /// message. A position of this node, of a node outside the mesh, or on a channel beyond
    /// the node's channel limit does not wait.
    pub fn order_ready(
        &self,
        channel: &str,
        after: &OriginPosition,
        probe: &mut Option<u64>,
    ) -> OrderReady {
        if after.origin.is_empty() || after.origin == self.node.as_str() {
            return OrderReady::Ready(None);
        }
        let (Ok(origin), Some(backbone)) = (NodeId::parse(&after.origin), self.backbone.get())
        else {
            return OrderReady::Ready(None);
        };
        if !backbone.peers().iter().any(|p| p.peer == origin) {
            return OrderReady::Ready(None);
        }
        let Ok(name) = ChannelName::parse(channel) else { return OrderReady::Ready(None) };
        let nonce = *probe.get_or_insert_with(|| backbone.request_head(&origin, &name));
        let Some((epoch, seq)) = backbone.head(nonce) else {
            return OrderReady::Wait(format!(
                "{origin}, where this publisher's earlier messages were sequenced, has not \
                 said what it sequenced of {channel} (unreachable, or restarting)"
            ));
        };
        let head = OriginPosition { origin: after.origin.clone(), epoch: epoch.0, seq: seq.0 };
        let met = self.with_channel(channel, self.limits.max_channels, |_, state| {
            (head.seq == 0 || self.order_met(state, &head)) && self.order_met(state, after)
        });
        if met.unwrap_or(true) {
            // Other nodes hold the message until they have the origin's head too. (The
            // client's own `after` is not forwarded: this node verified the head, not it.)
            OrderReady::Ready((head.seq > 0).then_some(head))
        } else {
            OrderReady::Wait(format!(
                "this node has not yet received every message {origin} sequenced of {channel} \
                 before this publish"
            ))
        }
    }

    /// Forgets a question [`Hub::order_ready`] asked.
    pub fn forget_probe(&self, nonce: u64) {
        if let Some(b) = self.backbone.get() {
            b.forget_head(nonce);
        }
    }

    /// [`Hub::forget_probe`], when a question was asked.
    pub fn forget_probe_opt(&self, nonce: Option<u64>) {
        if let Some(nonce) = nonce {
            self.forget_probe(nonce);
        }
    }

    /// The newest message of `channel` this node sequenced, sent or not yet (epoch,
    /// sequence; sequence 0: none): what it answers a peer's `HeadRequest` with.
    pub fn own_head(&self, channel: &ChannelName) -> (Epoch, Seq) {
        let seq = self
            .channels
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(channel)
            .map(|c| lock(&c.state).seq);
        match seq {
            Some(seq) if seq > 0 => (self.epoch, Seq(seq)),
            _ => {
                self.backbone.get().and_then(|b| b.past_head(channel)).unwrap_or((Epoch(0), Seq(0)))
            }
        }
    }

    /// Whether the channel here delivered (or will never receive) the message `after`.
    pub(super) fn order_met(&self, state: &ChannelState, after: &OriginPosition) -> bool {
        if after.origin == self.node.as_str() {
            return true;
        }
        // A message of that origin up to `after` still held here is not delivered yet, even
        // when the origin's stream (an ended epoch) says nothing more of it comes.
        let at = (after.epoch, after.seq);
        if state.held.iter().any(|h| {
            h.origin.as_str() == after.origin
                && (h.message.origin_epoch, h.message.origin_seq) <= at
        }) {
            return false;
        }
        if reaches(&state.remote, &after.origin, after.epoch, after.seq) {
            return true;
        }
        let (Ok(origin), Some(backbone), Some(name)) =
            (NodeId::parse(&after.origin), self.backbone.get(), state.name.as_ref())
        else {
            return true;
        };
        // Not received from that origin at all, or its stream here began after it.
        backbone
            .stream(&origin, name)
            .is_none_or(|p| p.epoch.0 == after.epoch && p.start.0 >= after.seq)
    }

    /// Remembers that `ch` holds messages, so [`Hub::release_expired`] reaches it.
    pub(super) fn note_holding(&self, ch: &Arc<Channel>, state: &mut ChannelState) {
        if let Some(name) = state.name.clone() {
            lock(&self.holding).entry(name).or_insert_with(|| ch.clone());
        }
        let now = Instant::now();
        while state.held.len() > HELD_MAX || state.held_bytes > HELD_BYTES {
            tracing::warn!(channel = ?state.name, "too many messages held for their publishers' order; delivering the oldest");
            self.release_held(ch, state, now, true);
        }
    }

    /// Accepts the held messages that may go now, in arrival order (an origin's messages
    /// never overtake each other). `force`: also those that waited `order_wait` (or, past
    /// [`HELD_MAX`], the oldest).
    pub(super) fn release_held(
        &self,
        ch: &Arc<Channel>,
        state: &mut ChannelState,
        now: Instant,
        force: bool,
    ) {
        loop {
            let mut blocked: Vec<&NodeId> = Vec::new();
            let mut pick = None;
            for (i, h) in state.held.iter().enumerate() {
                if blocked.contains(&&h.origin) {
                    continue;
                }
                let met = h.after.as_ref().is_none_or(|a| self.order_met(state, a));
                let full = state.held.len() > HELD_MAX || state.held_bytes > HELD_BYTES;
                let expired = force
                    && (now.saturating_duration_since(h.since) >= self.limits.order_wait
                        || (i == 0 && full));
                if met || expired {
                    if !met {
                        tracing::warn!(
                            origin = %h.origin,
                            channel = %h.message.channel,
                            after = ?h.after,
                            "delivered without its publisher's earlier message, which did not arrive in time"
                        );
                    }
                    pick = Some(i);
                    break;
                }
                blocked.push(&h.origin);
            }
            let Some(i) = pick else { break };
            let Some(h) = state.held.remove(i) else { break };
            state.held_bytes -= h.bytes;
            self.accept_remote(ch, state, h.message, now);
        }
    }

    /// Delivers the held messages that waited `order_wait` (run periodically by the server).
    pub fn release_expired(&self, now: Instant) {
        let channels: Vec<Arc<Channel>> = lock(&self.holding).values().cloned().collect();
        for ch in channels {
            let mut state = lock(&ch.state);
            self.release_held(&ch, &mut state, now, true);
            if state.held.is_empty() {
                if let Some(name) = state.name.as_ref() {
                    lock(&self.holding).remove(name);
                }
            }
        }
    }
}
