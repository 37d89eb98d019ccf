#!/bin/sh
# Runs the benchmarks (python -m benchmarks; see benchmarks/__main__.py).
#   sh scripts/bench.sh            every benchmark; writes benchmarks/results.json, each figure
#                                  from this run (or NAME_skipped: why) with the commit and date
#   sh scripts/bench.sh NAME...    those only; the file says which run each figure came from
#   sh scripts/bench.sh --quick    the ones that take seconds, checked against their bands;
#                                  writes no file (CI runs it)
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
if [ "${1:-}" != "--quick" ]; then
    # kernel_reconcile boots a QEMU guest; without its packages it records why it skipped.
    sh scripts/kernel-setup.sh || echo "kernel tier packages unavailable: kernel_reconcile will skip" >&2
fi
exec .venv/bin/python -m benchmarks "$@"
