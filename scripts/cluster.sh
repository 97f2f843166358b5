#!/usr/bin/env bash
# A Volna cluster of N nodes (3 by default) on 127.0.0.1, for development:
#
#   scripts/cluster.sh up      etcd + brokers 1..N (built first if needed)
#   scripts/cluster.sh down    stops them (by PID), keeps their data
#   scripts/cluster.sh status  the cluster as the first running node sees it
#
# `up` prints, for scripts:
#   ca=<pem>                    one development CA signs every node's device
#                               certificate: trust it (the peer links use
#                               their own CA, cluster-ca.pem, and peer-<id>)
#   node=<id> quic=<host:port> http=<host:port> pid=<pid> data=<dir>
#
# Environment: VOLNA_CLUSTER_NODES (default 3, at most 9) is N, and each
# partition has VOLNA_CLUSTER_REPLICAS (default min(3, N)) replicas: 4
# nodes (or 2 with 1 replica) try edges, moves and device forwarding with
# more nodes than replicas; `up` again with a larger N
# joins the new nodes to a running cluster (a smaller N stops none: `down`
# stops every node that runs in the directory, whatever N). The
# partition and replica counts are fixed when the cluster is first created
# in its directory: use another one to change them.
# VOLNA_CLUSTER_DIR (default /tmp/volna-cluster) holds data, logs,
# certificates and PIDs; VOLNA_CLUSTER_PORT (default 7410) is node 1's
# QUIC port — node n uses PORT+10(n-1) for QUIC, +1 HTTP, +2 inter-node;
# etcd listens on PORT+90 (clients) and PORT+91 (peers).
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${VOLNA_CLUSTER_DIR:-/tmp/volna-cluster}"
base="${VOLNA_CLUSTER_PORT:-7410}"
# Nodes take ports 10 apart below etcd's, at PORT+90. Certificates are
# issued for every node `up` may start, so a running cluster can grow
# without new CAs.
max_nodes=9
if ! [[ "$base" =~ ^[1-9][0-9]{0,4}$ ]] || [ "$base" -gt $((65535 - 91)) ]; then
    echo "cluster.sh: VOLNA_CLUSTER_PORT=$base is not a port from 1 to $((65535 - 91)) (etcd takes PORT+91)" >&2
    exit 2
fi
etcd_client=$((base + 90))
etcd_peer=$((base + 91))

# VOLNA_CLUSTER_NODES, checked: only `up` needs it.
node_count() {
    local given="${VOLNA_CLUSTER_NODES:-3}" n
    n="${given#"${given%%[!0]*}"}" # no leading zeros (not octal)
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "cluster.sh: VOLNA_CLUSTER_NODES=$given is not a positive integer" >&2
        exit 2
    fi
    if [ "${#n}" -gt 2 ] || [ "$n" -gt $max_nodes ]; then
        echo "cluster.sh: VOLNA_CLUSTER_NODES=$given is more than $max_nodes: node 10 would take etcd's ports (PORT+90, PORT+91)" >&2
        exit 2
    fi
    echo "$n"
}

# The ids of the nodes with a PID file in $dir, in order.
started_nodes() {
    local pidfile
    for pidfile in "$dir"/node-*/pid; do
        [ -f "$pidfile" ] || continue
        pidfile="${pidfile%/pid}"
        echo "${pidfile##*/node-}"
    done | sort -n
}

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
    local nodes replicas n
    nodes=$(node_count)
    replicas="${VOLNA_CLUSTER_REPLICAS:-$((nodes < 3 ? nodes : 3))}"
    if ! [[ "$replicas" =~ ^[1-9][0-9]*$ ]] || ((replicas > nodes)); then
        echo "cluster.sh: VOLNA_CLUSTER_REPLICAS=$replicas is not a count from 1 to $nodes" >&2
        exit 2
    fi
    source scripts/prereqs.sh
    volna_build
    local bin="$CARGO_TARGET_DIR/debug"
    mkdir -p "$dir"
    # Certificates from before peer and public ones were apart, or for
    # fewer nodes, are replaced (the former's device key was a cluster
    # credential); not under running nodes, which trust the old CAs.
    local certs_ok=1
    [ -f "$dir/certs/ca.pem" ] && [ -f "$dir/certs/cluster-ca.pem" ] || certs_ok=0
    for n in $(seq 1 "$nodes"); do
        [ -f "$dir/certs/node-$n.pem" ] && [ -f "$dir/certs/peer-$n.pem" ] || certs_ok=0
    done
    if [ $certs_ok = 0 ]; then
        for n in $(started_nodes); do
            if running "$dir/node-$n/pid"; then
                echo "cluster.sh: $dir/certs has no certificates for $nodes nodes, and node $n runs with the old ones: run scripts/cluster.sh down first (data is kept)" >&2
                exit 1
            fi
        done
        rm -rf "$dir/certs"
        "$bin/volna-broker" dev-cluster-certs --out "$dir/certs" --nodes "$max_nodes" >/dev/null
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
    for n in $(seq 1 "$nodes"); do
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

# Typing indicators: kept in memory by each channel's partition leader.
[namespaces.typing]
persistent = false
retention = { max_messages = 100 }

[cluster]
node_id = $n
name = "dev"
etcd_endpoints = ["http://127.0.0.1:$etcd_client"]
peer_listen = "127.0.0.1:$((quic + 2))"
partitions = ${VOLNA_CLUSTER_PARTITIONS:-16}
replicas = $replicas

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
    for n in $(seq 1 "$nodes"); do
        local quic=$((base + 10 * (n - 1)))
        local data="$dir/node-$n"
        wait_http "http://127.0.0.1:$((quic + 1))/readyz" 60 || {
            echo "cluster.sh: node $n is not ready; see $data/broker.log" >&2
            exit 1
        }
        echo "node=$n quic=127.0.0.1:$quic http=127.0.0.1:$((quic + 1)) pid=$(cat "$data/pid") data=$data"
    done
    for n in $(started_nodes); do
        if [ "$n" -gt "$nodes" ] && running "$dir/node-$n/pid"; then
            echo "cluster.sh: node $n (from a larger VOLNA_CLUSTER_NODES) still runs; scripts/cluster.sh down stops it" >&2
        fi
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

down() { # every node with a PID file, whatever VOLNA_CLUSTER_NODES was
    local n
    for n in $(started_nodes); do
        stop_pid "$dir/node-$n/pid"
    done
    stop_pid "$dir/etcd.pid"
}

status() { # asks the first node that runs
    local n
    for n in $(started_nodes); do
        if running "$dir/node-$n/pid"; then
            source scripts/prereqs.sh
            "$CARGO_TARGET_DIR/debug/volna" --http "127.0.0.1:$((base + 10 * (n - 1) + 1))" \
                --admin-token "${VOLNA_ADMIN_TOKEN:-volna-dev-admin-token}" cluster status
            return
        fi
    done
    echo "cluster.sh: no node runs in $dir (scripts/cluster.sh up starts them)" >&2
    exit 1
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
*)
    echo "usage: scripts/cluster.sh up|down|status" >&2
    exit 2
    ;;
esac
