#!/usr/bin/env bash
# How many connections the callee sidecar opens and closes to its app under many concurrent
# requests (issue 9): a pair with mTLS in front of nginx, `wrk -c1024` for 5 s through it, then
# the connections to nginx left in TIME_WAIT (each one a dial and close by the callee's app
# pool) and those established. A pool that keeps fewer connections than the requests in flight
# shows here as thousands of TIME_WAIT sockets.
#
#   OUTRIDER_BIN=target/release/outrider bench/app-churn.sh [CONNECTIONS=1024] [SECONDS=5]
#   env: BENCH_PORT_BASE (default 21600)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTRIDER="${OUTRIDER_BIN:-$ROOT/target/release/outrider}"
CONNS="${1:-1024}"
SECS="${2:-5}"
BASE="${BENCH_PORT_BASE:-21600}"
NAME=app-churn
NGINX_PREFIX=()
# shellcheck source=bench/require.sh
source "$ROOT/bench/require.sh"
require app-churn.sh wrk nginx curl ss
# shellcheck source=bench/pair-setup.sh
source "$ROOT/bench/pair-setup.sh"
start_sidecars taskset -c 0
# shellcheck disable=SC2154
before="$(ss -tan state time-wait | grep -c ":$P_NGINX" || true)"
taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" -H "Host: backend" "http://127.0.0.1:$P_WEB_OUT/" |
    grep -E "Requests/sec"
after="$(ss -tan state time-wait | grep -c ":$P_NGINX" || true)"
echo "connections to the app in TIME_WAIT: $((after - before)) (closed during the run)"
echo "established with the app: $(ss -tan state established | grep -c ":$P_NGINX" || true) socket ends"
