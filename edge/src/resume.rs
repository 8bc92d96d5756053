//! Resume: a reconnecting client continues a subscription where it left off.
//!
//! The client presents, per channel, the last message it received: its position in the
//! delivering node's log, and its per-origin vector (origin → epoch, last sequence), kept
//! from `Subscribed.origins` and every message since (DESIGN.md, "Positions").
//!
//! ```text
//!  same node, same log epoch ──▶ replay offsets after the position
//!  any other node            ──▶ scan the log backwards until every origin of the vector is
//!                                found at or before the client's sequence; replay forward
//!                                from there, skipping what the vector covers
//!  then, under the channel lock ──▶ the newest messages from the in-memory tail, and live
//! ```
//!
//! A replay is stepped by the session: one page per step ([`step`], a blocking log read), the
//! next only after the previous was written to the socket, so a client that missed 10,000
//! messages costs a page of memory, not 10,000 queue slots. What cannot be replayed —
//! older than the resume window, trimmed by retention, beyond `resume.max_scan` — is
//! announced with a `Discontinuity` frame, never skipped silently.

use std::sync::Arc;

use tern_proto::client::{Discontinuity, Message, OriginPosition};
use tern_proto::codec::EncodedMessage;
use tern_proto::types::ChannelName;

use crate::store::{Query, Store, StoreError};

pub use tern_proto::vector::covers;

/// Where a replay starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// The next offset of this node's log (same-node resume).
    Offset,
    /// Not found yet: scan backwards for the client's vector (cross-node resume).
    Vector(Vec<OriginPosition>),
}

/// A replay in progress, owned by the session.
#[derive(Debug, Clone)]
pub struct Catchup {
    /// Serial within the session, so a late step of a dropped catch-up is ignored.
    pub id: u64,
    /// The channel.
    pub channel: ChannelName,
    /// Client request id of the `Subscribe`.
    pub request_id: u32,
    /// Next log offset to replay (once found).
    pub next: u64,
    /// The channel's last offset when the resume began.
    pub head: u64,
    /// Store ticket to wait for before reading (so the log holds everything up to `head`).
    pub wait_ticket: u64,
    /// The client's vector: replayed messages it covers are skipped.
    pub vector: Vec<OriginPosition>,
    /// Whether `next` is known; false until the backward scan ran (cross-node resume).
    pub found: bool,
    /// Same-node resume from a position the in-memory tail no longer holds: the log entry
    /// at this offset must be a message the client had (a crash can reissue offsets that
    /// were delivered but not yet logged); otherwise the vector decides.
    pub verify_at: Option<u64>,
    /// Whether the first forward page was read (it checks for a gap at the start).
    pub started: bool,
    /// Messages logged before this (unix ms) are not replayed (the resume window).
    pub cutoff_ms: u64,
    /// The origins this node knew on the channel when the resume began (for gap checks).
    pub known: Vec<OriginPosition>,
    /// Most entries the backward scan reads.
    pub max_scan: usize,
}

/// The outcome of one replay step.
#[derive(Debug, Default)]
pub struct Step {
    /// Messages to deliver, in log order.
    pub messages: Vec<Arc<EncodedMessage>>,
    /// A gap that cannot be replayed, announced before `messages`.
    pub discontinuity: Option<Discontinuity>,
    /// The next offset to read.
    pub next: u64,
    /// The log holds nothing more right now (the session then tries to go live).
    pub at_end: bool,
    /// This step was the backward scan: `next` is where the forward replay starts.
    pub scanned: bool,
}

fn decode(bytes: &[u8]) -> Option<Message> {
    prost::Message::decode(bytes).ok()
}

/// Per-origin progress of the backward scan.
#[derive(Debug)]
struct Origin<'a> {
    pos: &'a OriginPosition,
    /// Found a message of the origin at or before the client's sequence (or an older epoch):
    /// nothing earlier of it is missing.
    found: bool,
    /// Lowest sequence of the client's epoch seen above its sequence.
    lowest_above: Option<u64>,
}

