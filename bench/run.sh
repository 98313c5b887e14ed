#!/usr/bin/env bash
# Load test of callgate's webhook path against a bare actix-web baseline.
#
# Per run: fresh data dir, `callgate-bench provision`, callgate pinned to one core, every
# scenario fired from the other core, the server's RSS recorded, then the baseline server on
# the same core with the `bare` scenario. Prints medians over the runs, and warns of a scenario
# whose generator kept its own core busy (then the rate may be the generator's).
#
#   bench/run.sh                      # 3 runs x (6 scenarios + bare), 10 s each after 2 s warm-up
#   DURATION=5 WARMUP=1 RUNS=1 bench/run.sh
#
# Environment (defaults): DURATION (10) WARMUP (2) RUNS (3) CONNECTIONS (64) NUMBERS (20 per
# carrier) REQUESTS (700000 unique requests per scenario run: Plivo status at 48,000/s takes 576,000 in 12 s) SCENARIOS (see below)
# UPSTREAM (unset: no hand-off upstream; e.g. http://127.0.0.1:9 for "upstream down")
# VERIFY (1: after each run, criterion's one-verify Ed25519 time on the server's core, for the
# Telnyx target; 0: skip) SERVER_CPU (0) CLIENT_CPU (1) OUT (bench/results/<timestamp>) KEEP_DATA (unset: data dirs removed)
# ISOLATE (unset: one server and data dir per run, so a scenario meets the store and the outbox
# backlog the ones before it left; the order turns by one scenario a run, run 1 as SCENARIOS
# gives it, run 2 from its second, and so on, so that no scenario always comes last; set: a fresh
# data dir and server per scenario, RSS then recorded per scenario; the order turns the same way).
# Each run's order is in OUT/env.txt. UPDOWN (unset; set: ISOLATE, and every scenario of
# every run is run twice in a row, once as above and once with its hand-off upstream down,
# DOWN_URL (http://127.0.0.1:9, a closed port); the order alternates from run to run, and the
# table gives each down row's rate as a fraction of the normal run beside it).
set -euo pipefail

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
RUNS=${RUNS:-3}
CONNECTIONS=${CONNECTIONS:-64}
REQUESTS=${REQUESTS:-700000}
SCENARIOS=${SCENARIOS:-plivo-status plivo-incoming twilio-status telnyx-event exotel-status mix}
DOWN_URL=${DOWN_URL:-http://127.0.0.1:9}
VERIFY=${VERIFY:-1}
if [ -n "${UPDOWN:-}" ]; then
    ISOLATE=1
fi

cd "$(dirname "$0")/.."
. bench/lib.sh
OUT=${OUT:-bench/results/$(date +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"

echo "== building (release)" >&2
cargo build --release --bins
if [ "$VERIFY" = 1 ]; then
    cargo bench --bench verify --no-run
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty tree)')"
    echo "cpus: $(nproc); server on cpu $SERVER_CPU, generator on cpu $CLIENT_CPU"
    echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "duration=${DURATION}s warmup=${WARMUP}s runs=$RUNS connections=$CONNECTIONS numbers=$NUMBERS requests=$REQUESTS"
    echo "upstream: ${UPSTREAM:-none}${UPDOWN:+; each scenario also with the upstream down ($DOWN_URL), alternating}"
} >"$OUT/env.txt"

PIDS=()
DATA_DIRS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    if [ -z "${KEEP_DATA:-}" ]; then
        for d in "${DATA_DIRS[@]}"; do
            rm -rf "$d"
        done
    fi
}
trap cleanup EXIT

# forget PID: stop it and take it off the list the exit trap stops.
forget() {
    stop "$1"
    local kept=()
    for p in "${PIDS[@]}"; do
        [ "$p" = "$1" ] || kept+=("$p")
    done
    PIDS=("${kept[@]}")
}

rss_of() {
    awk '/^VmRSS|^VmHWM/ {printf "%s %s ", $1, $2} END {print ""}' "/proc/$1/status"
}

