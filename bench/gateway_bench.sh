#!/usr/bin/env bash
# Gateway benchmark: builds the release binary and the bench client, then
# runs examples/gateway_bench.rs: the same OpenAI chat completions request
# sent to a mock provider directly and through Palaver's
# /v1/chat/completions (API key), at 1 connection and at 64 (closed loop,
# then paced at the offered rate), non-stream and streamed. Prints the
# latency percentiles, requests/s and CPU per request of each, then the
# added latency against its targets. Takes about a minute after the build.
#
#   bench/gateway_bench.sh [connections] [seconds per phase] [paced req/s]   e.g. bench/gateway_bench.sh 1,64 5 10000
#   PALAVER_BENCH_PERF=/tmp/gateway.perf bench/gateway_bench.sh   # also perf-records the server (perturbs that phase)
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --quiet --bin palaver --example gateway_bench
exec timeout 600 "$target/release/examples/gateway_bench" "$target/release/palaver" "${1:-1,64}" "${2:-5}" "${3:-10000}"
