#!/usr/bin/env bash
# The whole test suite: formatting, lints, the docs, every unit, property and
# integration test of the workspace, and each criterion benchmark run once.
set -euo pipefail
cd "$(dirname "$0")/.."
# Strict unless told otherwise: a test whose Chromium, Node, tmpfs mount or
# Docker engine is missing fails instead of passing unseen. CI runs this
# script; a developer's bare `cargo nextest run` (no CI) still skips them.
export CI="${CI:-true}"
VOLNA_NEED_NEXTEST=1 VOLNA_NEED_BROWSER=1 source scripts/prereqs.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The crate docs are part of the code: no broken or private links.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
cargo nextest run --workspace --locked --no-fail-fast
# Benchmarks in test mode: each runs once, so they keep compiling and working.
cargo test --workspace --benches --locked
# The quick start's scripts use what was just built: nothing may be left to
# compile (a second feature set would cost a newcomer minutes).
if cargo build --workspace --all-targets --locked 2>&1 | grep -E '^ *Compiling'; then
    echo "volna: the quick start would compile the crates above again" >&2
    exit 1
fi
# The container set-up: image, compose, load generator (skipped without Docker).
scripts/docker-test.sh
