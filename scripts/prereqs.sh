#!/usr/bin/env bash
# Installs what building Volna needs beyond a Rust toolchain, only when it is
# missing: clang and libclang (RocksDB's bindings), protoc (the etcd client's
# generated code), etcd (the cluster tests start their own), and for tests
# cargo-nextest and Chromium (the browser tests).
# Sourced by the other scripts; also sets a CARGO_TARGET_DIR that outlives
# clones, so RocksDB's C++ (minutes on two cores) is compiled once.
set -euo pipefail

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/volna-target}"

have_libclang() {
    ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' ||
        compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null
}

missing=()
if ! command -v clang >/dev/null 2>&1 || ! have_libclang; then
    missing+=(clang libclang-dev)
fi
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
# The browser tests drive a headless Chromium (scripts/test.sh asks).
if [ "${VOLNA_NEED_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
    missing+=(chromium)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "volna: installing ${missing[*]} (Debian packages the build and tests need)" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "${VOLNA_NEED_NEXTEST:-0}" = 1 ] && ! cargo nextest --version >/dev/null 2>&1; then
    echo "volna: installing cargo-nextest" >&2
    cargo install cargo-nextest --locked
fi

# The one build of the workspace every script shares: all targets of all
# crates, so that cargo unifies dependency features the same way each time
# and nothing is compiled twice (a `-p` subset would rebuild half of the
# dependency graph with other features). After `scripts/test.sh` it has
# nothing left to do.
volna_build() {
    cargo build --workspace --all-targets --locked --quiet
}

