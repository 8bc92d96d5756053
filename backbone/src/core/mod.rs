//! The sans-IO replication core.
//!
//! ```text
//!  local publish ──▶ Replica::publish ──▶ origin log (per channel, epoch, seq 1,2,3…)
//!                                             │ Data
//!                                             ▼
//!  peer frames ──▶ Replica::handle_frame ──▶ receive state per (origin, channel):
//!                                             hold out-of-order, deliver in sequence,
//!                                             Nack gaps, Ack progress, Gone → discontinuity
//!  time ─────────▶ Replica::handle_timeout ─▶ retransmit unacknowledged data, re-Nack, Ack
//!  link up/down ─▶ Replica::handle_link_up ─▶ Hello (what I have of you) → peer resends rest
//!
//!  Replica::poll_transmit ─▶ (peer, Frame)      Replica::poll_event ─▶ Deliver / Discontinuity
//! ```
//!
//! Interest routing: a node sends its own messages of a channel only to the peers that asked
//! for it (`Interest` → `Start`, listed again in `Hello` after a link returns), except for
//! replicate-all namespaces (those with history), which go to every peer. A node gains
//! interest with its first local subscriber ([`Replica::add_interest`]) and withdraws a grace
//! period after the last leaves ([`Replica::remove_interest`]).
//!
//! Frames keep their origin, epoch and sequence wherever they travel, so a later relay can
//! forward them unchanged.

mod frame;
mod presence;
mod replica;

pub use frame::{Frame, Have, Want};
pub use presence::{
    Action, Change, MemberKey, Presence, PresenceConfig, PresenceError, PresenceEvent,
    PresenceFrame,
};
pub use replica::{Config, END_WAIT, Event, OwnLog, PeerState, Replica, Restored, StreamPos};
