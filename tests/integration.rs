//! Every integration test of this crate, built as one test binary (one link instead of
//! one per file: see the README's note on CI time). Each file is a module; run one with
//! `cargo test --test integration FILE::`.

mod chaos;
mod cli;
mod cluster;
mod cluster_script;
mod common;
mod drain;
mod fallback;
mod fuzz_corpus;
mod history_crash;
mod metrics;
mod msrv;
#[cfg(feature = "otlp")]
mod otlp;
mod presence;
mod restart;
