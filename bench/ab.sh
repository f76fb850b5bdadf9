#!/usr/bin/env bash
# Wall-clock A/B of two Outrider builds (or one build under two environments) as a mesh pair:
# the check a callgrind count (bench/callgrind.sh) needs before a change is kept, since fewer
# instructions is not always less time (system calls, wake-ups).
#
#   bench/ab.sh BIN_A BIN_B [ROUNDS=6] [SECONDS=5] [CONNECTIONS=64]
#   env: ENV_A, ENV_B   extra environment of each side, e.g. ENV_B="OUTRIDER_MESH_H1_CONNECTIONS=64"
#        BENCH_PORT_BASE (default 21700), OUTRIDER_WORKER_THREADS (default 1),
#        AB_PATH (default /: a 2-byte body; /16k.bin: 16 KiB),
#        AB_RATE (requests per second: a fixed-rate load from bench/loadgen instead of wrk's
#        maximum, to compare the CPU per request of a moderately loaded pair; build
#        loadgen first: cargo build --release -p loadgen)
#
# One nginx backend (`return 200 "ok"`) and, per round and per build, a fresh caller+callee pair
# with mTLS pinned to core 0 with nginx, wrk pinned to core 1, in the order A B, B A, A B ...
# (the order alternates because whichever build runs second in a round has gained ~6 % on some
# hosts; over an even number of rounds that bias cancels in the medians). For each
# run: requests/s, CPU seconds of the pair per 10,000 requests (utime+stime from /proc), peak RSS
# (VmHWM) of each sidecar, and wrk's errors (non-2xx/3xx answers, socket errors); then the medians
# and the ratio B/A.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_A="${1:?usage: bench/ab.sh BIN_A BIN_B [ROUNDS] [SECONDS] [CONNECTIONS]}"
BIN_B="${2:?usage: bench/ab.sh BIN_A BIN_B [ROUNDS] [SECONDS] [CONNECTIONS]}"
ROUNDS="${3:-6}"
SECS="${4:-5}"
CONNS="${5:-64}"
BASE="${BENCH_PORT_BASE:-21700}"
# shellcheck source=bench/require.sh
source "$ROOT/bench/require.sh"
require ab.sh wrk nginx curl taskset
LOADGEN="${CARGO_TARGET_DIR:-$ROOT/target}/release/loadgen"
[[ -z "${AB_RATE:-}" || -x "$LOADGEN" ]] || { echo "ab.sh: AB_RATE needs $LOADGEN" >&2; exit 1; }
# A build whose code layout is stale holds MiBs more RSS (bench/link-order.sh): say so up front.
for bin in "$BIN_A" "$BIN_B"; do "$ROOT/bench/link-order.sh" --check "$bin" 2>&1 || true; done
OUTRIDER="$BIN_A"
NAME=ab
NGINX_PREFIX=(taskset -c 0)
# shellcheck source=bench/pair-setup.sh
source "$ROOT/bench/pair-setup.sh"

cpu_ticks() { # pid: utime+stime in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat"
}
hwm_kib() { # pid
    awk '/VmHWM/ {print $2}' "/proc/$1/status"
}

