"""Tunnel throughput: a wiregate-managed tunnel against a hand-configured one.

One lab, three pairs of hosts on the same internet bridge: ``w1``/``w2`` joined by
wiregate (gateway + two agents), ``h1``/``h2`` and ``c1``/``c2`` each joined by a
wireguard-go tunnel set up by hand (``wg set`` with key files) with the MTU the
agent chose (1440 on this 1500-byte IPv4 underlay: what a careful operator would
set by hand, so that only the rest of the configuration is compared). With two
CPUs or more, every pair runs the same way: the sending side (iperf3 client and
its wireguard-go) on CPU 0, the receiving side on CPU 1. Each pair first runs a
discarded warm-up; then each round runs iperf3 TCP through every pair back to
back, the order rotating every round, so that drift and noise on the machine hit
all pairs alike. ``python -m benchmarks.tunnel`` prints one JSON object:

- ``tunnel_ratio``: the median over rounds of wiregate / hand throughput (target
  >= 0.98); ``tunnel_control_ratio``: the same for the second hand-made tunnel
  against the first, the measurement's own bias on this machine (ideally 1.0);
- ``tunnel_ratio_spread``, ``tunnel_control_spread``: half the width of the
  distribution-free 95 % confidence interval of that median (order statistics of
  the per-round ratios): the figure resolves differences larger than this (30 rounds: the 10th and
  21st of the sorted ratios);
- ``tunnel_ratio_semi_iqr``, ``tunnel_control_semi_iqr``: half the interquartile
  range of the per-round ratios (how much one round scatters);
- ``tunnel_cpu_ratio``, ``tunnel_control_cpu_ratio`` (and their ``_spread``): the
  same medians for throughput per CPU-second of the pair's processes (both
  wireguard-go, both iperf3, with the kernel work done in their context), which
  a busy machine disturbs much less than throughput;
- ``tunnel_hand_mbps``, ``tunnel_wiregate_mbps``: median receiver throughput;
  ``tunnel_ratio_of_medians``; ``tunnel_rounds``, ``tunnel_mtu``, ``tunnel_pinned``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
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
PAIRS = ("hand", "control", "wiregate")


def _genkey(path: Path) -> str:
    """Write a private key to ``path`` (0600); return the public key."""
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    write_secret(path, private.strip())
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    return public.strip()


def hand_tunnel(lab: Lab, a: Host, b: Host, net: str = HAND_NET, mtu: int = 1420) -> str:
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
        host.run(["ip", "link", "set", host.wg_ifname, "up", "mtu", str(mtu)])
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


def wireguard_pids(host: Host) -> list[int]:
    """The pids of the wireguard-go serving ``host``'s interface."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _serves(entry, host.wg_ifname)
    ]


def pin_wireguard(host: Host, cpu: int) -> None:
    """Pin every thread of the wireguard-go serving ``host``'s interface to ``cpu``."""
    if not PIN:
        return
    pids = wireguard_pids(host)
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


def cpu_seconds(pids: list[int]) -> float:
    """CPU time used so far by every thread of ``pids`` (the scheduler's, in ns)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):  # a thread that just ended
                continue
    return total / 1e9


def semi_iqr(values: list[float]) -> float:
    """Half the interquartile range of ``values``."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / 2


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of ``values``.

    The order statistics ``x(k)`` and ``x(n+1-k)`` with the largest ``k`` such that
    at most ``(1 - level) / 2`` of Binomial(n, 1/2) lies below ``k`` (n = 24: the
    7th and 18th values). With fewer than 6 values, the extremes.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return (math.nan, math.nan)
    tail, k = 0.0, 0
    while k < n // 2 and tail + math.comb(n, k) / 2**n <= (1 - level) / 2:
        tail += math.comb(n, k) / 2**n
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def half_ci(values: list[float]) -> float:
    """Half the width of :func:`median_ci`."""
    low, high = median_ci(values)
    return (high - low) / 2


@dataclass(frozen=True, slots=True)
class Pair:
    """A tunnel to measure: the client host, the server's tunnel address, the CPU to watch."""

    client: Host
    addr: str
    pids: tuple[int, ...]  # both wireguard-go and the iperf3 server


@dataclass(frozen=True, slots=True)
class Sample:
    mbps: float  # receiver throughput
    per_cpu: float  # Mbit per CPU-second of the pair's processes


def iperf(pair: Pair, seconds: float) -> Sample:
    """One iperf3 TCP run through ``pair``."""
    cmd = _on_cpu(SENDER_CPU, ["iperf3", "-c", pair.addr, "-t", str(seconds), "-J"])
    before = cpu_seconds(list(pair.pids))
    out = pair.client.run(cmd, timeout=seconds + 30).stdout
    used = cpu_seconds(list(pair.pids)) - before
    end = json.loads(out)["end"]
    mbps = float(end["sum_received"]["bits_per_second"]) / 1e6
    client = float(end["cpu_utilization_percent"]["host_total"]) / 100
    used += client * float(end["sum_sent"]["seconds"])
    megabits = float(end["sum_received"]["bytes"]) * 8 / 1e6
    return Sample(mbps, megabits / used if used > 0 else math.nan)


def iperf_mbps(client: Host, server_addr: str, seconds: float) -> float:
    """One iperf3 TCP run from ``client`` to ``server_addr``: receiver Mbit/s."""
    return iperf(Pair(client, server_addr, ()), seconds).mbps


