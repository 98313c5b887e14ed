#!/usr/bin/env bash
# Runs fuzz targets one after another and prints one summary line each.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     (default: 180 s, every target)
#
# One libFuzzer job at a time (-jobs=1): the build machine is shared. The working corpus is
# fuzz/corpus/<target> (gitignored), seeded from fuzz/corpus-seed/<target>; crashes land in
# fuzz/artifacts/<target>/; the full libFuzzer output of each run is kept in
# fuzz/logs/<target>.log (gitignored with fuzz/target via fuzz/.gitignore).
set -euo pipefail

cd "$(dirname "$0")"
secs="${1:-180}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(form_parse plivo_verify twilio_verify telnyx_verify credentials settings client_ip)
fi

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
mkdir -p logs
# Build once, then run the binaries directly: `cargo fuzz run` would rebuild callgate whenever
# someone edits the library mid-campaign, and every target would test a different revision.
cargo fuzz build >logs/build.log 2>&1 || { tail -30 logs/build.log; exit 1; }
bin="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

printf '%-14s %6s %12s %8s %6s %7s %s\n' target secs execs exec/s cov ft result
# secs is the measured wall time: a run stops early at its first finding.
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    rm -f fuzz-0.log
    rc=0
    mkdir -p "artifacts/$t"
    started=$(date +%s)
    ASAN_OPTIONS="detect_odr_violation=0" "$bin/$t" "corpus/$t" "corpus-seed/$t" -artifact_prefix="artifacts/$t/" \
        -max_total_time="$secs" -jobs=1 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"logs/$t.driver.log" 2>&1 || rc=$?
    took=$(( $(date +%s) - started ))
    mv -f fuzz-0.log "logs/$t.log" 2>/dev/null || cp "logs/$t.driver.log" "logs/$t.log"
    log="logs/$t.log"
    execs=$(grep 'stat::number_of_executed_units:' "$log" | tail -1 | awk '{print $2}' || true)
    rate=$(grep 'stat::average_exec_per_sec:' "$log" | tail -1 | awk '{print $2}' || true)
    last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 || true)
    cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.*ft: \([0-9]*\).*/\1/p' <<<"$last")
    if grep -qE '^==[0-9]+== ?ERROR|panicked at|Test unit written' "$log"; then
        result="CRASH: $(grep -m1 -oE 'panicked at .*|ERROR: [^ ]+ [^ ]+' "$log") $(grep -m1 -o 'artifacts/[^ ]*' "$log" || true)"
    else
        result="ok (rc=$rc)"
    fi
    # Per-process scratch files of the targets (settings TOML, Telnyx store) of finished runs.
    for f in /dev/shm/callgate-fuzz-*; do
        [ -e "$f" ] || continue
        pid=${f##*-}; pid=${pid%.toml}
        kill -0 "$pid" 2>/dev/null || rm -rf "$f"
    done
    printf '%-14s %6s %12s %8s %6s %7s %s\n' "$t" "$took" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$result"
done
