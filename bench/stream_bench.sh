#!/usr/bin/env bash
# Streaming benchmark (issue 4): builds the release binary and the bench
# client, then runs examples/stream_bench.rs against it on loopback: added
# per-token latency p50/p99 and concurrent SSE / WebSocket streams sustained,
# with the server's peak RSS. Takes about two minutes after the build.
#
#   bench/stream_bench.sh [levels] [kinds]   e.g. bench/stream_bench.sh 100,500,1000,2000 sse,ws
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
# Thousands of sockets on each side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --quiet --bin palaver --example stream_bench
exec timeout 180 "$target/release/examples/stream_bench" "$target/release/palaver" "${1:-100,500,1000,2000}" "${2:-sse,ws}"
