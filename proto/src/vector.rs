//! Per-origin vectors: how far a client got in each origin's sequence of a channel (see
//! `Subscribe.resume`). Nodes use them to replay what a client missed; SDKs to drop what
//! they already delivered.

use crate::client::{Message, OriginPosition};

impl OriginPosition {
    /// Whether a client at this position of `m`'s origin already had `m` (or a later message
    /// of that origin): same epoch and a sequence not above this one, or an older epoch.
    pub fn covers(&self, m: &Message) -> bool {
        self.origin == m.origin
            && (m.origin_epoch < self.epoch
                || (m.origin_epoch == self.epoch && m.origin_seq <= self.seq))
    }
}

/// Whether the vector covers `m` (the client had it).
pub fn covers(vector: &[OriginPosition], m: &Message) -> bool {
    vector.iter().any(|v| v.covers(m))
}