/// Entries read per backward-scan page.
const SCAN_PAGE: usize = 1024;

/// After every origin of the vector was found, the scan goes on this far back (unix ms, by
/// log time) for origins the vector does not list: a message of a new origin may be logged
/// here a little before messages the client already had from others.
const NEW_ORIGIN_MARGIN_MS: u64 = 10_000;

/// Most origins a resume vector lists: far more than the nodes that publish to one
/// channel, and a bound on what a client's vector costs the node (it is kept per
/// subscription and searched per delivery).
pub const MAX_RESUME_ORIGINS: usize = 256;

/// Checks a client's resume vector: at most [`MAX_RESUME_ORIGINS`] entries, each naming a
/// node (`region/name`) once.
pub fn check_vector(origins: &[OriginPosition]) -> Result<(), String> {
    if origins.len() > MAX_RESUME_ORIGINS {
        return Err(format!(
            "resume lists {} origins; the limit is {MAX_RESUME_ORIGINS}",
            origins.len()
        ));
    }
    for (i, o) in origins.iter().enumerate() {
        tern_proto::types::NodeId::parse(&o.origin)
            .map_err(|e| format!("resume origin {:?}: {e}", o.origin))?;
        if origins[..i].iter().any(|p| p.origin == o.origin) {
            return Err(format!("resume lists origin {:?} twice", o.origin));
        }
    }
    Ok(())
}

/// How much one replay step reads from the log (`resume.page`, `resume.page_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct PageSize {
    /// Most messages.
    pub messages: usize,
    /// Most bytes of stored messages (at least one message whatever its size).
    pub bytes: usize,
}

/// One replay step: the backward scan first (cross-node), then a forward page of `page`.
pub fn step(store: &Store, c: &Catchup, page: PageSize) -> Result<Step, StoreError> {
    if !c.found {
        return scan(store, c, page.bytes);
    }
    if let Some(at) = c.verify_at.filter(|_| !c.started) {
        let q = Query { from: Some(at), to: Some(at), backwards: false, ..Query::newest(1) };
        let rows = store.read(c.channel.as_str(), q)?;
        let had =
            rows.first().and_then(|r| decode(&r.message)).is_some_and(|m| covers(&c.vector, &m));
        if !had {
            return scan(store, c, page.bytes);
        }
    }
    let first = !c.started;
    let q = Query {
        from: Some(c.next),
        since_ms: (first && c.cutoff_ms > 0).then_some(c.cutoff_ms),
        max_bytes: page.bytes,
        backwards: false,
        ..Query::newest(page.messages)
    };
    let read = store.page(c.channel.as_str(), q)?;
    let rows = read.messages;
    let mut out = Step { next: c.next, at_end: read.next_from.is_none(), ..Step::default() };
    if first {
        // Whatever lies between the client's position and the first replayable entry is
        // older than the window or was trimmed.
        let first_available = rows.first().map_or(c.head + 1, |r| r.offset);
        if first_available > c.next && c.next <= c.head {
            let missed = first_available.min(c.head + 1) - c.next;
            out.discontinuity = Some(Discontinuity {
                channel: c.channel.to_string(),
                reason: format!(
                    "{missed} message(s) are no longer replayable (older than the resume \
                     window or past the log's retention); fetch history"
                ),
                origins: Vec::new(),
            });
            out.next = first_available.min(c.head + 1);
        }
    }
    for r in rows {
        out.next = r.offset + 1;
        if let Some(m) = decode(&r.message) {
            if !covers(&c.vector, &m) {
                out.messages.push(Arc::new(EncodedMessage::new(m)));
            }
        }
    }
    Ok(out)
}

