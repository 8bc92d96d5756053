//! Presence: who is on a channel. A [`PresenceWatch`] keeps the channel's member set and
//! yields its changes; across reconnects it compares the node's new snapshot with what it
//! had, so the application sees only real changes (no leave and enter of members that
//! stayed).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use tern_proto::client::{PresenceAction, PresenceMember};
use tokio::sync::mpsc;

use crate::driver::Command;

/// A member's identity: client id, connection id, node.
pub(crate) type MemberId = (String, String, String);

pub(crate) fn id_of(m: &PresenceMember) -> MemberId {
    (m.client_id.clone(), m.connection_id.clone(), m.node.clone())
}

/// A change of a channel's members.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceChange {
    /// `Enter`, `Update` or `Leave` (a leave carries the member's last data).
    pub action: PresenceAction,
    /// Who, with its data and node.
    pub member: PresenceMember,
}

/// The changes between `old` and `new`, in member order.
pub(crate) fn diff(
    old: &BTreeMap<MemberId, PresenceMember>,
    new: &BTreeMap<MemberId, PresenceMember>,
) -> Vec<PresenceChange> {
    let mut out = Vec::new();
    for (id, m) in old {
        if !new.contains_key(id) {
            out.push(PresenceChange { action: PresenceAction::Leave, member: m.clone() });
        }
    }
    for (id, m) in new {
        match old.get(id) {
            Some(o) if o.data == m.data => {}
            Some(_) => {
                out.push(PresenceChange { action: PresenceAction::Update, member: m.clone() })
            }
            None => out.push(PresenceChange { action: PresenceAction::Enter, member: m.clone() }),
        }
    }
    out
}

/// A channel's presence, live: yields each change (the first ones build the set from the
/// node's snapshot). Dropping it stops watching.
#[derive(Debug)]
pub struct PresenceWatch {
    pub(crate) channel: String,
    pub(crate) id: u64,
    pub(crate) rx: mpsc::Receiver<PresenceChange>,
    pub(crate) cmd: mpsc::Sender<Command>,
}

impl PresenceWatch {
    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }
}

impl Stream for PresenceWatch {
    type Item = PresenceChange;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for PresenceWatch {
    fn drop(&mut self) {
        let channel = std::mem::take(&mut self.channel);
        let _ = self.cmd.try_send(Command::Unwatch { channel, id: self.id });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::client::presence_member::Data;

    fn m(client: &str, data: &str) -> (MemberId, PresenceMember) {
        let member = PresenceMember {
            client_id: client.into(),
            connection_id: "1".into(),
            node: "r/e".into(),
            data: Some(Data::Text(data.into())),
        };
        (id_of(&member), member)
    }

    #[test]
    fn a_new_snapshot_reports_only_real_changes() {
        let old: BTreeMap<_, _> = [m("a", "x"), m("b", "x"), m("c", "x")].into_iter().collect();
        let new: BTreeMap<_, _> = [m("a", "x"), m("c", "y"), m("d", "x")].into_iter().collect();
        let changes: Vec<(PresenceAction, String)> =
            diff(&old, &new).into_iter().map(|c| (c.action, c.member.client_id)).collect();
        assert_eq!(
            changes,
            [
                (PresenceAction::Leave, "b".into()),
                (PresenceAction::Update, "c".into()),
                (PresenceAction::Enter, "d".into()),
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }
}
