#!/usr/bin/env bash
# `callgate salvage` at scale: records N Plivo callbacks, damages one byte in the middle of the
# journal's first segment and deletes the index snapshot (a start then refuses the journal),
# and times RUNS salvages of that same damaged journal (each on a fresh copy), its dry run, and
# the start on the salvaged journal, with how many events it lists.
#
#   bench/salvage.sh            # N=1050000, RUNS=3
#
# Environment (defaults): N (1050000) RUNS (3) and those of bench/lib.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
N=${N:-1050000}
RUNS=${RUNS:-3}
cargo build --release --bins --quiet
data=$(mktemp -d)
server=
trap 'kill -KILL $server 2>/dev/null || true; rm -rf "$data"' EXIT
provision "$data"
port=$(free_port)
gateway_start "$data" "$port" "$data/server.log"
wait_for "http://127.0.0.1:$port/ready"
fire plivo-status "$port" "$data" --connections 64 --duration 600 --warmup 0 --requests "$N" 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print("recorded", d["completed_total"])'
stop "$server"
echo "journal: $(du -sh "$data/db/events" | cut -f1) in $(ls "$data/db/events" | grep -c '\.log$') segments"
python3 - "$data/db/events/00000000.log" <<'EOF'
import sys
path = sys.argv[1]
with open(path, "r+b") as f:
    f.seek(0, 2)
    at = f.tell() // 2
    f.seek(at)
    b = f.read(1)
    f.seek(at)
    f.write(bytes([b[0] ^ 0x55]))
print(f"flipped byte {at} of {path.rsplit('/', 1)[1]}")
EOF
rm -f "$data/db/events/index.snapshot"
if env CALLGATE_DATA_DIR="$data" CALLGATE_LOG=error "$CALLGATE" check >/dev/null 2>&1; then
    echo "check passed a damaged journal" >&2
    exit 1
fi
cp -a "$data/db/events" "$data/damaged"
ms() { echo $((($(date +%s%N) - $1) / 1000000)); }
t0=$(date +%s%N)
taskset -c "$SERVER_CPU" env CALLGATE_DATA_DIR="$data" CALLGATE_LOG=warn "$CALLGATE" salvage --dry-run
echo "dry run: $(ms "$t0") ms"
for run in $(seq 1 "$RUNS"); do
    rm -rf "$data/db/events" "$data"/events.damaged-*
    cp -a "$data/damaged" "$data/db/events"
    sync
    t0=$(date +%s%N)
    /usr/bin/time -f "peak RSS %M KiB" taskset -c "$SERVER_CPU" \
        env CALLGATE_DATA_DIR="$data" CALLGATE_LOG=warn "$CALLGATE" salvage
    echo "salvage $run: $(ms "$t0") ms"
done
t0=$(date +%s%N)
gateway_start "$data" "$port" "$data/server.log"
wait_for "http://127.0.0.1:$port/ready"
echo "start on the salvaged journal: ready in $(ms "$t0") ms"
stop "$server"
env CALLGATE_DATA_DIR="$data" CALLGATE_LOG=warn "$CALLGATE" check
