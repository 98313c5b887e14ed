#!/usr/bin/env bash
# Memory and start-up at a million events: records N Plivo callbacks (server on one core, the
# generator on the other), prints the RSS right after and 15 s later with the outbox gauges,
# then the time to /ready of 5 clean restarts, of a start after kill -9, of one after a kill -9
# that follows 3 s of load, and of a start with the index snapshot deleted (a full journal scan).
#
#   bench/million.sh                              # N=1050000, no hand-off upstream
#   UPSTREAM=http://127.0.0.1:9 bench/million.sh  # against a down upstream
#
# Environment (defaults): N (1050000) UPSTREAM (unset) and those of bench/lib.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
N=${N:-1050000}
cargo build --release --bins --quiet
data=$(mktemp -d)
server=
trap 'kill -KILL $server 2>/dev/null || true; rm -rf "$data"' EXIT
provision "$data"
port=$(free_port)
# start: the gateway on the data dir; sets $ready_ms, the time from launch to /ready.
start() {
    local t0
    t0=$(date +%s%N)
    gateway_start "$data" "$port" "$data/server.log" ${UPSTREAM:+CALLGATE_UPSTREAM_URL=$UPSTREAM}
    wait_for "http://127.0.0.1:$port/ready"
    ready_ms=$((($(date +%s%N) - t0) / 1000000))
}
rss() { echo "$(rss_kib "$server") KiB"; }
gauges() { curl -s "http://127.0.0.1:$port/metrics" | awk '/^callgate_outbox/{printf "%s %s ", $1, $2}'; }
start
fire plivo-status "$port" "$data" --connections 64 --duration 600 --warmup 0 --requests "$N" 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print("recorded", d["completed_total"], "at", round(d["requests_per_sec"]), "/s; latency ms", d["latency_ms"])'
echo "journal: $(du -sh "$data/db/events" | cut -f1)"
echo "RSS right after: $(rss); $(gauges)"
sleep 15
echo "RSS 15 s later: $(rss)"
stop "$server"
for run in 1 2 3 4 5; do
    start
    echo "clean restart $run: ready in $ready_ms ms; RSS $(rss)"
    stop "$server"
done
start
kill -KILL "$server"
wait "$server" 2>/dev/null || true
start
echo "start after kill -9: ready in $ready_ms ms; RSS $(rss)"
# A crash under load: the frames written since the index was last saved (checked every 5 s,
# saved from 50,000 frames on, so at this rate up to about 5 s of them) are read again at the
# next start.
fire plivo-status "$port" "$data" --connections 64 --duration 3 --warmup 0 --requests 400000 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print("then", d["completed_total"], "more recorded in 3 s")'
kill -KILL "$server"
wait "$server" 2>/dev/null || true
start
echo "start after kill -9 right after them: ready in $ready_ms ms; RSS $(rss)"
kill -KILL "$server"
wait "$server" 2>/dev/null || true
rm -f "$data/db/events/index.snapshot"
start
echo "start without the snapshot: ready in $ready_ms ms; RSS $(rss)"
stop "$server"
