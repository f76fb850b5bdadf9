#!/usr/bin/env bash
# Where a sidecar pair's CPU goes, user space against kernel, beside an HAProxy pair (HTTP/2
# between the sidecars, mTLS: the best peer of bench/pair.sh --compare): per proxy process,
# user and system CPU per 10,000 requests, context switches per request and, with PERF=1
# (perf from Debian linux-perf, tracepoints allowed), the system calls per request by kind.
# It answers whether a gap to the peer is in our code or in the kernel's work for it (system
# calls, wake-ups), which callgrind (user space only) cannot.
#
#   bench/cpu-split.sh [ROUNDS=2] [SECONDS=5] [CONNECTIONS=64]
#   env: OUTRIDER_BIN (default target/release/outrider; build it first), BENCH_PORT_BASE
#        (default 23700), AB_PATH (default /: a 2-byte body; /16k.bin: 16 KiB), PERF=1
#
# Everything but wrk pinned to core 0 (nginx, the two Outrider sidecars, the two HAProxy
# processes), wrk to core 1, as bench/pair.sh does; the pairs take turns, round by round.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROUNDS="${1:-2}"
SECS="${2:-5}"
CONNS="${3:-64}"
OUTRIDER="${OUTRIDER_BIN:-$ROOT/target/release/outrider}"
BASE="${BENCH_PORT_BASE:-23700}"
# shellcheck source=bench/require.sh
source "$ROOT/bench/require.sh"
require cpu-split.sh wrk nginx haproxy curl taskset
[[ -z "${PERF:-}" ]] || require cpu-split.sh perf
NAME=cpu-split
NGINX_PREFIX=(taskset -c 0)
# shellcheck source=bench/pair-setup.sh
source "$ROOT/bench/pair-setup.sh"
start_sidecars taskset -c 0

# The HAProxy pair, configured as bench/pair.sh configures "haproxy-h2".
combined_pems web backend
P_HAP_OUT=$((BASE + 20)) P_HAP_IN=$((BASE + 21))
haproxy_cfg "$P_HAP_OUT" "$P_HAP_IN" h2 "$P_NGINX" >"$WORK/haproxy.cfg"
split_haproxy "$WORK/haproxy.cfg" out >"$WORK/haproxy-out.cfg"
split_haproxy "$WORK/haproxy.cfg" in >"$WORK/haproxy-in.cfg"
for side in in out; do
    taskset -c 0 haproxy -db -f "$WORK/haproxy-$side.cfg" >"$WORK/haproxy-$side.log" 2>&1 &
    PIDS+=($!)
    eval "PID_hap_$side=$!"
done
for _ in $(seq 1 50); do
    curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:$P_HAP_OUT/" && break
    sleep 0.1
done
PID_nginx=$(pgrep -f "nginx -e $WORK" | head -1)

# pid → "voluntary nonvoluntary utime stime" (switches; clock ticks)
counters() {
    local v n
    v=$(awk '/^voluntary_ctxt/ {print $2}' "/proc/$1/status")
    n=$(awk '/^nonvoluntary_ctxt/ {print $2}' "/proc/$1/status")
    echo "$v $n $(awk '{print $14, $15}' "/proc/$1/stat")"
}

SYSCALLS=raw_syscalls:sys_enter,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto
SYSCALLS+=,syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_writev
SYSCALLS+=,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex

measure() { # label url name:pid...
    local label="$1" url="$2" entry
    shift 2
    taskset -c 1 wrk -t1 -c"$CONNS" -d1s -H "Host: backend" "$url${AB_PATH:-/}" >/dev/null
    for entry in "$@"; do counters "${entry#*:}" >"$WORK/before.${entry%%:*}"; done
    local perfs=()
    if [[ -n "${PERF:-}" ]]; then
        for entry in "$@"; do
            perf stat -x, -e "$SYSCALLS" -p "${entry#*:}" -o "$WORK/perf.${entry%%:*}" \
                -- sleep "$((SECS - 1))" &
            perfs+=($!)
        done
    fi
    local out requests rps hz
    out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" -H "Host: backend" "$url${AB_PATH:-/}")
    # Only perf: a bare `wait` would wait for the servers too.
    [[ ${#perfs[@]} -eq 0 ]] || wait "${perfs[@]}"
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    hz=$(getconf CLK_TCK)
    printf '%s: %s req/s\n' "$label" "$rps"
    for entry in "$@"; do
        read -r v0 n0 u0 s0 <"$WORK/before.${entry%%:*}"
        read -r v1 n1 u1 s1 < <(counters "${entry#*:}")
        awk -v name="${entry%%:*}" -v n="$requests" -v hz="$hz" \
            -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v v=$((v1 - v0)) -v iv=$((n1 - n0)) 'BEGIN {
            printf "  %-12s user %.3f  system %.3f CPU s/10k req   switches/req %.3f voluntary %.3f forced\n",
                name, u / hz / n * 10000, s / hz / n * 10000, v / n, iv / n }'
        if [[ -n "${PERF:-}" ]]; then
            awk -F, -v r="$rps" -v s="$((SECS - 1))" '$1 ~ /^[0-9]+$/ && $1 > 0 {
                sub(/^(raw_)?syscalls:sys_enter_?/, "", $3)
                printf "               %-12s %.3f per request\n", ($3 == "" ? "all" : $3), $1 / (r * s) }' \
                "$WORK/perf.${entry%%:*}"
        fi
    done
}

# shellcheck disable=SC2154
for round in $(seq 1 "$ROUNDS"); do
    echo "-- round $round"
    measure outrider "http://127.0.0.1:$P_WEB_OUT" "caller:$PID_web" "callee:$PID_backend" "nginx:$PID_nginx"
    measure haproxy-h2 "http://127.0.0.1:$P_HAP_OUT" "out:$PID_hap_out" "in:$PID_hap_in" "nginx:$PID_nginx"
done
