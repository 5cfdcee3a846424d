#!/usr/bin/env bash
# Search benchmark (issue 12): runs examples/search_bench.rs, which seeds N
# messages across 1,000 users (and one heavy user with 20,000) and prints
# p50/p99 of the store's search for a common and a rare term.
#
#   bench/search_bench.sh [sqlite|postgres] [sizes]   e.g. bench/search_bench.sh sqlite 10000,1000000
# PROFILE=dev runs the debug build (dependencies at opt-level 1) when a
# release build is too slow to make.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-release}"
cargo run --quiet --profile "$profile" --example search_bench -- "${1:-sqlite}" "${2:-10000,1000000}"
