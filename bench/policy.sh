#!/usr/bin/env bash
# Measures the outbound policy stack (issue 4):
#   1. overhead of the full stack (retries with replayable bodies, budget, breaker; defaults)
#      against a pass-through stack (attempts: 1, breaker thresholds out of reach), with wrk;
#   2. request amplification while the upstream answers 503 to everything: app hits per client
#      request, with the default retry budget, without a budget, and with the breaker on.
# Topology: wrk → caller sidecar (outbound) → mTLS → callee sidecar (inbound) → nginx. Servers are
# pinned to core 0, wrk to core 1.
#
# Usage: bench/policy.sh [DURATION (default 10s)] [CONNECTIONS (default 32)]
# Needs: wrk, nginx, taskset; builds `outrider` in release.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
duration=${1:-10s}
conns=${2:-32}
target="${CARGO_TARGET_DIR:-target}"
for tool in wrk nginx taskset; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install -y $tool)" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# This checkout's binary: with a shared target dir the uplifted one may be another branch's, so
# take it from deps/ by a string only this branch's policy code contains.
cargo build --release -p outrider --bin outrider >&2
bin=""
for f in "$target/release/outrider" $(ls -t "$target"/release/deps/outrider-* 2>/dev/null | grep -v '\.d$'); do
  if [ -x "$f" ] && grep -q 'retry budget spent: not retrying' "$f"; then bin="$f"; break; fi
done
[ -n "$bin" ] || { echo "no outrider binary with the policy stack found" >&2; exit 1; }
cp "$bin" "$work/outrider"
bin="$work/outrider"

"$bin" certs ca --out "$work/ca" >/dev/null
"$bin" certs issue --ca "$work/ca" --service web --out "$work/certs" >/dev/null
"$bin" certs issue --ca "$work/ca" --service user-service --out "$work/certs" >/dev/null

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 100); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "not up: $1" >&2; return 1; }

# nginx: `/` answers 200, `/fail` 503; the access log of /fail counts app hits.
app_port=$(port)
mkdir -p "$work/nginx/logs"
cat > "$work/nginx/nginx.conf" <<NGINX
worker_processes 1;
error_log $work/nginx/logs/error.log warn;
pid $work/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$app_port;
    location = / { return 200 "ok\n"; }
    location = /fail { access_log $work/nginx/logs/fail.log; return 503 "down\n"; }
  }
}
NGINX
taskset -c 0 nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' &
pids+=($!)

callee_in=$(port); callee_out=$(port); callee_admin=$(port)
cat > "$work/callee.yaml" <<YAML
service: user-service
app: 127.0.0.1:$app_port
listen: { outbound: 127.0.0.1:$callee_out, inbound: 127.0.0.1:$callee_in, admin: 127.0.0.1:$callee_admin }
tls: { trust_domain: mesh.local, ca: $work/ca/ca.pem, cert: $work/certs/user-service.pem, key: $work/certs/user-service-key.pem }
YAML
taskset -c 0 "$bin" run -c "$work/callee.yaml" --log-format json --log-level warn 2>"$work/callee.log" &
pids+=($!)
wait_http "http://127.0.0.1:$callee_admin/ready"

caller_pid=""
start_caller() { # $1: name, $2: policies yaml
  [ -n "$caller_pid" ] && { kill "$caller_pid"; wait "$caller_pid" 2>/dev/null || true; }
  caller_out=$(port); caller_in=$(port); caller_admin=$(port)
  cat > "$work/caller-$1.yaml" <<YAML
service: web
app: 127.0.0.1:9
listen: { outbound: 127.0.0.1:$caller_out, inbound: 127.0.0.1:$caller_in, admin: 127.0.0.1:$caller_admin }
tls: { trust_domain: mesh.local, ca: $work/ca/ca.pem, cert: $work/certs/web.pem, key: $work/certs/web-key.pem }
discovery:
  services:
    user-service: { endpoints: ["127.0.0.1:$callee_in"] }
$2
YAML
  taskset -c 0 "$bin" run -c "$work/caller-$1.yaml" --log-format json --log-level warn 2>"$work/caller-$1.log" &
  caller_pid=$!
  pids+=($caller_pid)
  wait_http "http://127.0.0.1:$caller_admin/ready"
}

