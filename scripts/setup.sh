#!/bin/sh
# Installs what wiregate needs on Debian 12: system packages and the project's virtualenv.
# Idempotent: re-running only installs what is missing or changed.
set -eu
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (it installs packages and builds network namespaces)" >&2
    exit 1
fi

PACKAGES="python3 python3-venv python3-dev gcc make wireguard-go wireguard-tools iproute2 \
iptables nftables conntrack iputils-ping tcpdump iperf3 procps kmod systemd chromium shellcheck \
faketime postgresql coturn dnsmasq-base dnsperf"

missing=""
for pkg in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "setup: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi

# The venv comes from the hash-checked lock (requirements/dev.txt, made by scripts/lock.sh; it
# pins pip itself too), then the project on top without resolving anything more.
PY=/usr/bin/python3
stamp=".venv/.wiregate-installed"
want=$(cat pyproject.toml requirements/runtime.txt requirements/dev.txt | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/pip install -q --require-hashes -r requirements/dev.txt
    .venv/bin/pip install -q --no-deps -e .
    echo "$want" > "$stamp"
fi

# tests/idp: a real OpenID Provider (panva's oidc-provider, from npm) for the OIDC tests.
# Debian 12's nodejs is 18; oidc-provider 8.x runs on it.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends nodejs npm
fi
if ! cmp -s tests/idp/package-lock.json tests/idp/node_modules/.wiregate-lock 2>/dev/null; then
    (cd tests/idp && npm ci --no-audit --no-fund --loglevel=error)
    cp tests/idp/package-lock.json tests/idp/node_modules/.wiregate-lock
fi
