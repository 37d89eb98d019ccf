#!/bin/sh
# The full soak: 300 simulated agents churning for 10 minutes against the gateway
# replicas on a throwaway PostgreSQL while real wireguard-go tunnels carry iperf3 and
# ping (tests/soak/driver.py). Needs root (network namespaces), wireguard-go, iperf3
# and Debian's PostgreSQL. Prints the summary and writes benchmarks/soak.json; exits 1
# if an invariant or a bound failed. Extra arguments go to the driver, e.g.
#   scripts/soak.sh --minutes 30 --agents 500 --replicas 2
set -eu
cd "$(dirname "$0")/.."
exec .venv/bin/python -m tests.soak --profile full --out benchmarks/soak.json "$@"
