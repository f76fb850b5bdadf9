#!/usr/bin/env bash
# RSS per 1,000 idle keep-alive connections on a sidecar's outbound listener: opens N connections,
# sends one request on each (so HTTP state is set up), keeps them open, and reads VmRSS.
# Usage: bench/idle.sh [N] [HOLD]   (default 2000 connections; HOLD: seconds to keep them idle
# afterwards and report how many survive, default 0; uses the release binary of CARGO_TARGET_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
base=${BENCH_PORT_BASE:-21900} # ports base..base+2, below the ephemeral range
out=$base in=$((base + 1)) admin=$((base + 2))
hold=${2:-0}
cargo build --release -q -p outrider
bin=${CARGO_TARGET_DIR:-target}/release/outrider
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
# One descriptor per connection on each side (this shell's children inherit the limit).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((n + 100)) ]; then
  echo "ulimit -n is $(ulimit -n): too low for $n connections" >&2
  exit 1
fi
cat > "$work/idle.yaml" <<YAML
service: idle
app: 127.0.0.1:9
listen: { outbound: 127.0.0.1:$out, inbound: 127.0.0.1:$in, admin: 127.0.0.1:$admin }
tls: { mode: disabled }
# An idle keep-alive connection waits for its next request head, so header_read_timeout (10s by
# default) closes it; raised here so all N stay open while they are counted.
limits: { header_read_timeout: ${IDLE_HEADER_TIMEOUT:-10m} }
YAML
"$bin" run -c "$work/idle.yaml" --log-format json >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 50); do curl -sf http://127.0.0.1:$admin/ready >/dev/null && break; sleep 0.1; done
python3 bench/idle_conns.py "$pid" "$out" "$n" "$hold"
