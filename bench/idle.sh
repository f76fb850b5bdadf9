#!/usr/bin/env bash
# RSS per 1,000 idle keep-alive connections on a sidecar's outbound listener: opens N connections,
# sends one request on each (so HTTP state is set up), keeps them open, and reads VmRSS.
# Usage: bench/idle.sh [N]   (default 2000; uses the release binary)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
cargo build --release -q -p outrider
bin=target/release/outrider
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
ulimit -n 65536 2>/dev/null || true
cat > "$work/idle.yaml" <<YAML
service: idle
app: 127.0.0.1:9
listen: { outbound: 127.0.0.1:47140, inbound: 127.0.0.1:47143, admin: 127.0.0.1:47191 }
tls: { mode: disabled }
YAML
"$bin" run -c "$work/idle.yaml" --log-format json >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 50); do curl -sf http://127.0.0.1:47191/ready >/dev/null && break; sleep 0.1; done
python3 bench/idle_conns.py "$pid" 47140 "$n"
