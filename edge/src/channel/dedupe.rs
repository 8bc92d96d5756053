//! Message ids a channel remembers for its dedupe window: a publish retried with the same
//! id is acknowledged again and not delivered twice, whether its first copy was sequenced
//! here or arrived from another origin.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use super::{Accepted, HubLimits};

#[derive(Debug, Default)]
pub(super) struct Dedupe {
    /// Ids this node sequenced, with their first ack.
    pub(super) seen: HashMap<String, Accepted>,
    pub(super) order: VecDeque<(Instant, String)>,
    /// Ids of messages that arrived from other origins, as keyed 64-bit hashes (the
    /// replication path stays allocation-free; the key is random per process, so ids
    /// cannot be crafted to collide).
    pub(super) remote: HashSet<u64>,
    pub(super) remote_order: VecDeque<(Instant, u64)>,
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

    /// Remembers the hash of an id from another origin; false when it was known already.
    pub(super) fn note_remote(&mut self, hash: u64, now: Instant) -> bool {
        if !self.remote.insert(hash) {
            return false;
        }
        self.remote_order.push_back((now, hash));
        true
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
