#!/usr/bin/env bash
# WebSocket against QUIC on this machine, the same `volna bench` scenarios
# through each transport of one broker (BENCHMARKS.md, "WebSocket"):
#   scripts/bench-websocket.sh [OUT_DIR]        (default bench-results/)
# 10,000 idle connections (memory per idle connection), fan-out at full
# speed with 100 and 1,000 subscribers, p99 at 1,000 subscribers × 50
# msg/s; a fresh broker for each transport. Writes one JSON line per run to OUT_DIR/websocket.jsonl.
# Every run checks every delivery: a lost, duplicated or reordered message
# fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
out="${1:-bench-results}"
mkdir -p "$out"
results="$out/websocket.jsonl"
: > "$results"

CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo build -q -p volna-broker -p volna-cli --bins
bin="$CARGO_TARGET_DIR/debug"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

addr=127.0.0.1:17700 http=127.0.0.1:17701 admin=bench-admin-token-0123456789
broker=""
# A fresh broker for each transport: memory per idle connection is the
# RSS growth of a broker that held no connections before.
start_broker() {
    rm -rf "$work/data"
    VOLNA_LIMITS__HANDSHAKES_PER_IP_PER_SEC=0 \
    VOLNA_LOG=warn VOLNA_ADMIN__TOKEN="$admin" "$bin/volna-broker" --data-dir "$work/data" \
        --listen "$addr" --websocket "$addr" --http "$http" --durability wal 2>>"$work/broker.log" &
    broker=$!
    pids+=("$broker")
    for _ in $(seq 1 100); do
        curl -sf "http://$http/readyz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "the broker did not start: $(tail -5 "$work/broker.log")" >&2
    return 1
}
stop_broker() {
    kill "$broker"
    # The ports are free for the next one once it has exited.
    while kill -0 "$broker" 2>/dev/null; do sleep 0.1; done
}

run() { # transport, label, then volna bench arguments
    local transport="$1" label="$2"; shift 2
    local over=()
    [ "$transport" = websocket ] && over=(--websocket "wss://$addr/ws" --websocket-only)
    local line
    line="$("$bin/volna" --server "$addr" "${over[@]}" --ca "$work/data/dev-cert.pem" \
        --http "$http" --admin-token "$admin" bench "$@" --json)"
    echo "{\"transport\":\"$transport\",\"label\":\"$label\",\"result\":$line}" >> "$results"
    python3 - "$line" "$transport" "$label" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
extra = ""
per_connection = r.get("extra", {}).get("broker_rss_per_connection_bytes")
if per_connection:
    extra = f"  {per_connection / 1000:.1f} KB/conn"
print(f"{sys.argv[2]:>9} {sys.argv[3]:>14}  {r.get('deliveries_per_sec', 0):>12,.0f} deliveries/s"
      f"  p99 {r.get('latency_us', {}).get('p99', 0):>9,} us  lost {r.get('lost', 0)}{extra}")
PY
}

for transport in quic websocket; do
    start_broker
    # Idle connections first, while nothing else has grown the heap.
    run "$transport" idle-10k connections --connections "${VOLNA_BENCH_CONNECTIONS:-10000}" --hold-secs 10
    run "$transport" fanout-s100 fanout --subscribers 100 --messages 20000
    run "$transport" fanout-s1000 fanout --subscribers 1000 --messages 2000
    run "$transport" p99-s1000-50 fanout --subscribers 1000 --messages 500 --rate 50
    stop_broker
done
echo "results: $results"
