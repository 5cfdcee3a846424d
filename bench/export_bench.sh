#!/usr/bin/env bash
# Export benchmark (issue 12): runs examples/export_bench.rs, which serves a
# conversation of N messages and prints the bytes, time and peak RSS growth
# of its JSON and Markdown export.
#
#   bench/export_bench.sh [sqlite|postgres] [N]   e.g. bench/export_bench.sh sqlite 100000
# PROFILE=dev runs the debug build when a release build is too slow to make.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-release}"
cargo run --quiet --profile "$profile" --example export_bench -- "${1:-sqlite}" "${2:-100000}"
