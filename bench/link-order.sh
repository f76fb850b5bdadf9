#!/usr/bin/env bash
# Regenerates sidecar/link-order.txt: the functions a running sidecar pair executes, hottest
# first, which the release link places together (lld --symbol-ordering-file, see sidecar/build.rs).
#
# Why: most of a sidecar's RSS is the binary's code (RssFile), and the kernel maps code in 64 KiB
# runs around each page fault, so a sidecar that uses 1 MiB of functions scattered over 9 MiB of
# text holds most of the 9 MiB. Placing every function it runs side by side shrinks that
# (docs/performance.md). A poor man's BOLT: this toolchain has no llvm-profdata or llvm-bolt.
#
#   bench/link-order.sh [REQUESTS=2000]
#   bench/link-order.sh --check [BIN=target/release/outrider]
#   env: BENCH_PORT_BASE (default 21500)
#
# `--check` says how many of the file's Rust functions the binary has (it exits 1 below 90 %).
# Rust symbol names carry a hash of the crate's build metadata, so adding or upgrading a
# dependency of the sidecar renames nearly all of them and the file goes stale at once: after
# foldhash was added, 979 of 1,739 names were missing and each sidecar held 2.3 MiB more
# (docs/performance.md). bench/pair.sh runs the check on the binary it measures.
#
# Builds the release binary (which keeps its symbol table; the order it was linked with does not
# change which functions run), runs a caller and a callee sidecar under callgrind from start-up
# on, sends HTTP/1.1 (2-byte and 16 KiB bodies), h2c and admin requests through them, and writes
# every function with instructions counted, hottest first. Functions that later changes add or
# rename are simply not ordered (lld ignores unknown names), so a stale file costs locality,
# never correctness.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "${1:-}" == --check ]]; then
    bin="${2:-${CARGO_TARGET_DIR:-$ROOT/target}/release/outrider}"
    # Rust names only: the C library's functions are in the file for the static image.
    wanted="$(grep -E '^_(ZN|R)' "$ROOT/sidecar/link-order.txt" | sort -u)"
    found="$(comm -12 <(echo "$wanted") <(nm "$bin" | awk '{print $3}' | sort -u) | wc -l)"
    total="$(echo "$wanted" | wc -l)"
    percent=$((100 * found / total))
    echo "link order: $found of $total Rust functions of sidecar/link-order.txt are in $bin ($percent %)"
    if ((percent < 90)); then
        echo "link order: stale; run bench/link-order.sh and rebuild (each sidecar holds MiBs more code)" >&2
        exit 1
    fi
    exit 0
fi
REQUESTS="${1:-2000}"
CONNS=8
RATE=200
BASE="${BENCH_PORT_BASE:-21500}"
# shellcheck source=bench/require.sh
source "$ROOT/bench/require.sh"
require link-order.sh valgrind callgrind_control nginx curl
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
# Separately, so loadgen's dependencies do not unify extra features into the sidecar.
(cd "$ROOT" && cargo build --release -q -p outrider --bin outrider)
(cd "$ROOT" && cargo build --release -q -p loadgen)
OUTRIDER="$TARGET_DIR/release/outrider"
LOADGEN="$TARGET_DIR/release/loadgen"
NAME=link-order
NGINX_PREFIX=()
# shellcheck source=bench/pair-setup.sh
source "$ROOT/bench/pair-setup.sh"
OUTRIDER_WORKER_THREADS=1 start_sidecars valgrind --tool=callgrind --demangle=no \
    --compress-strings=no --compress-pos=no --callgrind-out-file="$WORK/callgrind.out.@SIDE@"
load() { # path proto
    "$LOADGEN" run --url "http://127.0.0.1:$P_WEB_OUT$1" --host backend --proto "$2" \
        --duration $((REQUESTS / RATE)) --warmup 0 --rate "$RATE" -c "$CONNS" >/dev/null 2>&1 || true
}
load / h1
load / h2
# 16 KiB bodies take other paths (body chunks, flow control, larger TLS records).
load /16k.bin h1
curl -sf -o /dev/null "http://127.0.0.1:$P_WEB_ADMIN/metrics" || true
curl -sf -o /dev/null "http://127.0.0.1:$P_WEB_ADMIN/ready" || true
# shellcheck disable=SC2154
for pid in "$PID_web" "$PID_backend"; do callgrind_control -d "$pid" >/dev/null; done
sleep 1
python3 - "$ROOT/sidecar/link-order.txt" "$WORK"/callgrind.out.* <<'PY'
import re, sys
out, dumps = sys.argv[1], sys.argv[2:]
cost = {}
for path in dumps:
    fn, skip = None, False
    for line in open(path, errors="replace"):
        if line.startswith("fn="):
            fn = re.sub(r"'\d+$", "", line[3:].strip())
            continue
        if line.startswith("calls="):
            skip = True  # the next line is the call's inclusive cost, not this function's
            continue
        if line[:1].isdigit() or line[:1] in "+-*":
            if skip:
                skip = False
                continue
            parts = line.split()
            if fn and len(parts) >= 2 and parts[1].isdigit():
                cost[fn] = cost.get(fn, 0) + int(parts[1])
names = [f for f, c in sorted(cost.items(), key=lambda kv: -kv[1])
         if c > 0 and f.startswith("_") and not f.startswith("0x")]
with open(out, "w") as f:
    f.write("\n".join(names) + "\n")
print(f"{len(names)} functions ordered into {out}")
PY
