//! Every integration test of this crate, built as one test binary (one link instead of
//! one per file: see the README's note on CI time). Each file is a module; run one with
//! `cargo test -p tern-edge --test integration FILE::`.

mod auth;
mod backbone;
mod bad_input;
mod common;
mod cors;
mod fanout;
mod history;
mod http_sessions;
mod large_reads;
mod limits;
mod liveness;
mod presence;
mod protocol;
mod rates;
mod resume;
mod sse;
mod tls;
