#!/usr/bin/env bash
# Alternating A/B runs of gateway builds, with each run's CPU split by thread: what a noisy VM
# needs to tell two builds apart. Per run: fresh data dir, one gateway from the given binary,
# one scenario from the other core; then the worker's and the writer's user and system CPU and
# context switches, the writer's batches, and the run's rate and p99. The order within a pair
# alternates from pair to pair, so whichever runs first does not always win.
#
#   bench/pairs.sh target/release/callgate /tmp/callgate-before
#   PAIRS=5 SCENARIO=telnyx-event REQUESTS=400000 bench/pairs.sh A B
#   EXTRA_B="CALLGATE_COMMIT_LINGER_US=800" bench/pairs.sh target/release/callgate target/release/callgate
#
# Environment (defaults): PAIRS (3) SCENARIO (plivo-status) DURATION (10) WARMUP (2)
# CONNECTIONS (64) REQUESTS (650000) EXTRA_A, EXTRA_B (NAME=VALUE settings for that side's
# gateway) and those of bench/lib.sh. Prints one JSON line per run.
set -euo pipefail
[ $# = 2 ] || { echo "usage: bench/pairs.sh BINARY_A BINARY_B" >&2; exit 2; }
A=$(realpath "$1")
B=$(realpath "$2")
cd "$(dirname "$0")/.."
. bench/lib.sh
PAIRS=${PAIRS:-3}
SCENARIO=${SCENARIO:-plivo-status}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-64}
REQUESTS=${REQUESTS:-650000}
cargo build --release --bin callgate-bench --quiet

data=
server=
sink=
trap 'kill $server $sink 2>/dev/null || true; [ -z "$data" ] || rm -rf "$data"' EXIT
sink_port=$(free_port)
bare_start "$CLIENT_CPU" "$sink_port" /dev/null
sink=$bare
SINK="http://127.0.0.1:$sink_port"

# thread_stats PID: one JSON object per named thread of interest: user and system CPU in
# clock ticks, and voluntary and forced context switches. The comm field may hold spaces, so
# the fields are counted from its closing parenthesis.
thread_stats() {
    python3 - "$1" <<'EOF'
import json, os, sys
out = {}
for tid in os.listdir(f"/proc/{sys.argv[1]}/task"):
    base = f"/proc/{sys.argv[1]}/task/{tid}"
    name = open(f"{base}/comm").read().strip()
    role = "writer" if name == "callgate-writer" else "worker" if name.startswith("actix-server wo") else None
    if role is None:
        continue
    f = open(f"{base}/stat").read().rsplit(")", 1)[1].split()
    st = dict(l.split(":\t") for l in open(f"{base}/status").read().splitlines() if ":\t" in l)
    t = out.setdefault(role, {"utime": 0, "stime": 0, "voluntary": 0, "forced": 0})
    t["utime"] += int(f[11])
    t["stime"] += int(f[12])
    t["voluntary"] += int(st["voluntary_ctxt_switches"])
    t["forced"] += int(st["nonvoluntary_ctxt_switches"])
print(json.dumps(out))
EOF
}

# one LABEL BINARY EXTRA: a run of BINARY; prints its JSON line.
one() {
    local label=$1 bin=$2 extra=$3 port fired threads metrics
    data=$(mktemp -d /tmp/callgate-pairs.XXXXXX)
    provision "$data"
    port=$(free_port)
    # shellcheck disable=SC2046,SC2086 # one word per setting; EXTRA is a list of NAME=VALUE words
    CALLGATE="$bin" gateway_start "$data" "$port" "$data/server.log" $(carrier_apis "$SINK") $extra
    wait_for "http://127.0.0.1:$port/ready"
    fired=$(fire "$SCENARIO" "$port" "$data" --connections "$CONNECTIONS" --duration "$DURATION" \
        --warmup "$WARMUP" --requests "$REQUESTS")
    threads=$(thread_stats "$server")
    metrics=$(curl -fsS "http://127.0.0.1:$port/metrics")
    stop "$server"
    server=
    rm -rf "$data"
    data=
    python3 - "$label" "$bin" "$fired" "$threads" "$metrics" "$(getconf CLK_TCK)" <<'EOF'
import json, sys
label, binary, fired, threads, metrics, tck = sys.argv[1:]
f, t, tck = json.loads(fired), json.loads(threads), int(tck)
m = {l.split()[0]: float(l.split()[1]) for l in metrics.splitlines() if l and not l.startswith("#")}
events = m.get("callgate_journal_batch_events_total", 0)
batches = m.get("callgate_journal_batch_seconds_count", 0)
per = lambda ticks, n: round(ticks * 1e6 / tck / n, 2) if n else None
row = {"side": label, "binary": binary, "req_per_s": f["requests_per_sec"], "p99_ms": f["latency_ms"]["p99"],
       "events": int(events), "batches": int(batches),
       "events_per_batch": round(events / batches, 1) if batches else None,
       "batch_wall_us": round(m.get("callgate_journal_batch_seconds_sum", 0) * 1e6 / batches) if batches else None}
for role, s in t.items():
    row[f"{role}_us_per_event"] = per(s["utime"] + s["stime"], events)
    row[f"{role}_kernel_us_per_event"] = per(s["stime"], events)
    row[f"{role}_us_per_batch"] = per(s["utime"] + s["stime"], batches)
    row[f"{role}_voluntary_per_batch"] = round(s["voluntary"] / batches, 2) if batches else None
    row[f"{role}_forced_per_batch"] = round(s["forced"] / batches, 2) if batches else None
print(json.dumps(row))
EOF
}

for pair in $(seq 1 "$PAIRS"); do
    if [ $((pair % 2)) = 1 ]; then
        one A "$A" "${EXTRA_A:-}"
        one B "$B" "${EXTRA_B:-}"
    else
        one B "$B" "${EXTRA_B:-}"
        one A "$A" "${EXTRA_A:-}"
    fi
done
