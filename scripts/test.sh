#!/bin/sh
# The test command: installs what it needs, then lint, types, unit and lab tests.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
status=0
.venv/bin/python -m pytest -p no:cacheprovider -q -ra "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$status"
