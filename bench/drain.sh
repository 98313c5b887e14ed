#!/usr/bin/env bash
# An outage and the recovery from it: records N Plivo callbacks while the hand-off upstream is
# down (a closed port), restarts the gateway with a live upstream (the bench's bare server on
# the other core), and prints the outbox gauges and the gateway's RSS each second until every
# event is delivered.
#
#   bench/drain.sh                    # N=300000
#   N=1000000 bench/drain.sh
#
# Environment (defaults): N (300000) SERVER_CPU (0) CLIENT_CPU (1) SINK_PORT (39998)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-300000}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
SINK_PORT=${SINK_PORT:-39998}
cargo build --release --bins --quiet
data=$(mktemp -d)
log="$data/server.log"
trap 'kill $srv $sink 2>/dev/null || true; rm -rf "$data"' EXIT
target/release/callgate-bench provision --data-dir "$data" --public-url https://gw.bench.example --numbers 20 >/dev/null
taskset -c "$CLIENT_CPU" target/release/callgate-bench baseline --listen "127.0.0.1:$SINK_PORT" >/dev/null 2>&1 &
sink=$!
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start() {
  CALLGATE_DATA_DIR=$data CALLGATE_LISTEN=127.0.0.1:$port CALLGATE_PUBLIC_URL=https://gw.bench.example \
    EXOTEL_ALLOWED_IPS=127.0.0.1/32 CALLGATE_LOG=warn CALLGATE_UPSTREAM_URL=$1 \
    taskset -c "$SERVER_CPU" target/release/callgate serve >>"$log" 2>&1 &
  srv=$!
  until curl -fs "http://127.0.0.1:$port/ready" >/dev/null; do sleep 0.01; done
}
gauges() {
  local m
  m=$(curl -s "http://127.0.0.1:$port/metrics")
  echo "queued $(awk '/^callgate_outbox_queued /{print $2}' <<<"$m")" \
    "parked $(awk '/^callgate_outbox_parked /{print $2}' <<<"$m")" \
    "rss_kib $(awk '/VmRSS/{print $2}' "/proc/$srv/status")"
}
start http://127.0.0.1:9
taskset -c "$CLIENT_CPU" target/release/callgate-bench run --target "http://127.0.0.1:$port" \
  --provision "$data/bench-provision.json" --scenario plivo-status --connections 64 --duration 600 \
  --warmup 0 --requests "$N" 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print("recorded", d["completed_total"], "at", round(d["requests_per_sec"]), "/s, p99", d["latency_ms"]["p99"], "ms")'
sleep 1
echo "upstream down: $(gauges)"
kill -TERM $srv; wait $srv || true
t0=$(date +%s%N)
start "http://127.0.0.1:$SINK_PORT/hook"
while :; do
  g=$(gauges)
  echo "$(( ($(date +%s%N) - t0) / 1000000 )) ms after the restart: $g"
  [[ $g == "queued 0 parked 0 "* ]] && break
  sleep 1
done
