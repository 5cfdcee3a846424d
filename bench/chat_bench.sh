#!/usr/bin/env bash
# Chat round-trip benchmark (issue 13): builds the release binary and the
# bench client, then runs examples/chat_bench.rs: the machine's limit (a
# static answer), the mock provider directly, and Palaver's
# POST /api/conversations/{id}/messages at 8/16/64 connections on SQLite and
# (when PALAVER_BENCH_POSTGRES_URL answers) PostgreSQL, GET /api/conversations
# at 16, and the 1-connection round trip on short and 10,000-message
# histories. Prints one table with ratios and the issue's targets. Takes a
# few minutes after the build.
#
#   bench/chat_bench.sh [seconds per phase] [engines] [connections]   e.g. bench/chat_bench.sh 5 sqlite,postgres 8,16,64
#   PALAVER_BENCH_PERF=/tmp/chat.perf bench/chat_bench.sh   # also perf-records the server in the SQLite 64-connection send phase
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --quiet --bin palaver --example chat_bench
exec timeout 900 "$target/release/examples/chat_bench" "$target/release/palaver" "${1:-5}" "${2:-sqlite,postgres}" "${3:-8,16,64}"
