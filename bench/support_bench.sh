#!/usr/bin/env bash
# Support desk benchmark (issue 5): builds the release binary and the bench
# client, then runs examples/support_bench.rs: visitors and agents trading
# messages over the support sockets, with delivery latency p50/p99 each way,
# messages per second and the servers' peak RSS. Mode `one` is a single
# instance on SQLite; mode `two` is two instances on PostgreSQL + Redis with
# every message crossing Redis (PALAVER_BENCH_POSTGRES_URL and
# PALAVER_BENCH_REDIS_URL default to the local services).
#
# Each visitor sends a message every [pace] ms (default 2000; 0 = as soon as
# the previous one is answered, which shows the saturation throughput).
#
#   bench/support_bench.sh [levels] [one|two] [pace]   e.g. bench/support_bench.sh 100,500,1000 two 2000
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --quiet --bin palaver --example support_bench
exec timeout 600 "$target/release/examples/support_bench" "$target/release/palaver" "${1:-100,500,1000}" "${2:-one}" "${3:-2000}"
