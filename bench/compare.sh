#!/usr/bin/env bash
# Issue 9's side-by-side run: Outrider vs nginx and HAProxy mTLS sidecar pairs vs direct, plus
# gRPC unary through the Outrider pair, interleaved, with a PNG latency plot. See bench/pair.sh.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/pair.sh" --compare "$@"
