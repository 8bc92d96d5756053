//! Replication between Tern nodes.
//!
//! This crate will hold the backbone (see `DESIGN.md`, "Backbone"): a sans-IO replication
//! core (per-origin sequences, gap repair, catch-up, interest routing) driven by a thin
//! quinn/tokio transport. It is empty until the backbone issue lands; the edge runs as a
//! single node meanwhile.
