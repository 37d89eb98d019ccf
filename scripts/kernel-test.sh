#!/bin/sh
# The kernel WireGuard tier: boots Debian's kernel under QEMU (virtme-ng, software
# emulation) with this checkout shared, loads the wireguard module and runs
# tests/kernel against it. Takes a few minutes.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh

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

kernel=$(ls /boot/vmlinuz-* | sort -V | tail -n 1)
PATH="$PWD/.venv/bin:$PATH"
export PATH
out=$(mktemp)
trap 'rm -f "$out"' EXIT
# --disable-kvm: KVM aborts on these machines ("failed to set MSR 0x10a").
vng --run "$kernel" --user root --disable-kvm --memory 2G \
    --exec "modprobe wireguard && .venv/bin/python -m pytest -p no:cacheprovider -q -m kernel tests/kernel; echo \"kernel-tier-exit=\$?\"" \
    2>&1 | tee "$out"
code=$(sed -n 's/.*kernel-tier-exit=\([0-9]*\).*/\1/p' "$out" | tail -n 1)
if [ -z "$code" ]; then
    echo "kernel tier: the guest did not report a result" >&2
    exit 1
fi
if [ "$code" -eq 5 ]; then
    echo "kernel tier: no tests collected" >&2
    exit 1
fi
exit "$code"
