//! Fuzz target: see `tern_edge::fuzzing::session`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern_edge::fuzzing::session(data));
