//! Criterion micro-benchmarks of Volna's hot path, one file per part
//! measured (`benches/codec.rs`, `benches/fanout.rs`, `benches/log.rs`).
//! `cargo bench -p volna-benches` runs them; `cargo test -p volna-benches
//! --benches` runs each once, which is how CI keeps them compiling and
//! working.
