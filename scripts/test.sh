#!/usr/bin/env bash
# The whole test suite: formatting, lints, every unit, property and
# integration test of the workspace, and each criterion benchmark run once.
set -euo pipefail
cd "$(dirname "$0")/.."
VOLNA_NEED_NEXTEST=1 source scripts/prereqs.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --no-fail-fast
# Benchmarks in test mode: each runs once, so they keep compiling and working.
cargo test -p volna-benches --benches --locked
# The container set-up: image, compose, load generator (skipped without Docker).
scripts/docker-test.sh
