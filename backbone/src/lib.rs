//! Replication between Tern nodes.
//!
//! - [`core`]: the replication state machine, sans-IO (no sockets, no tasks, no clock
//!   reads): frames and time go in through `handle_*`, frames to send and events come out of
//!   `poll_*`. It is what the delivery contract rests on — per-origin order, gap repair,
//!   exactly-once, catch-up after a link returns, explicit discontinuities — and it is tested
//!   deterministically under loss, duplication, reordering, partitions and restarts
//!   (`tests/faults.rs`).
//!
//! Still to come (see the backbone issue): the quinn/rustls transport that drives the core
//! between real nodes, interest routing, and the edge integration.

pub mod certs;
pub mod core;
pub mod transport;
pub mod wire;
