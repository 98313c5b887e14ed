#!/usr/bin/env bash
# Memory and start-up at a million events: records N Plivo callbacks (server on one core, the
# generator on the other), prints the RSS right after and 15 s later with the outbox gauges,
# then the time to /ready of 5 clean restarts, of a start after kill -9, and of a start with
# the index snapshot deleted (a full journal scan).
#
#   bench/million.sh                              # N=1050000, no hand-off upstream
#   UPSTREAM=http://127.0.0.1:9 bench/million.sh  # against a down upstream
#
# Environment (defaults): N (1050000) UPSTREAM (unset) SERVER_CPU (0) CLIENT_CPU (1)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1050000}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
cargo build --release --bins --quiet
data=$(mktemp -d)
srv=
trap 'kill -KILL $srv 2>/dev/null || true; rm -rf "$data"' EXIT
target/release/callgate-bench provision --data-dir "$data" --public-url https://gw.bench.example --numbers 20 >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start() {
  env CALLGATE_DATA_DIR="$data" CALLGATE_LISTEN="127.0.0.1:$port" CALLGATE_PUBLIC_URL=https://gw.bench.example \
    EXOTEL_ALLOWED_IPS=127.0.0.1/32 CALLGATE_LOG=warn ${UPSTREAM:+CALLGATE_UPSTREAM_URL=$UPSTREAM} \
    taskset -c "$SERVER_CPU" target/release/callgate serve >>"$data/server.log" 2>&1 &
  srv=$!
  t0=$(date +%s%N)
  until curl -fs "http://127.0.0.1:$port/ready" >/dev/null; do sleep 0.002; done
  ready_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
}
rss() { awk '/VmRSS/{print $2 " KiB"}' "/proc/$srv/status"; }
gauges() { curl -s "http://127.0.0.1:$port/metrics" | awk '/^callgate_outbox/{printf "%s %s ", $1, $2}'; }
start
taskset -c "$CLIENT_CPU" target/release/callgate-bench run --target "http://127.0.0.1:$port" \
  --provision "$data/bench-provision.json" --scenario plivo-status --connections 64 --duration 600 \
  --warmup 0 --requests "$N" 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print("recorded", d["completed_total"], "at", round(d["requests_per_sec"]), "/s; latency ms", d["latency_ms"])'
echo "journal: $(du -sh "$data/db/events" | cut -f1)"
echo "RSS right after: $(rss); $(gauges)"
sleep 15
echo "RSS 15 s later: $(rss)"
kill -TERM $srv; wait $srv || true
for run in 1 2 3 4 5; do
  start
  echo "clean restart $run: ready in $ready_ms ms; RSS $(rss)"
  kill -TERM $srv; wait $srv || true
done
start
kill -KILL $srv; wait $srv 2>/dev/null || true
start
echo "start after kill -9: ready in $ready_ms ms; RSS $(rss)"
kill -KILL $srv; wait $srv 2>/dev/null || true
rm -f "$data/db/events/index.snapshot"
start
echo "start without the snapshot: ready in $ready_ms ms; RSS $(rss)"
kill -TERM $srv; wait $srv || true
