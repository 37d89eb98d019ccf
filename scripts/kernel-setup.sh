#!/bin/sh
# What the kernel tier needs on the host: Debian's kernel image (it has the
# WireGuard module), QEMU, busybox for the guest's init, and virtme-ng in the
# virtualenv. Used by scripts/kernel-test.sh and scripts/bench.sh.
set -eu
cd "$(dirname "$0")/.."

need=""
for pkg in linux-image-amd64 qemu-system-x86 busybox-static; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need="$need $pkg"
done
if [ -n "$need" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $need
fi
[ -x .venv/bin/vng ] || .venv/bin/pip install -q virtme-ng
# The guest sees this checkout read-only and starts Python very slowly (software
# emulation, 9p): compile the project's bytecode here so no process recompiles it.
.venv/bin/python -m compileall -q gateway identity relay benchmarks tests >/dev/null
