//! Fuzz target: see `tern_edge::fuzzing::token`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern_edge::fuzzing::token(data));
