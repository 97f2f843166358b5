#!/usr/bin/env bash
# Reproduces every figure of BENCHMARKS.md on this machine:
#   scripts/bench-compare.sh [OUT_DIR]        (default bench-results/)
# Builds the broker and the generator with our crates at -O3 (dependencies
# are -O3 already; RocksDB is not rebuilt), starts a broker on a fresh data
# directory with durability "wal" and, when `nats-server` is installed
# (Debian package nats-server), a NATS server; runs each scenario against
# both and the bare-quinn ceiling; writes one JSON line per run to
# OUT_DIR/results.jsonl and plots OUT_DIR/fanout.svg. Every run checks
# every delivery: a lost, duplicated or reordered message fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
out="${1:-bench-results}"
mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"

CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo build -q -p volna-broker -p volna-cli --bins
bin="$CARGO_TARGET_DIR/debug"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
    # Put our crates back to the test profile's -O1 lazily: the next
    # `cargo build` rebuilds just them.
}
trap cleanup EXIT

quic=127.0.0.1:17600 http=127.0.0.1:17601 admin=bench-admin-token-0123456789
# The per-address handshake limit is for the internet; every bench
# connection comes from 127.0.0.1.
VOLNA_LIMITS__HANDSHAKES_PER_IP_PER_SEC=0 \
VOLNA_LOG=warn VOLNA_ADMIN__TOKEN="$admin" "$bin/volna-broker" --data-dir "$work/data" \
    --listen "$quic" --http "$http" --durability wal 2>"$work/broker.log" &
pids+=($!)
for _ in $(seq 1 100); do [ -f "$work/data/dev-cert.pem" ] && break; sleep 0.1; done
nats=""
if command -v nats-server >/dev/null 2>&1; then
    nats-server -a 127.0.0.1 -p 14322 >"$work/nats.log" 2>&1 &
    pids+=($!)
    nats="nats://127.0.0.1:14322"
    sleep 0.5
fi

run() { # label, then volna bench arguments
    local label="$1"; shift
    local line status=0
    line="$("$bin/volna" --server "$quic" --ca "$work/data/dev-cert.pem" --http "$http" \
        --admin-token "$admin" bench "$@" --json)" || status=$?
    [ -n "$line" ] || { echo "$label: no result" >&2; return 1; }
    echo "{\"label\":\"$label\",\"result\":$line}" >> "$results"
    python3 - "$line" "$label" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"{sys.argv[2]:>24}  S={r['subscribers']:<6} {r['deliveries_per_sec']:>12,.0f} deliveries/s"
      f"  p99 {r['latency_us']['p99']:>9,} us  lost {r['lost']}")
PY
    # NATS core drops messages under overload by design: recorded, not fatal.
    if [ "$status" -ne 0 ] && [ "${label#nats}" = "$label" ]; then
        echo "$label: deliveries were lost, duplicated or reordered" >&2
        return 1
    fi
}

# Fan-out at full speed, 64-byte messages, about 2 M deliveries a point.
for s in 1 10 100 1000 5000; do
    m=$(( 2000000 / s )); [ "$m" -gt 100000 ] && m=100000; [ "$m" -lt 400 ] && m=400
    run volna --subscribers "$s" --messages "$m" fanout
    run ceiling --subscribers "$s" --messages "$m" ceiling
    [ -n "$nats" ] && run nats --subscribers "$s" --messages "$m" --nats "$nats" fanout
done
# Latency at fixed rates.
run "volna-p99-s1-10k" fanout --subscribers 1 --messages 50000 --rate 10000
run "volna-p99-s100-500" fanout --subscribers 100 --messages 5000 --rate 500
run "volna-p99-s1000-50" fanout --subscribers 1000 --messages 500 --rate 50
if [ -n "$nats" ]; then
    run "nats-p99-s1-10k" fanout --subscribers 1 --messages 50000 --rate 10000 --nats "$nats"
    run "nats-p99-s100-500" fanout --subscribers 100 --messages 5000 --rate 500 --nats "$nats"
    run "nats-p99-s1000-50" fanout --subscribers 1000 --messages 500 --rate 50 --nats "$nats"
fi
# The other scenarios.
run chats chats --channels 500 --subscribers 4 --messages 200
[ -n "$nats" ] && run nats-chats chats --channels 500 --subscribers 4 --messages 200 --nats "$nats"
run "volna-chats-10" chats --channels 500 --subscribers 4 --messages 100 --rate 5000
[ -n "$nats" ] && run "nats-chats-10" chats --channels 500 --subscribers 4 --messages 100 --rate 5000 --nats "$nats"
run catchup catchup --subscribers 10 --messages 200000
# Idle connections and reconnect storms at the sizes of issue 13's table
# (VOLNA_BENCH_CONNECTIONS / VOLNA_BENCH_STORM for a quicker run).
run connections connections --connections "${VOLNA_BENCH_CONNECTIONS:-100000}" --hold-secs 10 --timeout-secs 900
run storm storm --connections "${VOLNA_BENCH_STORM:-10000}" --messages 400 --rate 20

python3 -c "import matplotlib" 2>/dev/null || pip install --quiet matplotlib
python3 scripts/plot-bench.py "$results" "$out/fanout.svg"
echo "results: $results, plot: $out/fanout.svg"
