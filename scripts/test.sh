#!/bin/sh
# The test command: installs what it needs, then lint, types, unit, lab and e2e tests,
# then the image tier (buildah) and the kernel tier under QEMU.
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
[ "$status" -eq 0 ] || exit "$status"

# The quick benchmarks (netmap, reconcile, enroll): same-run ratios inside generous bands
# (benchmarks/record.py BANDS); writes no file. WIREGATE_SKIP_BENCH=1 leaves them out.
if [ "${WIREGATE_SKIP_BENCH:-0}" = "1" ]; then
    echo "== bench-quick skipped (WIREGATE_SKIP_BENCH=1)"
else
    echo "== bench-quick"
    .venv/bin/python -m benchmarks --quick >/dev/null
fi

# The container image (deploy/Containerfile), built without a registry and run with
# buildah (tests/image). WIREGATE_SKIP_IMAGE=1 leaves it out for a quick local run.
if [ "${WIREGATE_SKIP_IMAGE:-0}" = "1" ]; then
    echo "== image tier skipped (WIREGATE_SKIP_IMAGE=1)"
else
    echo "== image tier (buildah)"
    sh scripts/image.sh
    .venv/bin/python -m pytest -p no:cacheprovider -q -ra -m image tests/image
fi

# The kernel WireGuard backend in a real kernel (Debian's, under QEMU).
# WIREGATE_SKIP_KERNEL=1 leaves it out for a quick local run.
if [ "${WIREGATE_SKIP_KERNEL:-0}" = "1" ]; then
    echo "== kernel tier skipped (WIREGATE_SKIP_KERNEL=1)"
else
    echo "== kernel tier (QEMU)"
    sh scripts/kernel-test.sh
fi
