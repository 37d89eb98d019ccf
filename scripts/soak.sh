#!/bin/sh
# The full soak: 300 simulated agents churning for 35 minutes (5 of warm-up, then 30
# in which each gateway's RSS must grow < 5 %) against the gateway replicas on a
# throwaway PostgreSQL while real wireguard-go tunnels carry iperf3 and ping
# (tests/soak/driver.py). Needs root (network namespaces), wireguard-go, iperf3 and
# Debian's PostgreSQL. Prints the summary and writes benchmarks/soak.json; exits 1 if
# an invariant or a bound failed. Extra arguments go to the driver, e.g.
#   scripts/soak.sh --minutes 30 --agents 500 --replicas 2
# `scripts/soak.sh memory [ARGS]`: the memory soak only (tests/soak/memory.py: the
# simulated agents against replicas on loopback, RSS and allocator figures, the same
# RSS bound; --trace for tracemalloc); writes the "memory" section of soak.json.
set -eu
cd "$(dirname "$0")/.."
if [ "${1:-}" = memory ]; then
    shift
    exec .venv/bin/python -m tests.soak.memory --out benchmarks/soak.json --section memory "$@"
fi
exec .venv/bin/python -m tests.soak --profile full --out benchmarks/soak.json "$@"