def start_iperf_server(host: Host) -> int:
    """Start ``iperf3 -s`` in ``host``; return its pid."""
    proc = host.spawn(_on_cpu(RECEIVER_CPU, ["iperf3", "-s"]), name=f"iperf3-{host.name}")

    def listening() -> bool:
        return ":5201 " in host.run(["ss", "-Hltn"]).stdout

    poll(listening, timeout=10, what="iperf3 server")
    return proc.pid


def _mtu(host: Host) -> int:
    out = host.run(["cat", f"/sys/class/net/{host.wg_ifname}/mtu"]).stdout
    return int(out.strip())


def _pairs(lab: Lab) -> tuple[dict[str, Pair], int]:
    """The three tunnels, pinned and answering; and their MTU."""
    h1, h2, c1, c2, w1, w2 = (lab.add_host(n) for n in ("h1", "h2", "c1", "c2", "w1", "w2"))
    w_addr = wiregate_tunnel(lab, w1, w2)
    mtu = _mtu(w1)  # the hand-made tunnels get the MTU the agent chose
    hosts = {
        "hand": (h1, h2, hand_tunnel(lab, h1, h2, mtu=mtu)),
        "control": (c1, c2, hand_tunnel(lab, c1, c2, CONTROL_NET, mtu=mtu)),
        "wiregate": (w1, w2, w_addr),
    }
    mtus = {name: (_mtu(a), _mtu(b)) for name, (a, b, _) in hosts.items()}
    print(f"tunnel MTUs: {mtus}", file=sys.stderr)
    if len({m for both in mtus.values() for m in both}) != 1:
        raise RuntimeError(f"the tunnels' MTUs differ: {mtus}")
    pairs = {}
    for name, (sender, receiver, addr) in hosts.items():
        server = start_iperf_server(receiver)
        pin_wireguard(sender, SENDER_CPU)
        pin_wireguard(receiver, RECEIVER_CPU)
        poll(partial(sender.ping, addr, timeout=1.0), timeout=20, what=f"ping {addr}")
        pids = (*wireguard_pids(sender), *wireguard_pids(receiver), server)
        pairs[name] = Pair(sender, addr, pids)
    return pairs, mtu


def _measure(lab: Lab, rounds: int, seconds: float) -> tuple[dict[str, list[Sample]], int]:
    pairs, mtu = _pairs(lab)
    for pair in pairs.values():
        iperf(pair, 1)  # warm-up (ARP, TCP metrics, caches, the CPU's clock): discarded
    results: dict[str, list[Sample]] = {name: [] for name in pairs}
    order = list(pairs)
    for _ in range(rounds):
        for name in order:  # the order rotates every round so that drift hits all alike
            results[name].append(iperf(pairs[name], seconds))
            time.sleep(0.2)
        order.append(order.pop(0))
    return results, mtu


def _ratios(results: dict[str, list[Sample]], name: str, attr: str) -> list[float]:
    ref = results["hand"]
    return [getattr(x, attr) / getattr(h, attr) for x, h in zip(results[name], ref, strict=True)]


def figures(results: dict[str, list[Sample]], mtu: int) -> dict[str, float]:
    """The benchmark's figures from per-round samples (pure)."""
    hand = statistics.median(s.mbps for s in results["hand"])
    managed = statistics.median(s.mbps for s in results["wiregate"])
    paired, control = _ratios(results, "wiregate", "mbps"), _ratios(results, "control", "mbps")
    cpu, cpu_control = (_ratios(results, n, "per_cpu") for n in ("wiregate", "control"))
    return {
        "tunnel_ratio": round(statistics.median(paired), 4),
        "tunnel_ratio_spread": round(half_ci(paired), 4),
        "tunnel_control_ratio": round(statistics.median(control), 4),
        "tunnel_control_spread": round(half_ci(control), 4),
        "tunnel_ratio_semi_iqr": round(semi_iqr(paired), 4),
        "tunnel_control_semi_iqr": round(semi_iqr(control), 4),
        "tunnel_cpu_ratio": round(statistics.median(cpu), 4),
        "tunnel_cpu_spread": round(half_ci(cpu), 4),
        "tunnel_control_cpu_ratio": round(statistics.median(cpu_control), 4),
        "tunnel_control_cpu_spread": round(half_ci(cpu_control), 4),
        "tunnel_rounds": float(len(paired)),
        "tunnel_mtu": float(mtu),
        "tunnel_pinned": 1.0 if PIN else 0.0,
        "tunnel_ratio_of_medians": round(managed / hand, 4),
        "tunnel_wiregate_mbps": round(managed, 1),
        "tunnel_hand_mbps": round(hand, 1),
    }


def run(rounds: int = 30, seconds: float = 2) -> dict[str, float]:
    """Build the lab, measure alternately ``rounds`` times, tear down; return the figures."""
    if reason := lab_requirements():
        raise RuntimeError(reason)
    with Lab() as lab:
        try:
            results, mtu = _measure(lab, rounds, seconds)
        except Exception:
            print(lab.logs(), file=sys.stderr)
            raise
    return figures(results, mtu)


def main() -> int:
    parser = argparse.ArgumentParser(description="wiregate vs hand-made tunnel throughput")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=2)
    args = parser.parse_args()
    try:
        result = run(args.rounds, args.seconds)
    except Exception as exc:
        print(f"tunnel benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