/// The backward scan of a cross-node resume: finds the first offset the client misses, and
/// the origins whose missed messages this log no longer holds.
fn scan(store: &Store, c: &Catchup, max_bytes: usize) -> Result<Step, StoreError> {
    let mut origins: Vec<Origin<'_>> =
        c.vector.iter().map(|pos| Origin { pos, found: false, lowest_above: None }).collect();
    let mut start = c.head + 1;
    let mut from = c.head;
    let mut scanned = 0usize;
    // Log time at which the last origin of the vector was found.
    let mut all_found_at: Option<u64> = None;
    let mut oldest = c.head + 1;
    // The scan ended because the log holds nothing older (not at a limit).
    let mut complete = false;
    'scan: loop {
        if from == 0 {
            complete = true;
            break;
        }
        let q = Query { from: Some(from), max_bytes, ..Query::newest(SCAN_PAGE) };
        let read = store.page(c.channel.as_str(), q)?;
        let last_page = read.next_from.is_none();
        for r in read.messages {
            if r.timestamp_ms < c.cutoff_ms || scanned >= c.max_scan {
                break 'scan;
            }
            if all_found_at.is_some_and(|t| r.timestamp_ms.saturating_add(NEW_ORIGIN_MARGIN_MS) < t)
            {
                break 'scan;
            }
            scanned += 1;
            oldest = r.offset;
            from = r.offset.saturating_sub(1);
            let Some(m) = decode(&r.message) else { continue };
            for o in origins.iter_mut().filter(|o| o.pos.origin == m.origin) {
                if o.pos.covers(&m) {
                    o.found = true;
                } else if m.origin_epoch == o.pos.epoch {
                    o.lowest_above = Some(m.origin_seq);
                }
            }
            if !covers(&c.vector, &m) {
                start = r.offset;
            }
            if all_found_at.is_none() && !origins.is_empty() && origins.iter().all(|o| o.found) {
                all_found_at = Some(r.timestamp_ms);
            }
        }
        if last_page {
            complete = true;
            break;
        }
    }
    // Nothing was ever trimmed from what the scan covered.
    let holds_all = complete && oldest <= 1;
    // Gaps: origins not found whose missed messages are not (all) here.
    let mut gaps = Vec::new();
    for o in origins.iter().filter(|o| !o.found) {
        let gap = match o.lowest_above {
            Some(low) => low > o.pos.seq.saturating_add(1),
            None => c.known.iter().any(|k| {
                k.origin == o.pos.origin
                    && ((k.epoch == o.pos.epoch && k.seq > o.pos.seq)
                        || (k.epoch > o.pos.epoch && !holds_all))
            }),
        };
        if gap {
            gaps.push(o.pos.clone());
        }
    }
    let discontinuity = (!gaps.is_empty()).then(|| Discontinuity {
        channel: c.channel.to_string(),
        reason: format!(
            "messages from {} origin(s) are no longer replayable on this node (older than the \
             resume window or past the log's retention); fetch history",
            gaps.len()
        ),
        origins: gaps,
    });
    Ok(Step { messages: Vec::new(), discontinuity, next: start, at_end: false, scanned: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(origin: &str, epoch: u64, seq: u64) -> OriginPosition {
        OriginPosition { origin: origin.into(), epoch, seq }
    }
    fn msg(origin: &str, epoch: u64, seq: u64) -> Message {
        Message {
            origin: origin.into(),
            origin_epoch: epoch,
            origin_seq: seq,
            ..Message::default()
        }
    }

    #[test]
    fn vector_covers_what_the_client_had() {
        let v = [pos("a/1", 5, 10), pos("b/1", 7, 0)];
        assert!(covers(&v, &msg("a/1", 5, 10)));
        assert!(covers(&v, &msg("a/1", 4, 99)), "an older epoch of a known origin");
        assert!(!covers(&v, &msg("a/1", 5, 11)));
        assert!(!covers(&v, &msg("a/1", 6, 1)), "a newer epoch starts anew");
        assert!(!covers(&v, &msg("b/1", 7, 1)));
        assert!(!covers(&v, &msg("c/1", 1, 1)), "an origin the client never saw");
    }
}
