#!/usr/bin/env bash
# Builds the image volna:dev: the base image when missing (from Debian's
# packages), the binaries (the workspace's one build, so nothing is
# compiled a second time), then the image.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
scripts/docker-base.sh
volna_build
mkdir -p docker/dist
cp "$CARGO_TARGET_DIR/debug/volna-broker" "$CARGO_TARGET_DIR/debug/volna" docker/dist/
# etcd for the compose `cluster` profile: Debian's build (prereqs.sh
# installs etcd-server), needing only libc.
cp "$(command -v etcd)" docker/dist/
docker build --quiet -t volna:dev . >/dev/null
echo "volna: built image volna:dev" >&2