# start_callgate NAME [UPSTREAM_URL]: fresh data dir, provision, callgate on SERVER_CPU; sets
# $data, $port, $server. The upstream defaults to $UPSTREAM; an empty one means none.
start_callgate() {
    local upstream=${2-${UPSTREAM:-}}
    data=$(mktemp -d /tmp/callgate-bench.XXXXXX)
    DATA_DIRS+=("$data")
    provision "$data"
    port=$(free_port)
    # shellcheck disable=SC2046 # one word per setting
    gateway_start "$data" "$port" "$OUT/server-$1.log" $(carrier_apis "$SINK") \
        ${upstream:+CALLGATE_UPSTREAM_URL=$upstream}
    PIDS+=("$server")
    wait_for "http://127.0.0.1:$port/ready"
}

# The sum of a counter of callgate's /metrics text ($1) over its labels ($2: the name).
counter() {
    awk -v m="$2" 'index($0, m "{") == 1 || $1 == m { s += $NF } END { print s + 0 }' <<<"$1"
}

# callgate's webhook counters: replayed and rejected requests, summed over carriers.
webhook_counts() {
    local m
    m=$(curl -fsS "http://127.0.0.1:$1/metrics" 2>/dev/null || true)
    echo "$(counter "$m" callgate_webhooks_replayed_total) $(counter "$m" callgate_webhooks_rejected_total)"
}

# A stand-in for the carriers' REST APIs on the generator's core: 200 to every call.
sink_port=$(free_port)
bare_start "$CLIENT_CPU" "$sink_port" "$OUT/carrier-sink.log"
PIDS+=("$bare")
SINK="http://127.0.0.1:$sink_port"

