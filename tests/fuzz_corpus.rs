//! Replays the checked-in fuzz corpus (`fuzz/corpus/TARGET/*`) through the same functions
//! the fuzz targets call (`tern_edge::fuzzing`): every input that ever mattered to the
//! fuzzer keeps returning without a panic, on stable Rust, in every CI run.

use std::path::Path;

type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 5] = [
    ("client_frame_json", tern_edge::fuzzing::client_frame_json),
    ("client_frame_protobuf", tern_edge::fuzzing::client_frame_protobuf),
    ("backbone_frame", tern_edge::fuzzing::backbone_frame),
    ("token", tern_edge::fuzzing::token),
    ("session", tern_edge::fuzzing::session),
];

#[test]
fn every_corpus_input_is_handled_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, run) in TARGETS {
        let dir = root.join(name);
        let mut inputs = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{name}: {} panicked", path.display());
            inputs += 1;
        }
        assert!(inputs >= 5, "{name}: the corpus holds only {inputs} inputs");
        println!("{name}: {inputs} inputs replayed");
    }
}
