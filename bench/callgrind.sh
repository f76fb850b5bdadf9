#!/usr/bin/env bash
# Instructions per proxied request in each sidecar of a pair (issue 9), counted by valgrind's
# callgrind: a count, not a time, so it is repeatable on a busy or virtual machine where
# wall-clock figures are not. Use it to compare two builds; use bench/pair.sh for real speed.
#
#   bench/callgrind.sh [REQUESTS=4000] [CONNECTIONS=16]
#   env: CARGO_TARGET_DIR, BENCH_PORT_BASE (default 21400), CALLGRIND_RATE (default 400),
#        CALLGRIND_ARGS (more valgrind options, e.g. "--cache-sim=yes --LL=2097152,16,64"),
#        CALLGRIND_OUT (default bench/results/callgrind), OUTRIDER_BIN (a binary to measure
#        instead of building one), OUTRIDER_WORKER_THREADS (default 1: the one-core runtime
#        that bench/pair.sh measures)
#
# Both sidecars run under callgrind (profiling build: release with symbols), the nginx backend
# natively. After a warm-up the counters are zeroed, REQUESTS requests are sent at a fixed rate
# (bench/loadgen), and the counters dumped: instructions per request, then the top functions
# (inclusive and self) of each side.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
REQUESTS="${1:-4000}"
CONNS="${2:-16}"
# Requests per second: 400 keeps every connection mostly idle (one request in flight at a time);
# a rate above what the sidecars can do under callgrind keeps all CONNECTIONS busy at once.
RATE="${CALLGRIND_RATE:-400}"
OUT="${CALLGRIND_OUT:-$ROOT/bench/results/callgrind}"
BASE="${BENCH_PORT_BASE:-21400}"

# shellcheck source=bench/require.sh
source "$ROOT/bench/require.sh"
require callgrind.sh valgrind callgrind_control callgrind_annotate nginx curl
# Separately, so loadgen's dependencies do not unify extra features into the sidecar; the
# sidecar only when no OUTRIDER_BIN is given.
if [[ -z "${OUTRIDER_BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --profile profiling -q -p outrider)
fi
(cd "$ROOT" && cargo build --profile profiling -q -p loadgen)
OUTRIDER="${OUTRIDER_BIN:-$TARGET_DIR/profiling/outrider}"
LOADGEN="$TARGET_DIR/profiling/loadgen"
mkdir -p "$OUT"
rm -f "$OUT"/callgrind.out.*
NAME=callgrind
NGINX_PREFIX=()
# shellcheck source=bench/pair-setup.sh
source "$ROOT/bench/pair-setup.sh"
# shellcheck disable=SC2086 # CALLGRIND_ARGS: extra valgrind options, split on spaces
start_sidecars valgrind --tool=callgrind ${CALLGRIND_ARGS:-} \
    --callgrind-out-file="$OUT/callgrind.out.@SIDE@"
load() { # requests
    "$LOADGEN" run --url "http://127.0.0.1:$P_WEB_OUT/" --host backend \
        --duration $(($1 / RATE)) --warmup 0 --rate "$RATE" -c "$CONNS" 2>&1 >/dev/null | grep '^loadgen' || true
}
load $((RATE * 2)) >/dev/null
# shellcheck disable=SC2154
for pid in "$PID_web" "$PID_backend"; do callgrind_control -z "$pid" >/dev/null; done
SUMMARY="$(load "$REQUESTS")"
echo "$SUMMARY"
# Requests answered, which is fewer than REQUESTS when the rate is above what callgrind allows.
DONE="$(loadgen_figure ok, <<<"$SUMMARY")"
DONE="${DONE:-$REQUESTS}"
for pid in "$PID_web" "$PID_backend"; do callgrind_control -d "$pid" >/dev/null; done
sleep 1
# Function lines of callgrind_annotate, without the frames that hold everything (thread starts,
# the runtime's loop: 50% and more), paths shortened.
functions() { # dump limit [annotate options]
    local dump="$1" limit="$2"
    shift 2
    callgrind_annotate --threshold=100 "$@" "$dump" 2>/dev/null | python3 -c '
import re, sys
limit = int(sys.argv[1])
on, n = False, 0
for line in sys.stdin:
    if "file:function" in line:
        on = True
        continue
    m = re.match(r"\s*([\d,]+) \(\s*([\d.]+)%\)\s+(.*)", line)
    if not on or not m or float(m.group(2)) >= 50:
        continue
    name = re.sub(r"/root/.cargo/registry/src/[^/]+/|/rustc/[0-9a-f]+/library/", "", m.group(3))
    print(f"{m.group(1):>14} {float(m.group(2)):5.2f}%  {name[:200]}")
    n += 1
    if n >= limit:
        sys.stdin.read()  # drain: an early exit would fail the pipeline (pipefail)
        break
' "$limit"
}
for side in web backend; do
    dump="$OUT/callgrind.out.$side.1"
    total="$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')"
    echo "== $side: $total instructions over $DONE requests: $((total / DONE)) per request"
    functions "$dump" 60 >"$OUT/$side.self.txt"
    functions "$dump" 150 --inclusive=yes >"$OUT/$side.inclusive.txt"
    head -25 "$OUT/$side.self.txt"
done
echo "full reports: $OUT/{web,backend}.{inclusive,self}.txt; callgrind_annotate $OUT/callgrind.out.*"
