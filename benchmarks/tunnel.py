"""Tunnel throughput: a wiregate-managed tunnel against a hand-configured one.

One lab, two pairs of hosts on the same internet bridge: ``h1``/``h2`` joined by a
wireguard-go tunnel set up by hand (``wg set`` with key files, MTU 1420) and
``w1``/``w2`` joined by wiregate (gateway + two agents). iperf3 TCP runs alternate
between the two pairs so that noise on the machine hits both alike; the figures
are medians. With two CPUs or more, every pair runs the same way: the sending side
(iperf3 client and its wireguard-go) on CPU 0, the receiving side on CPU 1, so that
no run depends on where the scheduler happened to put the four busy processes.
``python -m benchmarks.tunnel`` prints one JSON object:

- ``tunnel_hand_mbps``, ``tunnel_wiregate_mbps``: median receiver throughput;
- ``tunnel_ratio``: the median over rounds of wiregate / hand, each round measuring both
  back to back (target >= 0.98); ``tunnel_ratio_of_medians`` for comparison;
- ``tunnel_control_ratio``: the same figure for a second hand-made tunnel against the
  first, i.e. the measurement's own noise floor on this machine (ideally 1.0);
- ``tunnel_ratio_spread``, ``tunnel_control_spread``: half the interquartile range of
  the per-round ratios (the figure resolves differences larger than about this);
- ``tunnel_rounds``, ``tunnel_pinned`` (1.0 when pinned as above).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from lab.harness import (
    WG_PORT,
    Host,
    Lab,
    Wiregate,
    lab_requirements,
    poll,
    write_secret,
)

__all__ = ["run"]

HAND_NET = "100.64.250"  # the hand-made tunnel's /24 (namespaced: no clash with wiregate's)
CONTROL_NET = "100.64.251"  # a second hand-made tunnel: the noise floor (ideal ratio 1.0)
HAND_MTU = 1420


def _genkey(path: Path) -> str:
    """Write a private key to ``path`` (0600); return the public key."""
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    write_secret(path, private.strip())
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    return public.strip()


def hand_tunnel(lab: Lab, a: Host, b: Host, net: str = HAND_NET) -> str:
    """Join ``a`` and ``b`` with a hand-configured wireguard-go tunnel; return b's tunnel IP."""
    keys = {h.name: _genkey(lab.workdir / f"{h.name}.key") for h in (a, b)}
    for index, (host, peer) in enumerate(((a, b), (b, a)), start=1):
        host.spawn(["wireguard-go", "-f", host.wg_ifname], name=f"wireguard-go-{host.name}")
        sock = Path(f"/var/run/wireguard/{host.wg_ifname}.sock")
        poll(sock.exists, timeout=10, what=f"{sock}")
        peer_ip = f"{net}.{3 - index}/32"
        host.run(["wg", "set", host.wg_ifname,
                  "private-key", str(lab.workdir / f"{host.name}.key"), "listen-port", str(WG_PORT),
                  "peer", keys[peer.name], "endpoint", f"{peer.addr}:{WG_PORT}",
                  "allowed-ips", peer_ip])  # fmt: skip
        host.run(["ip", "addr", "add", f"{net}.{index}/24", "dev", host.wg_ifname])
        host.run(["ip", "link", "set", host.wg_ifname, "up", "mtu", str(HAND_MTU)])
    return f"{net}.2"


def wiregate_tunnel(lab: Lab, a: Host, b: Host) -> str:
    """Join ``a`` and ``b`` through wiregate; return b's tunnel IPv4."""
    wiregate = Wiregate(lab)
    wiregate.start_gateway()
    key = wiregate.create_key(tags="tag:bench", expiry="1h", reusable=True)
    agents = [wiregate.start_agent(h, key) for h in (a, b)]
    wiregate.wait_mesh(agents, timeout=90)
    return wiregate.tunnel_addresses(agents[1])[0]


PIN = (os.cpu_count() or 1) >= 2
SENDER_CPU, RECEIVER_CPU = 0, 1


def _on_cpu(cpu: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if PIN else cmd


def pin_wireguard(host: Host, cpu: int) -> None:
    """Pin every thread of the wireguard-go serving ``host``'s interface to ``cpu``."""
    if not PIN:
        return
    pids = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _serves(entry, host.wg_ifname)
    ]
    if not pids:
        raise RuntimeError(f"no wireguard-go serves {host.wg_ifname}")
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), {cpu})


