#!/usr/bin/env bash
# An outage and the recovery from it: records N Plivo callbacks while the hand-off upstream is
# down (a closed port), restarts the gateway with a live upstream (the bench's bare server on
# the other core), and prints the outbox gauges and the gateway's RSS each second until every
# event is delivered.
#
#   bench/drain.sh                    # N=300000
#   N=1000000 bench/drain.sh
#
# Environment (defaults): N (300000) and those of bench/lib.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
N=${N:-300000}
cargo build --release --bins --quiet
data=$(mktemp -d)
log="$data/server.log"
server=
sink=
trap 'kill $server $sink 2>/dev/null || true; rm -rf "$data"' EXIT
provision "$data"
sink_port=$(free_port)
bare_start "$CLIENT_CPU" "$sink_port" /dev/null
sink=$bare
port=$(free_port)
start() {
    gateway_start "$data" "$port" "$log" CALLGATE_UPSTREAM_URL="$1"
    wait_for "http://127.0.0.1:$port/ready"
}
gauges() {
    local m
    m=$(curl -s "http://127.0.0.1:$port/metrics")
    echo "queued $(awk '/^callgate_outbox_queued /{print $2}' <<<"$m")" \
        "parked $(awk '/^callgate_outbox_parked /{print $2}' <<<"$m")" \
        "rss_kib $(rss_kib "$server")"
}
start http://127.0.0.1:9
fire plivo-status "$port" "$data" --connections 64 --duration 600 --warmup 0 --requests "$N" 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print("recorded", d["completed_total"], "at", round(d["requests_per_sec"]), "/s, p99", d["latency_ms"]["p99"], "ms")'
sleep 1
echo "upstream down: $(gauges)"
stop "$server"
t0=$(date +%s%N)
start "http://127.0.0.1:$sink_port/hook"
while :; do
    g=$(gauges)
    echo "$((($(date +%s%N) - t0) / 1000000)) ms after the restart: $g"
    [[ $g == "queued 0 parked 0 "* ]] && break
    sleep 1
done
