//! Every integration test of this crate, built as one test binary (one link instead of
//! one per file: see the README's note on CI time). Each file is a module; run one with
//! `cargo test -p tern-backbone --test integration FILE::`.

mod faults;
mod interest;
mod presence_faults;
