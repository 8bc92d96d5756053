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
//! Every node replicates its own messages to every peer (full mesh), keeping each frame's
//! origin, epoch and sequence, so a later relay can forward frames unchanged.

mod frame;
mod replica;

pub use frame::{Frame, Have};
pub use replica::{Config, Event, Persisted, Replica};
