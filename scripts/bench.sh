#!/bin/sh
# Runs every benchmark and writes benchmarks/results.json.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
exec .venv/bin/python -m benchmarks "$@"
