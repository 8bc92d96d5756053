//! Delivery after the log write.
//!
//! On a channel that keeps history, a message — published here or replicated from another
//! origin — is delivered to subscribers, and (when this node sequenced it) handed to the
//! backbone, only once the store committed its log write. So a crash never takes back a
//! message anyone received, a restarted node knows from its log everything it ever
//! delivered (nothing is appended or delivered twice), and a position a subscriber holds is
//! always in the log. The cost is the commit's latency on such channels (≈ 0.5 ms with an
//! fsync per group on this machine, see `tern bench history`). A write that fails (a full
//! or broken disk) is delivered anyway, and its publisher told (`INTERNAL`): it is then
//! missing from this node's history only.
//!
//! ```text
//!  publish / deliver_remote ─▶ unreleased (per channel, log order) ─┐
//!  store commits ticket T ──▶ Hub::release(T) ─▶ channels whose first ticket ≤ T ─┴─▶ show
//! ```

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::state::{ChannelState, Unreleased};
use super::{Channel, Hub, lock};

impl Hub {
    /// Queues a sequenced message until its log write is committed.
    pub(super) fn queue_release(&self, ch: &Arc<Channel>, state: &mut ChannelState, u: Unreleased) {
        if state.unreleased.is_empty() {
            let mut releases = lock(&self.releases);
            // Already written (the release for its commit may have run before this channel
            // queued), or no log write to wait for (the writer is gone): deliver now.
            if u.ticket <= self.committed_seen.load(Ordering::Acquire) {
                drop(releases);
                return self.show(state, &u.message, u.own);
            }
            releases.push_back((u.ticket, ch.clone()));
        }
        state.unreleased.push_back(u);
        self.unreleased.fetch_add(1, Ordering::Relaxed);
    }

    /// Delivers every message whose log write is done (the store's committed ticket reached
    /// `committed`), channel by channel, in log order. Run whenever the store commits (a
    /// session may release one channel meanwhile, see [`Hub::release_channel`]).
    pub fn release(&self, committed: u64) {
        let ready: Vec<Arc<Channel>> = {
            let mut queue = lock(&self.releases);
            // Under the queue's lock: a channel that queues after this sees it (see
            // `queue_release`), so no message waits for a later commit.
            self.committed_seen.fetch_max(committed, Ordering::AcqRel);
            let mut ready = Vec::new();
            // A channel a session released meanwhile may be queued twice: once is enough.
            let mut seen = std::collections::HashSet::new();
            queue.retain(|(ticket, ch)| {
                if *ticket <= committed {
                    if seen.insert(Arc::as_ptr(ch)) {
                        ready.push(ch.clone());
                    }
                    false
                } else {
                    true
                }
            });
            ready
        };
        for ch in ready {
            let mut state = lock(&ch.state);
            self.show_logged(&mut state, committed);
            if let Some(next) = state.unreleased.front() {
                lock(&self.releases).push_back((next.ticket, ch.clone()));
            }
        }
    }

    /// Delivers `name`'s messages whose log write is done (up to `committed`) now, under the
    /// channel's lock: called before a publish on it is acknowledged, so a message is out
    /// once its ack is (the release task may not have run yet). Whoever pops a message shows
    /// it; a queue entry left for the channel finds nothing more and is dropped.
    pub fn release_channel(&self, name: &str, committed: u64) {
        let Some(ch) = self.existing(name) else { return };
        self.show_logged(&mut lock(&ch.state), committed);
    }

    /// Shows the channel's messages written up to `committed`, in log order.
    fn show_logged(&self, state: &mut ChannelState, committed: u64) {
        let mut released = 0;
        while state.unreleased.front().is_some_and(|u| u.ticket <= committed) {
            let Some(u) = state.unreleased.pop_front() else { break };
            self.show(state, &u.message, u.own);
            released += 1;
        }
        self.unreleased.fetch_sub(released, Ordering::Relaxed);
    }

    /// Messages sequenced and waiting for their log write (a graceful shutdown waits for
    /// them to go out).
    pub fn unreleased(&self) -> usize {
        self.unreleased.load(Ordering::Relaxed)
    }
}