read -ra scenario_list <<<"$SCENARIOS"
for run in $(seq 1 "$RUNS"); do
    echo "== run $run/$RUNS" >&2
    # Run N starts from the Nth scenario (wrapping): a scenario that always came late would
    # always meet the biggest store and the most backlog.
    turn=$((${#scenario_list[@]} ? (run - 1) % ${#scenario_list[@]} : 0))
    order=("${scenario_list[@]:turn}" "${scenario_list[@]:0:turn}")
    echo "run $run order: ${order[*]}" >>"$OUT/env.txt"
    [ -n "${ISOLATE:-}" ] || start_callgate "run$run"
    for scenario in "${order[@]}"; do
        # With UPDOWN, each scenario twice: "normal" (UPSTREAM as given, unset by default) and
        # "down"; odd runs start with the normal one.
        modes=normal
        if [ -n "${UPDOWN:-}" ]; then
            if [ $((run % 2)) = 1 ]; then modes="normal down"; else modes="down normal"; fi
        fi
        for mode in $modes; do
            label=$scenario
            upstream=${UPSTREAM:-}
            if [ "$mode" = down ]; then
                label="$scenario@down"
                upstream=$DOWN_URL
            fi
            echo "   $label" >&2
            [ -z "${ISOLATE:-}" ] || start_callgate "run$run-$label" "$upstream"
            # The server idles while the generator builds its pool, so the CPU delta is this
            # scenario's work (plus, without ISOLATE, background work the previous one left).
            before=$(cpu_ticks "$server")
            read -r replayed0 rejected0 <<<"$(webhook_counts "$port")"
            fire "$scenario" "$port" "$data" --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" \
                --requests "$REQUESTS" >"$OUT/run$run-$label.json"
            echo "$(($(cpu_ticks "$server") - before))" >"$OUT/run$run-$label.cpu"
            # Every request is unique and signed: one the server took for a replay (a 200 for
            # an event not recorded) or refused means the run measured something else.
            read -r replayed1 rejected1 <<<"$(webhook_counts "$port")"
            echo "$((replayed1 - replayed0)) $((rejected1 - rejected0))" >"$OUT/run$run-$label.webhooks"
            if [ -n "${ISOLATE:-}" ]; then
                rss_of "$server" >"$OUT/run$run-rss-callgate-$label.txt"
                forget "$server"
            fi
        done
    done
    if [ -z "${ISOLATE:-}" ]; then
        rss_of "$server" >"$OUT/run$run-rss-callgate.txt"
        forget "$server"
    fi

    port=$(free_port)
    bare_start "$SERVER_CPU" "$port" "$OUT/baseline-run$run.log"
    baseline=$bare
    PIDS+=("$baseline")
    echo "   bare (baseline server)" >&2
    before=$(cpu_ticks "$baseline")
    taskset -c "$CLIENT_CPU" "$BENCH" run --target "http://127.0.0.1:$port" --scenario bare \
        --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" >"$OUT/run$run-bare.json"
    echo "$(($(cpu_ticks "$baseline") - before))" >"$OUT/run$run-bare.cpu"
    rss_of "$baseline" >"$OUT/run$run-rss-baseline.txt"
    forget "$baseline"

    if [ "$VERIFY" = 1 ]; then
        # One core's Ed25519 verify rate, on the server's core in the same run: the Telnyx
        # target is a fraction of it.
        echo "   ed25519 verify (criterion, verify/telnyx_tx1)" >&2
        taskset -c "$SERVER_CPU" cargo bench --quiet --bench verify -- telnyx_tx1 \
            --warm-up-time 1 --measurement-time 4 >"$OUT/criterion-run$run.log" 2>&1
        cp target/criterion/verify/telnyx_tx1/new/estimates.json "$OUT/verify-run$run.json"
    fi
done
echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"

python3 - "$OUT" "$(getconf CLK_TCK)" "${scenario_list[@]}" <<'EOF' | tee "$OUT/summary.md"
import glob, json, math, os, re, statistics, sys

out, clk_tck, scenarios = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rows = {}
for path in sorted(glob.glob(os.path.join(out, "run*-*.json"))):
    d = json.load(open(path))
    # The label is the file's: a scenario, `bare`, or `<scenario>@down`.
    run_no, label = re.match(r"run(\d+)-(.+)\.json$", os.path.basename(path)).groups()
    d["run"] = int(run_no)
    cpu = path[: -len(".json")] + ".cpu"
    counts = path[: -len(".json")] + ".webhooks"
    if os.path.exists(counts):
        d["replayed"], d["rejected"] = (int(x) for x in open(counts).read().split())
    if os.path.exists(cpu) and d.get("completed_total"):
        # Server CPU per answered request, warm-up included: robust to a busy machine.
        d["cpu_ms_per_req"] = int(open(cpu).read()) * 1000 / clk_tck / d["completed_total"]
    rows.setdefault(label, []).append(d)

def med(xs):
    return statistics.median(xs) if xs else float("nan")

def rss(kind):
    vals = {"VmRSS:": [], "VmHWM:": []}
    for path in glob.glob(os.path.join(out, f"run*-rss-{kind}*.txt")):
        for k, v in re.findall(r"(Vm\w+:) (\d+)", open(path).read()):
            vals[k].append(int(v))
    return med(vals["VmRSS:"]) / 1024, med(vals["VmHWM:"]) / 1024

print(open(os.path.join(out, "env.txt")).read().strip().replace("\n", "  \n"))
print()
bare_of_run = {d["run"]: d["requests_per_sec"] for d in rows.get("bare", [])}

def of_bare(ds):
    """The median of each run's rate over the bare baseline's of the same run: the machine's
    speed drifts between runs, and each run's pair saw the same machine."""
    return med([d["requests_per_sec"] / bare_of_run[d["run"]] for d in ds if bare_of_run.get(d["run"])])

def faults(ds):
    """Non-2xx answers, errors and runs out of requests over a scenario's runs."""
    bad = sum(n for d in ds for code, n in d["status"].items() if not code.startswith("2"))
    return bad, sum(d["errors"] for d in ds), sum(1 for d in ds if d["exhausted"])
updown = any(s.endswith("@down") for s in rows)
# The generator's CPU over the measured window per wall second, all its threads; absent from
# results older than the field, and where the generator could not read /proc.
def gen_share(ds):
    return med([d["client_cpu_share"] for d in ds if "client_cpu_share" in d])

# The generator has its core to itself: busy for 95 % of the window, it is near the end of it,
# and the rate may be the generator's.
GEN_SATURATED = 0.95
print("| scenario | runs | req/s (median) | p50 ms | p99 ms | vs baseline | server CPU ms/req | gen cpu | non-2xx | errors | exhausted |"
      + (" down / normal |" if updown else ""))
print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if updown else ""))
saturated = []
order = [x for s in scenarios for x in (s, s + "@down") if x in rows]
order += sorted(s for s in rows if s not in order and s != "bare")
order += ["bare"] if "bare" in rows else []
for s in order:
    ds = rows[s]
    rps = med([d["requests_per_sec"] for d in ds])
    p50 = med([d["latency_ms"]["p50"] for d in ds])
    p99 = med([d["latency_ms"]["p99"] for d in ds])
    bad, errs, ex = faults(ds)
    ratio = of_bare(ds)
    cpu = med([d["cpu_ms_per_req"] for d in ds if "cpu_ms_per_req" in d])
    gen = gen_share(ds)
    name = s[: -len("@down")] + " (upstream down)" if s.endswith("@down") else s
    if gen >= GEN_SATURATED:
        saturated.append((name, gen))
    gen_cell = "-" if math.isnan(gen) else f"{gen:.2f}"
    line = f"| {name} | {len(ds)} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {ratio:.3f} | {cpu:.3f} | {gen_cell} | {bad} | {errs} | {ex} |"
    if updown:
        up = rows.get(s[: -len("@down")]) if s.endswith("@down") else None
        # Each down run against the normal run beside it (same run number), then the median.
        pairs = [d["requests_per_sec"] / u["requests_per_sec"] for d, u in zip(ds, up or []) if u["requests_per_sec"]]
        line += f" {med(pairs):.3f} |" if pairs else " |"
    print(line)
print()
for name, gen in saturated:
    print(f"- WARNING: {name}: the generator's core was saturated (median share {gen:.2f}): the rate may be the generator's")
if saturated:
    print()
cg, cg_hwm = rss("callgate")
bl, bl_hwm = rss("baseline")
print(f"RSS after the runs (median): callgate {cg:.1f} MiB (peak {cg_hwm:.1f}), baseline {bl:.1f} MiB (peak {bl_hwm:.1f})")

# The median time of one verify, per run, from criterion's estimates.
verify_ns = [json.load(open(p))["median"]["point_estimate"] for p in glob.glob(os.path.join(out, "verify-run*.json"))]
verify_rate = 1e9 / med(verify_ns) if verify_ns else float("nan")
if verify_ns:
    print(f"Ed25519 verify on the server's core (criterion, median of {len(verify_ns)}): {med(verify_ns) / 1000:.1f} us, {verify_rate:.0f}/s")

def target(label, scenario, p99_max, ratio_of=None, of_what="", need=0.0):
    ds = rows.get(scenario)
    if not ds:
        return
    p99 = med([d["latency_ms"]["p99"] for d in ds])
    parts = []
    if ratio_of is not None:
        ratio = ratio_of(ds)
        parts.append(f"{ratio:.3f} of {of_what} (needs {need:.2f}): {'met' if ratio >= need else 'missed'}")
    parts.append(f"p99 {p99:.2f} ms (needs <= {p99_max}): {'met' if p99 <= p99_max else 'missed'}")
    # A run that got refusals, errors or ran out of requests measured something else: its
    # figures are shown, but judge nothing.
    bad, errs, ex = faults(ds)
    replayed = sum(d.get("replayed", 0) for d in ds)
    refused = sum(d.get("rejected", 0) for d in ds)
    if bad or errs or ex or replayed or refused:
        parts = [p.replace(": met", ": (not judged)").replace(": missed", ": (not judged)") for p in parts]
        parts.append(
            f"INVALID: {bad} non-2xx, {errs} errors, {ex} run(s) out of requests, "
            f"{replayed} taken for replays and {refused} refused by the gateway"
        )
    print(f"- {label}: " + "; ".join(parts))

print()
print("Targets (medians):")
target("plivo status", "plivo-status", 5, of_bare, "bare (median of each run's ratio)", 0.50)
if verify_ns:
    of_verify = lambda ds: med([d["requests_per_sec"] for d in ds]) / verify_rate
    target("telnyx event", "telnyx-event", 10, of_verify, "the verify rate", 0.80)
else:
    target("telnyx event", "telnyx-event", 10)
target("plivo incoming", "plivo-incoming", 5)
print(f"raw results: {out}")
EOF
