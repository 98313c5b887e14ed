# shellcheck shell=bash
# Shared by the bench scripts (sourced, not run): where things run, and how a gateway under
# test is provisioned, started, awaited and stopped, so every script measures the same server.
#
# Environment (defaults): SERVER_CPU (0) CLIENT_CPU (1) NUMBERS (20 per carrier)

SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
NUMBERS=${NUMBERS:-20}
PUBLIC_URL=https://gw.bench.example
CALLGATE=target/release/callgate
BENCH=target/release/callgate-bench

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for URL [curl args...]: until the URL answers 2xx, at most 10 s. Polls every 2 ms, so
# the moment it returns is also the moment to time a start-up by.
wait_for() {
    local url=$1 until=$((SECONDS + 10))
    shift
    while [ "$SECONDS" -lt "$until" ]; do
        if curl -fsS -o /dev/null "$@" "$url" 2>/dev/null; then
            return 0
        fi
        sleep 0.002
    done
    echo "no answer from $url" >&2
    return 1
}

# provision DATA_DIR: an organization with NUMBERS numbers per carrier, and the credentials the
# generator signs with in DATA_DIR/bench-provision.json.
provision() {
    "$BENCH" provision --data-dir "$1" --public-url "$PUBLIC_URL" --numbers "$NUMBERS" >/dev/null
}

# gateway_start DATA_DIR PORT LOG [NAME=VALUE...]: `callgate serve` on SERVER_CPU, its output
# appended to LOG, with the extra settings given; sets $server. Returns at once: `wait_for` the
# port's /ready.
gateway_start() {
    local data=$1 port=$2 log=$3
    shift 3
    taskset -c "$SERVER_CPU" env \
        CALLGATE_DATA_DIR="$data" \
        CALLGATE_LISTEN="127.0.0.1:$port" \
        CALLGATE_PUBLIC_URL="$PUBLIC_URL" \
        EXOTEL_ALLOWED_IPS=127.0.0.1 \
        CALLGATE_LOG=warn \
        "$@" \
        "$CALLGATE" serve >>"$log" 2>&1 &
    # shellcheck disable=SC2034 # read by the scripts that source this one
    server=$!
}

# carrier_apis URL: the settings that send every carrier REST call (Telnyx's Call Control answer
# for every incoming call among them) to URL, the bench's stand-in for the carriers; never out.
carrier_apis() {
    local c
    for c in PLIVO VOBIZ TWILIO TELNYX EXOTEL; do
        echo "CALLGATE_${c}_API_URL=$1"
    done
}

# bare_start CPU PORT LOG: the bench's bare actix-web server (the baseline, and the stand-in for
# carriers and upstreams: 200 to everything) on CPU, its output in LOG; sets $bare once it answers.
bare_start() {
    taskset -c "$1" "$BENCH" baseline --listen "127.0.0.1:$2" >"$3" 2>&1 &
    bare=$!
    wait_for "http://127.0.0.1:$2/" -X POST -d ready || {
        kill "$bare" 2>/dev/null
        return 1
    }
}

# stop PID: SIGTERM, then SIGKILL after 20 s (callgate drains in-flight requests first).
stop() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# fire SCENARIO PORT DATA_DIR [callgate-bench run args...]: the generator on CLIENT_CPU against
# the gateway on PORT with the credentials provisioned in DATA_DIR; prints its JSON line.
fire() {
    local scenario=$1 port=$2 data=$3
    shift 3
    taskset -c "$CLIENT_CPU" "$BENCH" run --target "http://127.0.0.1:$port" \
        --provision "$data/bench-provision.json" --scenario "$scenario" "$@"
}

# Server CPU time (user + system) in clock ticks, to turn into CPU per request.
cpu_ticks() {
    awk '{print $14 + $15}' "/proc/$1/stat"
}

rss_kib() {
    awk '/^VmRSS/ {print $2}' "/proc/$1/status"
}
