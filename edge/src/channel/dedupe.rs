//! Message ids a channel remembers for its dedupe window: a publish retried with the same
//! id is acknowledged again and not delivered twice, whether its first copy was sequenced
//! here or arrived from another origin.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use tern_proto::types::NodeId;

use super::{Accepted, HubLimits};

/// Where a message that arrived from another origin sits: its identity (what a duplicate
/// publish's ack repeats) and its offset here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RemoteId {
    /// Index into [`Dedupe::origins`].
    origin: u16,
    pub(super) epoch: u64,
    pub(super) seq: u64,
    pub(super) offset: u64,
}

#[derive(Debug, Default)]
pub(super) struct Dedupe {
    /// Ids this node sequenced, with their first ack.
    pub(super) seen: HashMap<String, Accepted>,
    pub(super) order: VecDeque<(Instant, String)>,
    /// Ids of messages that arrived from other origins, as keyed 64-bit hashes (the
    /// replication path stays allocation-free; the key is random per process, so ids
    /// cannot be crafted to collide), with the message's identity.
    pub(super) remote: HashMap<u64, RemoteId>,
    pub(super) remote_order: VecDeque<(Instant, u64)>,
    /// The origins `remote` names (a channel has few).
    origins: Vec<NodeId>,
}

impl Dedupe {
    pub(super) fn prune(&mut self, now: Instant, limits: &HubLimits) {
        expire(&mut self.order, now, limits, |id| {
            self.seen.remove(&id);
        });
        expire(&mut self.remote_order, now, limits, |h| {
            self.remote.remove(&h);
        });
    }

    /// Remembers an id this node sequenced.
    pub(super) fn note_own(&mut self, id: &str, accepted: &Accepted, now: Instant) {
        if !self.seen.contains_key(id) {
            self.seen.insert(id.to_owned(), accepted.clone());
            self.order.push_back((now, id.to_owned()));
        }
    }

    /// Remembers the hash of an id from another origin, with the message's identity
    /// (`origin`, `epoch`, `seq`) and offset here; false when it was known already.
    pub(super) fn note_remote(
        &mut self,
        hash: u64,
        origin: &str,
        (epoch, seq, offset): (u64, u64, u64),
        now: Instant,
    ) -> bool {
        if self.remote.contains_key(&hash) {
            return false;
        }
        let index = match self.origins.iter().position(|o| o.as_str() == origin) {
            Some(i) => i,
            None => {
                let Ok(id) = NodeId::parse(origin) else { return true };
                if self.origins.len() > usize::from(u16::MAX) {
                    return true;
                }
                self.origins.push(id);
                self.origins.len() - 1
            }
        };
        let id = RemoteId { origin: index as u16, epoch, seq, offset };
        self.remote.insert(hash, id);
        self.remote_order.push_back((now, hash));
        true
    }

    /// The identity remembered for a hashed id from another origin.
    pub(super) fn remote(&self, hash: u64) -> Option<(NodeId, RemoteId)> {
        let r = self.remote.get(&hash)?;
        Some((self.origins.get(usize::from(r.origin))?.clone(), *r))
    }

    /// Ids remembered.
    pub(super) fn len(&self) -> usize {
        self.order.len() + self.remote_order.len()
    }
}

/// Drops the entries of `order` older than the dedupe window or beyond its size, handing
/// each to `forget`.
fn expire<T>(
    order: &mut VecDeque<(Instant, T)>,
    now: Instant,
    limits: &HubLimits,
    mut forget: impl FnMut(T),
) {
    while let Some((at, _)) = order.front() {
        if now.duration_since(*at) < limits.dedupe_window && order.len() <= limits.dedupe_ids {
            break;
        }
        if let Some((_, key)) = order.pop_front() {
            forget(key);
        }
    }
}
