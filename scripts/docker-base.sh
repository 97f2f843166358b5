#!/usr/bin/env bash
# Builds the base image `volna-base:bookworm` from Debian's packages
# (debootstrap + docker import) when it is missing, so that the Dockerfile
# builds on machines that cannot pull images. With a registry at hand,
# `debian:bookworm-slim` serves the same purpose.
set -euo pipefail

IMAGE="${VOLNA_BASE_IMAGE:-volna-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "volna: installing debootstrap" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap >/dev/null
fi
rootfs="$(mktemp -d)"
trap '$SUDO rm -rf "$rootfs"' EXIT
echo "volna: building $IMAGE with debootstrap (a few minutes, once)" >&2
$SUDO debootstrap --variant=minbase --include=ca-certificates,curl bookworm "$rootfs" "$MIRROR" >/dev/null
$SUDO rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
$SUDO tar -C "$rootfs" -c . | docker import - "$IMAGE" >/dev/null
echo "volna: built $IMAGE" >&2
