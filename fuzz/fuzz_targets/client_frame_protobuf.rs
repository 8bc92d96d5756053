//! Fuzz target: see `tern_edge::fuzzing::client_frame_protobuf`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern_edge::fuzzing::client_frame_protobuf(data));
