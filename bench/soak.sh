#!/usr/bin/env bash
# Soak (issue 10; not in CI): a steady rate through an Outrider pair with retries on, in front of
# a flaky backend (10% of answers are 503), for N minutes. Each minute prints the client-side
# p99 and error count (loadgen), and each sidecar's RSS and open file descriptors. After the
# first (warm-up) minute, RSS and fds should stay flat within 10%.
# Usage: bench/soak.sh [MINUTES=10] [RATE=500]  (128 connections: retries back off, so a connection
# can be busy for up to a second; fewer connections would make the generator fall behind)
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
rate=${2:-500}
target=${CARGO_TARGET_DIR:-target}
# Ports from BENCH_PORT_BASE (default 21950): base..base+6, below the ephemeral range.
base=${BENCH_PORT_BASE:-21950}
app=$base c_out=$((base + 1)) c_in=$((base + 2)) c_admin=$((base + 3))
w_out=$((base + 4)) w_in=$((base + 5)) w_admin=$((base + 6))
# Separately, so loadgen's dependencies do not unify extra features into the sidecar.
cargo build --release -q -p outrider && cargo build --release -q -p loadgen
bin="$target/release/outrider"
loadgen="$target/release/loadgen"
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

python3 - "$work/backend.py" <<'PY'
import sys
open(sys.argv[1], "w").write('''
import http.server, random, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        status = 503 if random.random() < 0.10 else 200
        body = b"ok"
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''')
PY
python3 "$work/backend.py" "$app" & pids+=($!)

"$bin" certs ca --out "$work/ca" >/dev/null
for s in web flaky; do "$bin" certs issue --ca "$work/ca" --service "$s" --out "$work/certs" >/dev/null; done
tls() { echo "tls: { ca: $work/ca/ca.pem, cert: $work/certs/$1.pem, key: $work/certs/$1-key.pem }"; }
cat > "$work/flaky.yaml" <<YAML
service: flaky
app: 127.0.0.1:$app
listen: { outbound: 127.0.0.1:$c_out, inbound: 127.0.0.1:$c_in, admin: 127.0.0.1:$c_admin }
$(tls flaky)
YAML
cat > "$work/web.yaml" <<YAML
service: web
app: 127.0.0.1:9
listen: { outbound: 127.0.0.1:$w_out, inbound: 127.0.0.1:$w_in, admin: 127.0.0.1:$w_admin }
$(tls web)
discovery: { services: { flaky: { endpoints: ["127.0.0.1:$c_in"] } } }
policies: { default: { circuit_breaker: { consecutive_failures: 1000 } } }
YAML
"$bin" run -c "$work/flaky.yaml" --log-level warn 2>"$work/flaky.log" & callee=$!; pids+=($callee)
"$bin" run -c "$work/web.yaml" --log-level warn 2>"$work/web.log" & caller=$!; pids+=($caller)
for _ in $(seq 100); do curl -sf http://127.0.0.1:$w_admin/ready >/dev/null && curl -sf http://127.0.0.1:$c_admin/ready >/dev/null && break; sleep 0.1; done

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }
printf '%-6s %10s %8s %10s %10s %8s %8s\n' minute p99_ms errors caller_kib callee_kib c_fds s_fds
for m in $(seq "$minutes"); do
  report=$("$loadgen" run --url http://127.0.0.1:$w_out/ --host flaky --rate "$rate" -c 128 \
    --duration 60 --warmup 0 2>/dev/null)
  p99=$(python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["latency_ms"]["p99"] if "latency_ms" in r else r.get("p99","?"))' <<<"$report" 2>/dev/null || echo "?")
  errors=$(python3 -c 'import json,sys; print(json.load(sys.stdin).get("errors","?"))' <<<"$report" 2>/dev/null || echo "?")
  printf '%-6s %10s %8s %10s %10s %8s %8s\n' "$m" "$p99" "$errors" "$(rss $caller)" "$(rss $callee)" "$(fds $caller)" "$(fds $callee)"
done
echo "retries: $(curl -s http://127.0.0.1:$w_admin/metrics | grep '^outrider_retries_total' || true)"
