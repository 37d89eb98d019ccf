"""wiregate demo: a gateway and three agents in a network-namespace lab.

Builds the lab, enrolls three hosts with one enrollment key, waits until every
agent holds the full map, prints a status table and a ✓/✗ matrix of pings across
every tunnel (IPv4 and IPv6), then tears everything down. Exits non-zero if any
ping fails. ``--keep`` leaves the lab running until Ctrl-C.

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

from tests.lab.harness import Agent, Lab, Wiregate, bare, lab_requirements

HOSTS = ("alpha", "bravo", "charlie")
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
            print(f"lab {lab.prefix}: internet 198.51.100.0/24, hosts {', '.join(HOSTS)}")
            hosts = [lab.add_host(name) for name in HOSTS]
            wiregate = Wiregate(lab)
            wiregate.start_gateway()
            print(f"gateway ready on {wiregate.server} (admin socket {wiregate.admin_socket})")
            key = wiregate.create_key(tags="tag:demo", expiry="1h", reusable=True)
            agents = {h.name: wiregate.start_agent(h, key) for h in hosts}
            wiregate.wait_mesh(list(agents.values()), timeout=90)
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
