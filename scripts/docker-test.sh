#!/usr/bin/env bash
# The container test: build the image, start the compose set-up, run the
# load generator against it, check that it delivered everything, tear it
# down. Skipped, saying so, where there is no Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    echo "docker test: SKIPPED (no Docker engine on this machine)"
    exit 0
fi
scripts/docker-build.sh
project="volna-test-$$"
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose -p "$project" -f docker-compose.yml)
else
    compose=(docker-compose -p "$project" -f docker-compose.yml)
fi
cleanup() { "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

"${compose[@]}" up -d broker
broker_id="$("${compose[@]}" ps -q broker)"
for _ in $(seq 1 120); do
    health="$(docker inspect -f '{{.State.Health.Status}}' "$broker_id")"
    [ "$health" = healthy ] && break
    sleep 1
done
[ "$health" = healthy ] || { docker logs "$broker_id" | tail -20; echo "docker test: broker not healthy"; exit 1; }
summary="$("${compose[@]}" run --rm -T bench)"
echo "docker test: bench summary: $summary"
python3 - "$summary" <<'PY'
import json, sys
s = json.loads(sys.argv[1].strip().splitlines()[-1])
assert s["deliveries_received"] == s["deliveries_expected"] > 0, s
assert s["lost"] == s["duplicates"] == s["out_of_order"] == 0, s
PY
# docker stop sends SIGTERM: the broker must drain and exit 0.
"${compose[@]}" stop -t 20 broker
status="$(docker inspect -f '{{.State.ExitCode}}' "$broker_id")"
[ "$status" = 0 ] || { echo "docker test: broker exited with $status after SIGTERM"; exit 1; }
echo "docker test: 1 passed, 0 failed"
