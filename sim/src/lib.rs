//! The Tern latency simulator.
//!
//! This crate will run real edge nodes behind emulated inter-region links (see `DESIGN.md`,
//! "Simulator"). It is empty until the simulator issue lands.
