#!/bin/sh
# bench/run.sh [report.py options]: builds the benchmark programs (make bench-build) and runs
# them all, interleaved, printing the Markdown table and writing it to bench/results.md.
# Examples: sh bench/run.sh            (the full run, what `make bench` does)
#           sh bench/run.sh --quick --reps 1 --only W1,W3   (a smoke run)
set -e
cd "$(dirname "$0")/.."
BENCH="${BENCH:-build-bench}"
${MAKE:-make} -s bench-build BENCH="$BENCH"
exec python3 bench/report.py --build "$BENCH" "$@"
