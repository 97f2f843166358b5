#!/usr/bin/env bash
# Runs one fuzz target for a while and keeps what it finds:
#   scripts/fuzz.sh decode|session [SECONDS]     (default 60)
# New corpus entries land in fuzz/corpus/TARGET (replayed by the normal test
# suite); a crash is written to fuzz/artifacts/TARGET and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
target="${1:?usage: scripts/fuzz.sh decode|session [seconds]}"
seconds="${2:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "volna: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes flags that only nightly compilers accept; the machine's
# stable compiler accepts them too when told it is bootstrapping itself.
# No sanitizer: Volna's crates forbid unsafe code, and coverage-guided
# speed finds more here than ASan's checks of dependencies would.
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$HOME/.cache/volna-fuzz-target"
mkdir -p "fuzz/corpus/$target"
cd fuzz
cargo fuzz run --sanitizer none "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -timeout=10
# Keep the corpus small: only inputs that add coverage.
cargo fuzz cmin --sanitizer none "$target" "corpus/$target"
