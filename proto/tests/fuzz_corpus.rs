//! Replays the `decode` fuzz target's corpus (`fuzz/corpus/decode`): every
//! input the fuzzer kept, including any that once found a bug, is checked
//! again on every test run, without a nightly toolchain.

use std::path::Path;

#[test]
fn the_decode_corpus_still_round_trips() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).expect("the corpus directory") {
        let path = entry.expect("a corpus entry").path();
        let data = std::fs::read(&path).expect("a corpus file");
        volna_proto::fuzzing::decode_round_trips(&data);
        replayed += 1;
    }
    assert!(replayed > 0, "no corpus in {}", dir.display());
}
