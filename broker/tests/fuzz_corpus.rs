//! Replays the `session` fuzz target's corpus (`fuzz/corpus/session`): a
//! whole session over each input the fuzzer kept, on every test run.

use std::path::Path;

#[test]
fn the_session_corpus_runs_without_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/session");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).expect("the corpus directory") {
        let path = entry.expect("a corpus entry").path();
        let data = std::fs::read(&path).expect("a corpus file");
        volna_broker::fuzzing::run_session(&data).expect("the harness starts");
        replayed += 1;
    }
    assert!(replayed > 0, "no corpus in {}", dir.display());
}
