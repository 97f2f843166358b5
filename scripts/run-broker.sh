#!/usr/bin/env bash
# Runs the broker on its embedded defaults (data in ./volna-data, QUIC on
# UDP 7400, health on 127.0.0.1:7401); extra arguments go to volna-broker.
# Uses the workspace build the test command makes (built first if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
volna_build
exec "$CARGO_TARGET_DIR/debug/volna-broker" "$@"