run_one() { # label bin env
    local label="$1" bin="$2" env="$3" pids=() side
    for side in web backend; do
        # shellcheck disable=SC2086
        env OUTRIDER_WORKER_THREADS="${OUTRIDER_WORKER_THREADS:-1}" $env taskset -c 0 \
            "$bin" run -c "$WORK/$side.yaml" --log-level warn >"$WORK/$side.log" 2>&1 &
        pids+=($!)
    done
    for _ in $(seq 1 100); do
        curl -sf -o /dev/null --max-time 1 -H "Host: backend" "http://127.0.0.1:$P_WEB_OUT/" && break
        sleep 0.1
    done
    taskset -c 1 wrk -t1 -c"$CONNS" -d1s -H "Host: backend" "http://127.0.0.1:$P_WEB_OUT${AB_PATH:-/}" >/dev/null
    local before_web before_be
    before_web=$(cpu_ticks "${pids[0]}") before_be=$(cpu_ticks "${pids[1]}")
    local before=$((before_web + before_be))
    local out requests rps errors=0
    if [[ -n "${AB_RATE:-}" ]]; then
        out=$(taskset -c 1 "$LOADGEN" run --url "http://127.0.0.1:$P_WEB_OUT${AB_PATH:-/}" \
            --host backend --rate "$AB_RATE" -c "$CONNS" --duration "$SECS" --warmup 0 2>&1 >/dev/null)
        requests=$(loadgen_figure ok, <<<"$out")
        rps=$(loadgen_figure "req/s;" <<<"$out")
    else
        out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" -H "Host: backend" "http://127.0.0.1:$P_WEB_OUT${AB_PATH:-/}")
        requests=$(awk '/requests in/ {print $1}' <<<"$out")
        rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
        # Answers other than 2xx/3xx, and socket errors (connect, read, write, timeout).
        errors=$(awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(",", ""); n += $4 + $6 + $8 + $10} END {print n + 0}' <<<"$out")
    fi
    local after_web after_be
    after_web=$(cpu_ticks "${pids[0]}") after_be=$(cpu_ticks "${pids[1]}")
    local after=$((after_web + after_be))
    local hz
    hz=$(getconf CLK_TCK)
    printf '%s %s %s %s %s %s\n' "$label" "$rps" \
        "$(python3 -c "print(f'{($after - $before) / $hz / $requests * 10000:.3f}')")" \
        "$(hwm_kib "${pids[0]}")" "$(hwm_kib "${pids[1]}")" "$errors" >>"$WORK/results"
    # Where the memory is: anonymous (heap, stacks) vs file pages (the binary's code and data),
    # and which side spends the CPU.
    local cpu_side=("$((after_web - before_web))" "$((after_be - before_be))")
    for side in 0 1; do
        awk -v l="$label" -v s="$side" -v cpu="${cpu_side[$side]}" -v hz="$hz" -v n="$requests" \
            '/RssAnon|RssFile/ {v = v " " $1 " " $2} END {printf "%s %s %s CPU s/10k %.3f\n", l, (s ? "callee" : "caller"), v, cpu / hz / n * 10000}' \
            "/proc/${pids[$side]}/status" >>"$WORK/rss"
    done
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
}

for round in $(seq 1 "$ROUNDS"); do
    if ((round % 2)); then
        run_one A "$BIN_A" "${ENV_A:-}"
        run_one B "$BIN_B" "${ENV_B:-}"
    else
        run_one B "$BIN_B" "${ENV_B:-}"
        run_one A "$BIN_A" "${ENV_A:-}"
    fi
    tail -2 "$WORK/results" | sed "s/^/round $round: /"
    tail -4 "$WORK/rss" | sed "s/^/round $round:   /"
done
python3 - "$WORK/results" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
med = {}
for label in "AB":
    runs = [r for r in rows if r[0] == label]
    med[label] = [statistics.median(float(r[i]) for r in runs) for i in range(1, 5)]
errors = {label: sum(int(r[5]) for r in rows if r[0] == label and len(r) > 5) for label in "AB"}
print(f"\nmedians of {len(rows) // 2} rounds   req/s   CPU s/10k req (pair)   peak RSS caller / callee (MiB)   errors (all rounds)")
for label in "AB":
    rps, cpu, web, be = med[label]
    print(f"  {label}  {rps:>18.0f}   {cpu:>21.3f}   {web / 1024:>10.1f} / {be / 1024:<10.1f}   {errors[label]}")
a, b = med["A"], med["B"]
print(f"  B/A {b[0] / a[0]:>16.3f}   {b[1] / a[1]:>21.3f}   {b[2] / a[2]:>10.3f} / {b[3] / a[3]:.3f}")
PY