run_wrk() { # $1: path → prints the wrk summary; sets $requests
  local out
  out=$(taskset -c 1 wrk -t1 -c"$conns" -d"$duration" --latency -H 'Host: user-service' "http://127.0.0.1:$caller_out$1")
  requests=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  non2xx=${non2xx:-0}
}

passthrough='policies:
  default:
    retry: { attempts: 1 }
    circuit_breaker: { consecutive_failures: 1000000 }'
full_defaults=''
no_budget='policies:
  default:
    retry: { budget: { ratio: 10, min_per_second: 1000000 } }
    circuit_breaker: { consecutive_failures: 1000000 }'
budget_only='policies:
  default:
    circuit_breaker: { consecutive_failures: 1000000 }'

echo "# outrider policy stack bench ($(date -u +%FT%TZ)); wrk -t1 -c$conns -d$duration; servers on core 0, wrk on core 1"
echo
echo "## 1. Overhead on 200s (GET /)"
# Alternating rounds (A B A B ...) so drifting background load hits both stacks alike.
rounds=${ROUNDS:-3}
# CPU time the caller sidecar spends per request (user+sys from /proc, in µs) is the steadier
# figure on a shared machine: throughput moves with whatever else runs on core 0.
hz=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$caller_pid/stat"; }
printf '%-34s %12s %10s %10s %8s %12s\n' "stack (round)" "req/s" "p50" "p99" "non-2xx" "caller µs/req"
declare -A total cpu
for round in $(seq "$rounds"); do
  for variant in passthrough full_defaults; do
    start_caller "$variant-$round" "${!variant}"
    saved=$duration; duration=2s; run_wrk / >/dev/null; duration=$saved # warm-up
    before=$(cpu_ticks)
    run_wrk /
    after=$(cpu_ticks)
    us=$(awk -v t=$((after - before)) -v hz="$hz" -v r="$requests" 'BEGIN { printf "%.1f", t / hz * 1e6 / r }')
    total[$variant]=$(awk -v a="${total[$variant]:-0}" -v b="$rps" 'BEGIN { print a + b }')
    cpu[$variant]=$(awk -v a="${cpu[$variant]:-0}" -v b="$us" 'BEGIN { print a + b }')
    printf '%-34s %12s %10s %10s %8s %12s\n' "$variant ($round)" "$rps" "$p50" "$p99" "$non2xx" "$us"
  done
done
for variant in passthrough full_defaults; do
  printf '%-34s %12.0f %41.1f\n' "$variant (mean)" \
    "$(awk -v t="${total[$variant]}" -v n="$rounds" 'BEGIN { print t / n }')" \
    "$(awk -v t="${cpu[$variant]}" -v n="$rounds" 'BEGIN { print t / n }')"
done
awk -v a="${total[passthrough]}" -v b="${total[full_defaults]}" \
  'BEGIN { printf "full stack throughput vs pass-through: %+.1f%%\n", (b - a) / a * 100 }'
awk -v a="${cpu[passthrough]}" -v b="${cpu[full_defaults]}" -v n="$rounds" \
  'BEGIN { printf "full stack caller CPU per request vs pass-through: %+.1f µs (%+.1f%%)\n", (b - a) / n, (b - a) / a * 100 }'

echo
echo "## 2. Amplification while every answer is 503 (GET /fail)"
printf '%-34s %12s %12s %14s\n' "policy" "client req" "app hits" "hits/request"
for variant in no_budget budget_only full_defaults; do
  : > "$work/nginx/logs/fail.log"
  kill -USR1 "$(cat "$work/nginx/nginx.pid")" # reopen the log
  start_caller "amp-$variant" "${!variant}"
  run_wrk /fail
  sleep 1.5 # nginx flushes its log
  hits=$(wc -l < "$work/nginx/logs/fail.log")
  ratio=$(awk -v h="$hits" -v r="$requests" 'BEGIN { printf "%.3f", (r > 0 ? h / r : 0) }')
  printf '%-34s %12s %12s %14s\n' "$variant" "$requests" "$hits" "$ratio"
done
echo
echo "no_budget: attempts 3, budget ratio 10 + 1e6/s (unbounded), breaker off"
echo "budget_only: attempts 3, default budget (ratio 0.2, min 10/s), breaker off"
echo "full_defaults: attempts 3, default budget, default breaker (5 failures, open 10s)"
