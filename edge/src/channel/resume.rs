//! The lock side of `Subscribe.resume` (the log side is [`crate::resume`]).
//!
//! A resumed subscription gets what the client missed, and never what it had: the replay
//! skips what the client's vector covers, and once live, a client that is ahead of this node
//! for some origin (it had their messages from a node this one is still catching up with)
//! keeps a floor in its member entry until the origin's stream here passed it.

use std::time::Duration;

use tern_proto::client::{Discontinuity, OriginPosition, Resume, Subscribed, server_frame};
use tern_proto::types::{ChannelName, ConnectionId};

use super::Hub;
use super::members::Member;
use super::state::{ChannelState, offset_of};
use crate::fanout::{Outbox, Outgoing};

/// What [`Hub::resume`] did.
#[derive(Debug)]
pub enum Resumed {
    /// The subscription is set up: its `Subscribed` frame, any discontinuity and replay are
    /// queued (or will be, once the peers confirmed the channel, as with [`Hub::subscribe`]).
    Done,
    /// The session must replay from the log first (see [`crate::resume`]); the subscription
    /// is not live until [`Hub::finish_catchup`] says so.
    Catchup(Box<crate::resume::Catchup>, Subscribed),
}

impl Hub {
    /// Makes a resumed subscription live, with the floor its vector needs (see
    /// [`Member::resumed`]).
    pub(super) fn join_resumed(
        &self,
        state: &mut ChannelState,
        conn: ConnectionId,
        outbox: &Outbox,
        vector: &[OriginPosition],
    ) {
        let here = self.origins(state);
        state.members.insert(conn, Member::resumed(outbox.clone(), vector, &here));
    }

    /// Adds a subscriber that continues where an earlier subscription left off (see
    /// [`crate::resume`]). Channels that keep history replay what the client missed; others
    /// can only tell it (with a `Discontinuity`) that it missed something.
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        &self,
        name: &ChannelName,
        conn: ConnectionId,
        outbox: Outbox,
        request_id: u32,
        resume: Resume,
        window: Duration,
        max_scan: usize,
    ) -> Resumed {
        let claimed = resume.node == self.node.as_str()
            && resume.position.is_some_and(|p| p.epoch == self.log_epoch.0);
        let after = resume.position.map_or(0, |p| p.offset);
        let history = self.store.as_ref().filter(|s| s.keeps(name.as_str()));
        self.with_state(name.as_str(), |state| {
            // A position on this node counts only if this node still has the client's last
            // message there (a log that lost its newest entries reissues their offsets).
            let mut verify_at = None;
            let same_node = claimed
                && after <= state.shown_offset
                && (after == 0
                    || match state.recent.iter().find(|m| offset_of(m) == after) {
                        Some(m) => crate::resume::covers(&resume.origins, m.message()),
                        None => {
                            verify_at = Some(after);
                            history.is_some()
                        }
                    });
            let Some(store) = history else {
                // No log: say whether anything was missed, then go live.
                let missed = if same_node {
                    state.shown_offset > after
                } else {
                    let known = self.origins(state);
                    !resume.origins.iter().all(|v| {
                        known
                            .iter()
                            .any(|k| k.origin == v.origin && k.epoch == v.epoch && k.seq == v.seq)
                    }) || known
                        .iter()
                        .any(|k| k.seq > 0 && !resume.origins.iter().any(|v| v.origin == k.origin))
                };
                if missed {
                    let d = Discontinuity {
                        channel: name.to_string(),
                        reason: "this channel keeps no history: messages published while \
                                 disconnected cannot be replayed"
                            .into(),
                        origins: Vec::new(),
                    };
                    outbox.push_replay(Outgoing::Frame(Box::new(
                        server_frame::Kind::Discontinuity(d),
                    )));
                }
                // Live at once, or once the peers confirmed; with the floor of the client's
                // vector (it may be ahead of this node for some origin).
                self.join(state, name, conn, &outbox, request_id, Some(&resume.origins));
                return Resumed::Done;
            };
            self.want(state, name);
            let mut subscribed = self.subscribed(state, request_id, name);
            subscribed.resumed = true;
            subscribed.origins = Vec::new();
            // Same node, and the in-memory tail reaches back to the client's position: no
            // log read needed.
            let now = crate::store::now_ms();
            let cutoff_ms = now.saturating_sub(window.as_millis() as u64);
            if same_node
                && (after >= state.shown_offset
                    || state
                        .recent
                        .front()
                        .is_some_and(|m| offset_of(m) <= after.saturating_add(1)))
            {
                let mut ok = outbox.push_replay(Outgoing::Frame(Box::new(
                    server_frame::Kind::Subscribed(subscribed),
                )));
                let missed = state.recent.iter().filter(|m| {
                    offset_of(m) > after && !crate::resume::covers(&resume.origins, m.message())
                });
                let stale = missed.clone().take_while(|m| m.message().timestamp_ms < cutoff_ms);
                let stale = stale.count();
                if stale > 0 {
                    let d = Discontinuity {
                        channel: name.to_string(),
                        reason: format!(
                            "{stale} message(s) are older than the resume window; fetch history"
                        ),
                        origins: Vec::new(),
                    };
                    ok = ok
                        && outbox.push_replay(Outgoing::Frame(Box::new(
                            server_frame::Kind::Discontinuity(d),
                        )));
                }
                for m in missed.skip(stale) {
                    ok = ok && outbox.push_replay(Outgoing::Message(m.clone()));
                }
                if ok {
                    self.join_resumed(state, conn, &outbox, &resume.origins);
                }
                return Resumed::Done;
            }
            let catchup = crate::resume::Catchup {
                id: 0,
                channel: name.clone(),
                request_id,
                next: after.saturating_add(1),
                head: state.shown_offset,
                wait_ticket: store.last_ticket(),
                vector: resume.origins.clone(),
                found: same_node,
                verify_at,
                started: false,
                cutoff_ms,
                known: self.origins(state),
                max_scan,
            };
            Resumed::Catchup(Box::new(catchup), subscribed)
        })
    }

    /// Ends a replay that reached `next`: when the in-memory tail covers the rest, queues it
    /// (skipping what `vector` covers) and makes the subscription live (with a floor where
    /// the client is ahead of this node); otherwise returns false (the log is behind; read
    /// more once it caught up).
    pub fn finish_catchup(
        &self,
        name: &ChannelName,
        conn: ConnectionId,
        outbox: &Outbox,
        next: u64,
        vector: &[OriginPosition],
        force: bool,
    ) -> bool {
        self.with_state(name.as_str(), |state| {
            let covered = next > state.shown_offset
                || state.recent.front().is_some_and(|m| offset_of(m) <= next);
            if !covered && !force {
                return false;
            }
            let mut ok = true;
            for m in state.recent.iter().filter(|m| offset_of(m) >= next) {
                if !crate::resume::covers(vector, m.message()) {
                    ok = ok && outbox.push_replay(Outgoing::Message(m.clone()));
                }
            }
            self.want(state, name);
            if ok {
                self.join_resumed(state, conn, outbox, vector);
            }
            true
        })
    }
}
