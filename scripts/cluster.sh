#!/usr/bin/env bash
# A three-node Volna cluster on 127.0.0.1, for development:
#
#   scripts/cluster.sh up      etcd + brokers 1, 2, 3 (built first if needed)
#   scripts/cluster.sh down    stops them (by PID), keeps their data
#   scripts/cluster.sh status  the cluster as node 1 sees it
#
# `up` prints, for scripts:
#   ca=<pem>                    one development CA signs every node's device
#                               certificate: trust it (the peer links use
#                               their own CA, cluster-ca.pem, and peer-<id>)
#   node=<id> quic=<host:port> http=<host:port> pid=<pid> data=<dir>
#
# Environment: VOLNA_CLUSTER_DIR (default /tmp/volna-cluster) holds data,
# logs, certificates and PIDs; VOLNA_CLUSTER_PORT (default 7410) is node 1's
# QUIC port — node n uses PORT+10(n-1) for QUIC, +1 HTTP, +2 inter-node;
# etcd listens on PORT+90 (clients) and PORT+91 (peers).
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${VOLNA_CLUSTER_DIR:-/tmp/volna-cluster}"
base="${VOLNA_CLUSTER_PORT:-7410}"
nodes=3
etcd_client=$((base + 90))
etcd_peer=$((base + 91))

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_http() { # url seconds
    local deadline=$((SECONDS + $2))
    until curl -fsS "$1" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            return 1
        fi
        sleep 0.2
    done
}

up() {
    source scripts/prereqs.sh
    volna_build
    local bin="$CARGO_TARGET_DIR/debug"
    mkdir -p "$dir"
    # Certificates from before peer and public ones were apart are
    # replaced (their device key was a cluster credential).
    if [ ! -f "$dir/certs/ca.pem" ] || [ ! -f "$dir/certs/cluster-ca.pem" ]; then
        rm -rf "$dir/certs"
        "$bin/volna-broker" dev-cluster-certs --out "$dir/certs" --nodes "$nodes" >/dev/null
    fi
    if ! running "$dir/etcd.pid"; then
        etcd --name volna-dev --data-dir "$dir/etcd" \
            --listen-client-urls "http://127.0.0.1:$etcd_client" \
            --advertise-client-urls "http://127.0.0.1:$etcd_client" \
            --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
            --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
            --initial-cluster "volna-dev=http://127.0.0.1:$etcd_peer" \
            >"$dir/etcd.log" 2>&1 &
        echo $! >"$dir/etcd.pid"
    fi
    wait_http "http://127.0.0.1:$etcd_client/health" 30 || {
        echo "cluster.sh: etcd did not start; see $dir/etcd.log" >&2
        exit 1
    }
    for n in $(seq 1 $nodes); do
        local quic=$((base + 10 * (n - 1)))
        local data="$dir/node-$n"
        mkdir -p "$data"
        cat >"$data/volna.toml" <<EOF
data_dir = "$data"
listen = "127.0.0.1:$quic"
http = "127.0.0.1:$((quic + 1))"

[tls]
cert = "$dir/certs/node-$n.pem"
key = "$dir/certs/node-$n.key"

[auth]
mode = "none"

[admin]
token = "${VOLNA_ADMIN_TOKEN:-volna-dev-admin-token}"

[cluster]
node_id = $n
name = "dev"
etcd_endpoints = ["http://127.0.0.1:$etcd_client"]
peer_listen = "127.0.0.1:$((quic + 2))"
partitions = ${VOLNA_CLUSTER_PARTITIONS:-16}
replicas = 3

[cluster.tls]
ca = "$dir/certs/cluster-ca.pem"
cert = "$dir/certs/peer-$n.pem"
key = "$dir/certs/peer-$n.key"
EOF
        if ! running "$data/pid"; then
            VOLNA_LOG="${VOLNA_LOG:-info,openraft=warn}" "$bin/volna-broker" --config "$data/volna.toml" \
                >>"$data/broker.log" 2>&1 &
            echo $! >"$data/pid"
        fi
    done
    echo "ca=$dir/certs/ca.pem"
    for n in $(seq 1 $nodes); do
        local quic=$((base + 10 * (n - 1)))
        local data="$dir/node-$n"
        wait_http "http://127.0.0.1:$((quic + 1))/readyz" 60 || {
            echo "cluster.sh: node $n is not ready; see $data/broker.log" >&2
            exit 1
        }
        echo "node=$n quic=127.0.0.1:$quic http=127.0.0.1:$((quic + 1)) pid=$(cat "$data/pid") data=$data"
    done
}

stop_pid() { # pidfile
    if running "$1"; then
        local pid
        pid=$(cat "$1")
        kill -TERM "$pid"
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$1"
}

down() {
    for n in $(seq 1 $nodes); do
        stop_pid "$dir/node-$n/pid"
    done
    stop_pid "$dir/etcd.pid"
}

case "${1:-}" in
up) up ;;
down) down ;;
status)
    source scripts/prereqs.sh
    "$CARGO_TARGET_DIR/debug/volna" --http "127.0.0.1:$((base + 1))" \
        --admin-token "${VOLNA_ADMIN_TOKEN:-volna-dev-admin-token}" cluster status
    ;;
*)
    echo "usage: scripts/cluster.sh up|down|status" >&2
    exit 2
    ;;
esac
