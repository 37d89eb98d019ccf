#!/bin/sh
# The kernel WireGuard tier: boots Debian's kernel under QEMU (virtme-ng, software
# emulation) with this checkout shared, loads the wireguard module and runs
# tests/kernel against it (pytest marker "kernel"). Takes about 4 minutes.
#
#   sh scripts/kernel-test.sh          the netlink backend and a two-namespace tunnel
#   sh scripts/kernel-test.sh --lab    also the lab on kernel WireGuard (gateway and
#                                      three agents in the guest; marker "slow"): ~6 min
# WIREGATE_KERNEL_LAB=1 is the same as --lab.
set -eu
cd "$(dirname "$0")/.."
markers="kernel and not slow"
if [ "${1:-}" = "--lab" ] || [ "${WIREGATE_KERNEL_LAB:-0}" = "1" ]; then
    markers="kernel"
fi
sh scripts/setup.sh
sh scripts/kernel-setup.sh

kernel=$(find /boot -name 'vmlinuz-*' | sort -V | tail -n 1)
PATH="$PWD/.venv/bin:$PATH"
export PATH
out=$(mktemp)
trap 'rm -f "$out"' EXIT
started=$(date +%s)
# --disable-kvm: KVM aborts on these machines ("failed to set MSR 0x10a").
vng --run "$kernel" --user root --disable-kvm --memory 2G \
    --exec "modprobe wireguard && .venv/bin/python -m pytest -p no:cacheprovider -q -m '$markers' tests/kernel; echo \"kernel-tier-exit=\$?\"" \
    2>&1 | tee "$out"
echo "kernel tier: $(($(date +%s) - started)) s in the guest"
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
