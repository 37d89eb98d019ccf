#!/bin/sh
# The main job on embedded defaults: a gateway (SQLite) and three agents in a
# network-namespace lab, a status table, and pings across every tunnel.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
