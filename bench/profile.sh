#!/usr/bin/env bash
# Where an Outrider pair spends its CPU (issue 9): samples both sidecars of a pair under wrk load
# with `perf record` (software cpu-clock events: hardware counters are not available on every
# machine here) and prints the hottest functions, self and with children.
#
#   bench/profile.sh [SECONDS=10] [CONNECTIONS=64]
#   env: CARGO_TARGET_DIR, BENCH_PORT_BASE (default 21300), PROFILE_OUT (default bench/results/profile)
#        PROFILE_RATE=2000: a fixed rate (bench/loadgen, open loop) instead of wrk's maximum;
#        then the sidecars' CPU seconds per 10,000 requests and their syscalls per request
#        (strace -c) are printed too.
#
# Builds `--profile profiling` (release with symbols). Servers on CPU 0, wrk on CPU 1, like
# bench/pair.sh. Leaves perf.data files and the text reports in $PROFILE_OUT.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
SECS="${1:-10}"
CONNS="${2:-64}"
OUT="${PROFILE_OUT:-$ROOT/bench/results/profile}"
BASE="${BENCH_PORT_BASE:-21300}"

# shellcheck source=bench/require.sh
source "$ROOT/bench/require.sh"
require profile.sh perf wrk nginx curl
# Separately, so loadgen's dependencies do not unify extra features into the sidecar.
(cd "$ROOT" && cargo build --profile profiling -q -p outrider && cargo build --profile profiling -q -p loadgen)
OUTRIDER="$TARGET_DIR/profiling/outrider"
LOADGEN="$TARGET_DIR/profiling/loadgen"
RATE="${PROFILE_RATE:-}"
mkdir -p "$OUT"
NAME=profile
NGINX_PREFIX=(taskset -c 0)
# shellcheck source=bench/pair-setup.sh
source "$ROOT/bench/pair-setup.sh"
taskset -c 0 "$OUTRIDER" run -c "$WORK/web.yaml" --log-level warn &
WEB=$!
PIDS+=($WEB)
taskset -c 0 "$OUTRIDER" run -c "$WORK/backend.yaml" --log-level warn &
BACKEND=$!
PIDS+=($BACKEND)
for _ in $(seq 1 100); do
    curl -sf -o /dev/null -H "Host: backend" "http://127.0.0.1:$P_WEB_OUT/" && break
    sleep 0.1
done
# Warm up (connections, pools), then sample both sidecars during the measured run.
taskset -c 1 wrk -t1 -c"$CONNS" -d2s -H "Host: backend" "http://127.0.0.1:$P_WEB_OUT/" >/dev/null
load() { # seconds
    if [[ -n "$RATE" ]]; then
        taskset -c 1 "$LOADGEN" run --url "http://127.0.0.1:$P_WEB_OUT/" --host backend \
            --duration "$1" --rate "$RATE" -c "$CONNS" 2>&1 >/dev/null | grep '^loadgen' || true
    else
        taskset -c 1 wrk -t1 -c"$CONNS" -d"${1}s" -H "Host: backend" "http://127.0.0.1:$P_WEB_OUT/" |
            grep -E "Requests/sec|Latency|requests in"
    fi
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
echo "== without perf =="
before_web=$(cpu_ticks "$WEB") before_be=$(cpu_ticks "$BACKEND")
load "$SECS"
after_web=$(cpu_ticks "$WEB") after_be=$(cpu_ticks "$BACKEND")
echo "CPU ticks ($(getconf CLK_TCK)/s) over the run: web $((after_web - before_web)), backend $((after_be - before_be))"
if [[ -n "$RATE" ]] && command -v strace >/dev/null; then
    echo "== syscalls per side over 3 s at $RATE req/s (strace -c -f) =="
    strace -c -f -p "$WEB" -o "$OUT/web.strace.txt" &
    SW=$!
    strace -c -f -p "$BACKEND" -o "$OUT/backend.strace.txt" &
    SB=$!
    sleep 0.5
    load 3
    kill -INT "$SW" "$SB"
    wait "$SW" "$SB" 2>/dev/null || true
    for side in web backend; do
        echo "-- $side (calls over $((RATE * 3)) requests)"
        head -20 "$OUT/$side.strace.txt"
    done
fi
echo "== under perf record =="
perf record -q -F 2000 -g -e cpu-clock -p "$WEB" -o "$OUT/web.perf.data" -- sleep "$SECS" 2>/dev/null &
PW=$!
perf record -q -F 2000 -g -e cpu-clock -p "$BACKEND" -o "$OUT/backend.perf.data" -- sleep "$SECS" 2>/dev/null &
PB=$!
load "$SECS" | tee "$OUT/load.txt"
wait "$PW" "$PB" || true
for side in web backend; do
    perf report -i "$OUT/$side.perf.data" --no-children --percent-limit 0.7 --stdio -g none \
        --sort symbol 2>/dev/null | grep -v '^$' >"$OUT/$side.self.txt" || true
    perf report -i "$OUT/$side.perf.data" --children --percent-limit 2 --stdio -g none \
        --sort symbol 2>/dev/null | grep -v '^$' >"$OUT/$side.children.txt" || true
    echo "== $side: self (top) =="
    grep -v '^#' "$OUT/$side.self.txt" | head -40
done
echo "reports in $OUT"
