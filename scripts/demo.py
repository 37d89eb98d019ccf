"""wiregate demo: a gateway, a local OpenID Provider and five agents in a netns lab.

Builds the lab, starts a real OpenID Provider (panva's oidc-provider,
tests/idp/provider.mjs) on the loopback of the lab's internet namespace next to
the gateway, whose single sign-on it configures (``[[gateway.oidc]]``,
``public_url``). The gateway serves HTTPS, as in a real deployment, with a
certificate of a local CA made for the lab (lab/tls.py); every client (agents,
``wiregate login``, the browser) trusts that CA with ``--ca-file``. Enrolls
three hosts with one enrollment key, and a fourth by ``wiregate login``: its
user code is approved through the gateway's web pages after signing in at the
IdP (an HTTP client plays the browser, inside the namespace); a fifth agent
enrolls with a workload token the same IdP minted for the gateway
(``client_credentials``, an RFC 9068 JWT access token) instead of a key. Waits
until every agent holds the full map, prints a status table, a ✓/✗ matrix of
pings across every tunnel (IPv4 and IPv6) and the sign-in URL with a test
account, then tears everything down. Exits non-zero if any step or ping fails.
``--keep`` leaves the lab running until Ctrl-C.

    sudo .venv/bin/python scripts/demo.py [--keep]
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import time
from types import FrameType
from typing import Any

from lab.harness import Agent, Lab, Wiregate, bare, lab_requirements
from lab.sso import (
    TEST_ACCOUNT,
    enroll_by_sso,
    enroll_by_workload_token,
    gateway_config,
    loopback_public_url,
    start_gateway,
    start_idp,
)

HOSTS = ("alpha", "bravo", "charlie")
SSO_HOST = "delta"  # enrolled by `wiregate login`, approved through the IdP
WORKLOAD_HOST = "echo"  # enrolled with a workload token the IdP minted (client_credentials)
FAMILIES = ("v4", "v6")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _age(timestamp: float | None, now: float) -> str:
    return f"{now - timestamp:.0f}s ago" if timestamp else "never"


def status_table(statuses: dict[str, dict[str, Any]]) -> str:
    """One block per device: its addresses, then one line per peer."""
    now = time.time()
    header = (
        f"{'DEVICE':<9} {'TUNNEL ADDRESSES':<34} {'PEER':<9} "
        f"{'HANDSHAKE':>10} {'RX':>10} {'TX':>10}"
    )
    lines = [header, "-" * len(header)]
    for name, st in statuses.items():
        addrs = " ".join(bare(a) for a in st["device"]["addresses"])
        state = "connected" if st["gateway"]["connected"] else "DISCONNECTED"
        lines.append(
            f"{name:<9} {addrs:<34} (gateway {state}, map v{st['gateway']['map_version']})"
        )
        for peer in st["peers"]:
            lines.append(
                f"{'':<9} {'':<34} {peer['name']:<9} {_age(peer['last_handshake'], now):>10} "
                f"{_size(peer['rx_bytes']):>10} {_size(peer['tx_bytes']):>10}"
            )
    return "\n".join(lines)


def ping_matrix(wiregate: Wiregate, agents: dict[str, Agent]) -> dict[tuple[str, str, str], bool]:
    """(source, destination, family) -> did a ping across the tunnel succeed (10 s to try)."""
    addresses = {name: wiregate.tunnel_addresses(agent) for name, agent in agents.items()}
    result = {}
    for src, dst in itertools.permutations(agents, 2):
        for family, addr in zip(FAMILIES, addresses[dst], strict=False):
            host = agents[src].host
            deadline = time.monotonic() + 10
            ok = False
            while not ok and time.monotonic() < deadline:
                ok = host.ping(addr, count=1, timeout=1.0)
            result[(src, dst, family)] = ok
    return result


def matrix_text(names: list[str], matrix: dict[tuple[str, str, str], bool]) -> str:
    width = max(len(n) for n in names) + 2
    corner = "from \\ to"
    lines = [f"{corner:<{width}}" + "".join(f"{n:^{width + 4}}" for n in names)]
    for src in names:
        cells = []
        for dst in names:
            if src == dst:
                cells.append(f"{'·':^{width + 4}}")
                continue
            marks = " ".join(
                f"{fam}{'✓' if matrix.get((src, dst, fam)) else '✗'}" for fam in FAMILIES
            )
            cells.append(f"{marks:^{width + 4}}")
        lines.append(f"{src:<{width}}" + "".join(cells))
    return "\n".join(lines)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def demo(keep: bool) -> int:
    with Lab() as lab:
        try:
            names = ", ".join((*HOSTS, SSO_HOST, WORKLOAD_HOST))
            print(f"lab {lab.prefix}: internet 198.51.100.0/24, hosts {names}")
            hosts = [lab.add_host(name) for name in HOSTS]
            wiregate = Wiregate(lab, tls=True)
            public_url = loopback_public_url(lab, tls=True)
            issuer, _idp = start_idp(lab, public_url)
            print(f"OpenID Provider (panva oidc-provider) ready at {issuer}")
            start_gateway(wiregate, gateway_config(lab, public_url, issuer))
            print(f"gateway ready on {wiregate.server} over TLS, public_url {public_url}"
                  f" (admin socket {wiregate.admin_socket})")  # fmt: skip
            print(f"agents, `wiregate login` and the browser trust the lab CA {wiregate.ca_file}")
            key = wiregate.create_key(tags="tag:demo", expiry="1h", reusable=True)
            agents = {h.name: wiregate.start_agent(h, key) for h in hosts}
            agents[SSO_HOST] = enroll_by_sso(lab, wiregate, lab.add_host(SSO_HOST))
            [owner] = [d["identity"] for d in wiregate.devices() if d["name"] == SSO_HOST]
            print(f"{SSO_HOST}: `wiregate login` approved at the web pages after signing in at"
                  f" the IdP; owner {owner['issuer']} subject {owner['subject']}")  # fmt: skip
            agents[WORKLOAD_HOST] = enroll_by_workload_token(
                lab, wiregate, lab.add_host(WORKLOAD_HOST), issuer, public_url
            )
            wiregate.wait_mesh(list(agents.values()), timeout=90)
            [tags] = [d["tags"] for d in wiregate.devices() if d["name"] == WORKLOAD_HOST]
            print(f"{WORKLOAD_HOST}: enrolled with a workload token from the IdP (client_"
                  f"credentials, audience {public_url}); tags {', '.join(tags)}")  # fmt: skip
            print("every agent holds the full map\n")
            matrix = ping_matrix(wiregate, agents)
            statuses = {name: wiregate.status(agent) for name, agent in agents.items()}
            print(status_table(statuses), end="\n\n")
            print(matrix_text(list(agents), matrix), end="\n\n")
        except Exception as exc:
            print(f"demo failed: {exc}\n\n{lab.logs()}", file=sys.stderr)
            return 1
        ok = all(matrix.values())
        print("all tunnels up" if ok else "SOME TUNNELS FAILED")
        print(
            f"\nsingle sign-on: {public_url}/devices (inside the lab's internet namespace:"
            f" ip netns exec {lab.internet.netns} ...; trust the CA {wiregate.ca_file})\n"
            f"  IdP {issuer}, test account: any login, e.g. {TEST_ACCOUNT} (any password;"
            " admin* logins may use /admin)"
        )
        if keep:
            _wait_for_interrupt(lab, wiregate, agents)
        return 0 if ok else 1


def _wait_for_interrupt(lab: Lab, wiregate: Wiregate, agents: dict[str, Agent]) -> None:
    first = next(iter(agents.values()))
    cli = " ".join(wiregate.cmd)
    print(
        f"\nlab kept running; try:\n"
        f"  ip netns exec {first.host.netns} {cli} status --run-dir {first.run_dir}\n"
        f"  ip netns exec {first.host.netns} wg show {first.iface}\n"
        f"logs in {lab.workdir}\nCtrl-C tears it down."
    )
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print("\ntearing down")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="wiregate in a network-namespace lab")
    parser.add_argument("--keep", action="store_true", help="leave the lab up until Ctrl-C")
    args = parser.parse_args(argv)
    if reason := lab_requirements():
        print(f"cannot run the demo: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)  # teardown on kill, too
    try:
        return demo(args.keep)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
