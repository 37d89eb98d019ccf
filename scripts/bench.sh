#!/bin/sh
# Runs every benchmark and writes benchmarks/results.json.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
# kernel_reconcile boots a QEMU guest; without its packages it records why it skipped.
sh scripts/kernel-setup.sh || echo "kernel tier packages unavailable: kernel_reconcile will skip" >&2
exec .venv/bin/python -m benchmarks "$@"
