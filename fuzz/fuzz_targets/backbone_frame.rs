//! Fuzz target: see `tern_edge::fuzzing::backbone_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern_edge::fuzzing::backbone_frame(data));
