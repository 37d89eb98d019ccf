#!/bin/sh
# Regenerates the dependency locks from pyproject.toml:
#   requirements/runtime.txt  the wheel's runtime dependencies (what ships)
#   requirements/dev.txt      the dev extras, constrained by runtime.txt (what scripts/setup.sh installs)
# Both are fully pinned with the sha256 of every file of each pinned release (pip-compile
# --generate-hashes), so one lock serves CPython 3.11 on Linux x86-64 and aarch64 alike.
#
# Usage: sh scripts/lock.sh                         keep current pins, add/drop what changed
#        sh scripts/lock.sh --upgrade               move every pin to the newest release
#        sh scripts/lock.sh --upgrade-package NAME  move one pin
# Run it with CPython 3.11 on Linux (dependency markers are evaluated for the running
# interpreter). It resolves against PyPI and ignores local pip configuration (extra indexes,
# find-links), so the locks and their hashes are the same on every machine.
set -eu
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c 'import sys; raise SystemExit(sys.version_info[:2] != (3, 11) or sys.platform != "linux")'
then
    echo "lock: needs CPython 3.11 on Linux (set PYTHON=...)" >&2
    exit 1
fi
if ! "$PY" -c "import piptools" 2>/dev/null; then
    echo "lock: pip-tools is missing from $PY (sh scripts/setup.sh installs it)" >&2
    exit 1
fi

export PIP_CONFIG_FILE=/dev/null
unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CONSTRAINT PIP_NO_INDEX || true
export CUSTOM_COMPILE_COMMAND="sh scripts/lock.sh"

compile() {
    "$PY" -m piptools compile --quiet --generate-hashes --allow-unsafe \
        --strip-extras --no-emit-index-url --no-emit-find-links \
        --index-url https://pypi.org/simple "$@"
}

# The header each lock carries above pip-compile's own.
header() {
    cat <<EOF
# $1
# Locked for CPython 3.11 on Linux (x86-64 and aarch64): every pin carries the hashes of all
# files of its release. Regenerate with \`sh scripts/lock.sh\` (see docs/operations.md,
# "Building and locking"); do not edit by hand.
# Install: $2
EOF
}

mkdir -p requirements
compile "$@" --output-file requirements/runtime.txt pyproject.toml
compile "$@" --extra dev --constraint requirements/runtime.txt \
    --output-file requirements/dev.txt pyproject.toml

for lock in runtime dev; do
    case $lock in
    runtime)
        what="Runtime dependencies of the wiregate wheel."
        how="pip install --require-hashes -r requirements/runtime.txt && pip install --no-deps WHEEL"
        ;;
    dev)
        what="Development environment: runtime + the [dev] extras (pinned as in runtime.txt)."
        how="pip install --require-hashes -r requirements/dev.txt && pip install --no-deps -e ."
        ;;
    esac
    file="requirements/$lock.txt"
    # pip-compile's own header starts at the first bare "#" line: keep from there, put ours on top.
    body=$(sed -n '/^#$/,$p' "$file")
    {
        header "$what" "$how"
        printf '%s\n' "$body"
    } >"$file"
done
echo "lock: wrote requirements/runtime.txt requirements/dev.txt"
