//! A publisher's order across nodes.
//!
//! A client that moves to another node (its node failed, restarted, or became unreachable)
//! sends each publish with `after`: its own last acknowledged message on the channel
//! (origin, epoch, sequence). Two things keep its order:
//!
//! - **Here**, the node sequences the publish only once it caught up with that origin: the
//!   link is up and the origin's catch-up after it is acknowledged (so any message the
//!   publisher sent there, acknowledged or not, is here too, and a retried one is recognised
//!   by its id), and this channel's stream of that origin reached `after`
//!   ([`Hub::order_ready`]). Until then the session holds the publish (and the later ones
//!   on the channel), at most `limits.publish_order_wait`; past it the publish is refused
//!   with `ERROR_CODE_UNAVAILABLE` and can be retried.
//! - **Everywhere else**, the message carries `after`, and a node that receives it before it
//!   delivered `after` holds it — and what follows from the same origin — until it did
//!   ([`Hub::deliver_remote`]), at most `order_wait`; past it the message is delivered
//!   anyway (the publisher's earlier message then arrives after it) and a warning is logged.
//!
//! A gap in the origin's stream reported as lost releases what waited on it.

use std::sync::Arc;
use std::time::Instant;

use tern_proto::client::OriginPosition;
use tern_proto::types::NodeId;

use super::state::{ChannelState, reaches};
use super::{Channel, Hub, lock};

/// Most replicated messages one channel holds for their publishers' order; past it the
/// oldest is delivered without waiting further (memory stays bounded).
const HELD_MAX: usize = 4096;

/// Whether a publish that must follow `after` can be sequenced now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderReady {
    /// Sequence it.
    Ready,
    /// Not yet: this node is not caught up with the origin of `after`. The reason names it.
    Wait(String),
}

impl Hub {
    /// Whether this node can sequence a publish on `channel` that must follow the
    /// publisher's message `after` now (see the module docs). A position of this node, of a
    /// node outside the mesh, or on a channel beyond the node's channel limit does not wait.
    pub fn order_ready(&self, channel: &str, after: &OriginPosition) -> OrderReady {
        if after.origin.is_empty() || after.origin == self.node.as_str() {
            return OrderReady::Ready;
        }
        let (Ok(origin), Some(backbone)) = (NodeId::parse(&after.origin), self.backbone.get())
        else {
            return OrderReady::Ready;
        };
        if !backbone.peers().iter().any(|p| p.peer == origin) {
            return OrderReady::Ready;
        }
        if !backbone.caught_up_with(&origin) {
            return OrderReady::Wait(format!(
                "this node is not caught up with {origin}, where this publisher's earlier \
                 messages were sequenced (unreachable, or still sending what this node lacks)"
            ));
        }
        let met = self.with_channel(channel, self.limits.max_channels, |_, state| {
            self.order_met(state, after)
        });
        if met.unwrap_or(true) {
            OrderReady::Ready
        } else {
            OrderReady::Wait(format!(
                "this node has not yet received {origin}'s message {} (epoch {}) of {channel}",
                after.seq, after.epoch
            ))
        }
    }

    /// Whether the channel here delivered (or will never receive) the message `after`.
    pub(super) fn order_met(&self, state: &ChannelState, after: &OriginPosition) -> bool {
        if after.origin == self.node.as_str()
            || reaches(&state.remote, &after.origin, after.epoch, after.seq)
        {
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
        while state.held.len() > HELD_MAX {
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
                let expired = force
                    && (now.saturating_duration_since(h.since) >= self.limits.order_wait
                        || (i == 0 && state.held.len() > HELD_MAX));
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
