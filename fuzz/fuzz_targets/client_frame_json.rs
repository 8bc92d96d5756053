//! Fuzz target: see `tern_edge::fuzzing::client_frame_json`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern_edge::fuzzing::client_frame_json(data));