def _serves(proc: Path, ifname: str) -> bool:
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return Path(argv[0].decode(errors="replace")).name == "wireguard-go" and (
        ifname.encode() in argv[1:]
    )


def semi_iqr(values: list[float]) -> float:
    """Half the interquartile range of ``values``."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / 2


def iperf_mbps(client: Host, server_addr: str, seconds: int) -> float:
    """One iperf3 TCP run from ``client`` to ``server_addr``: receiver Mbit/s."""
    cmd = _on_cpu(SENDER_CPU, ["iperf3", "-c", server_addr, "-t", str(seconds), "-J"])
    out = client.run(cmd, timeout=seconds + 30).stdout
    doc = json.loads(out)
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e6


def start_iperf_server(host: Host) -> None:
    host.spawn(_on_cpu(RECEIVER_CPU, ["iperf3", "-s"]), name=f"iperf3-{host.name}")

    def listening() -> bool:
        return ":5201 " in host.run(["ss", "-Hltn"]).stdout

    poll(listening, timeout=10, what="iperf3 server")


def _mtu(host: Host) -> int:
    out = host.run(["cat", f"/sys/class/net/{host.wg_ifname}/mtu"]).stdout
    return int(out.strip())


def _measure(lab: Lab, rounds: int, seconds: int) -> dict[str, list[float]]:
    h1, h2, c1, c2, w1, w2 = (lab.add_host(n) for n in ("h1", "h2", "c1", "c2", "w1", "w2"))
    targets = {
        "hand": (h1, hand_tunnel(lab, h1, h2)),
        "control": (c1, hand_tunnel(lab, c1, c2, CONTROL_NET)),
        "wiregate": (w1, wiregate_tunnel(lab, w1, w2)),
    }
    mtus = {h.name: _mtu(h) for h in (h1, w1)}
    print(f"tunnel MTU: hand {mtus['h1']}, wiregate {mtus['w1']}", file=sys.stderr)
    for server in (h2, c2, w2):
        start_iperf_server(server)
    for sender, receiver in ((h1, h2), (c1, c2), (w1, w2)):
        pin_wireguard(sender, SENDER_CPU)
        pin_wireguard(receiver, RECEIVER_CPU)
    for client, addr in targets.values():
        poll(partial(client.ping, addr, timeout=1.0), timeout=20, what=f"ping {addr}")
    results: dict[str, list[float]] = {name: [] for name in targets}
    order = list(targets)
    for _ in range(rounds):
        for name in order:  # the order rotates every round so that drift hits all alike
            client, addr = targets[name]
            results[name].append(iperf_mbps(client, addr, seconds))
            time.sleep(0.5)
        order.append(order.pop(0))
    return results


def run(rounds: int = 15, seconds: int = 3) -> dict[str, float]:
    """Build the lab, measure alternately ``rounds`` times, tear down; return the figures."""
    if reason := lab_requirements():
        raise RuntimeError(reason)
    with Lab() as lab:
        try:
            results = _measure(lab, rounds, seconds)
        except Exception:
            print(lab.logs(), file=sys.stderr)
            raise
    hand = statistics.median(results["hand"])
    managed = statistics.median(results["wiregate"])
    paired = [w / h for w, h in zip(results["wiregate"], results["hand"], strict=True)]
    control = [c / h for c, h in zip(results["control"], results["hand"], strict=True)]
    return {
        "tunnel_ratio": round(statistics.median(paired), 4),
        "tunnel_control_ratio": round(statistics.median(control), 4),
        "tunnel_ratio_spread": round(semi_iqr(paired), 4),
        "tunnel_control_spread": round(semi_iqr(control), 4),
        "tunnel_rounds": float(len(paired)),
        "tunnel_pinned": 1.0 if PIN else 0.0,
        "tunnel_ratio_of_medians": round(managed / hand, 4),
        "tunnel_wiregate_mbps": round(managed, 1),
        "tunnel_hand_mbps": round(hand, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="wiregate vs hand-made tunnel throughput")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    try:
        figures = run(args.rounds, args.seconds)
    except Exception as exc:
        print(f"tunnel benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
