#!/usr/bin/env bash
# Raw lapin vs the broker bridge: publish with pipelined confirms vs POST /v1/queues/{q} at 16, 32
# and 64 concurrent requests; consume+ack vs delivery to a trivial app. Prints msg/s and ratios.
# Needs RabbitMQ on 127.0.0.1:5672 (guest/guest). BENCH_N, BENCH_PREFETCH, BENCH_AMQP tune it.
set -euo pipefail
cd "$(dirname "$0")/.."
# Two builds: built together, the example's dev-dependencies would unify extra features into the
# sidecar binary, and the sidecar measured would not be the one `cargo build --release` gives.
cargo build --quiet --release -p outrider --bin outrider
cargo build --quiet --release -p outrider --example broker_bench
"${CARGO_TARGET_DIR:-target}"/release/examples/broker_bench
