#!/usr/bin/env bash
# Builds the image volna:dev: the base image when missing (from Debian's
# packages), the binaries (with the workspace's one build profile, so
# RocksDB is not compiled a second time), then the image.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
scripts/docker-base.sh
cargo build --locked -p volna-broker -p volna-cli --bin volna-broker --bin volna
mkdir -p docker/dist
cp "$CARGO_TARGET_DIR/debug/volna-broker" "$CARGO_TARGET_DIR/debug/volna" docker/dist/
docker build --quiet -t volna:dev . >/dev/null
echo "volna: built image volna:dev" >&2
