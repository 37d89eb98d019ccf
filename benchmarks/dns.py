"""Mesh-domain queries per second: the agent's DNS server against dnsmasq, same names, same run.

Servers, each pinned to CPU 0 (``taskset``), on loopback of this machine:

- the agent's DNS server (:class:`agent.dns.server.DnsServer` answering from
  :func:`agent.dns.zone.build_zone`, the code an agent runs) for a map of
  ``--names`` devices under ``wg.internal``;
- Debian's ``dnsmasq`` with the same devices as ``--host-record`` entries (A and
  AAAA) and ``--local=/wg.internal/`` (authoritative: never forwarded).

The load is ``dnsperf`` (Debian's package, pinned to CPU 1) asking A and AAAA of
every name in turn with up to 500 queries in flight, for ``--seconds`` per round;
rounds alternate between the two servers so noise on the machine hits both alike,
and figures are medians. One answer of each server is checked first (the right
addresses). Latency is measured apart, one query in flight (a Python client on
CPU 1, 2000 queries per server).

``python -m benchmarks.dns`` prints one JSON object (last line):

- ``dns_qps``, ``dnsmasq_qps``: median answers per second of each;
- ``dns_vs_dnsmasq``: median over rounds of ours / dnsmasq's (target >= 0.5);
- ``dns_p50_ms``, ``dns_p99_ms``, ``dnsmasq_p50_ms``, ``dnsmasq_p99_ms``: round-trip
  latency percentiles, one query in flight;
- ``dns_lost_frac``: the share of our queries dnsperf counted as lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path

import dns.message
import dns.rdatatype

from benchmarks.stun import free_port, server

__all__ = ["run"]

DOMAIN = "wg.internal"
SERVER_CPU, CLIENT_CPU = "0", "1"
OUTSTANDING = 500  # dnsperf's queries in flight


def devices(n: int) -> list[tuple[str, str, str]]:
    """``n`` device names with their tunnel addresses (IPv4, IPv6)."""
    return [(f"node-{i}", f"100.64.{i // 250}.{i % 250 + 1}", f"fd7a:7767:6174::{i + 1:x}")
            for i in range(n)]  # fmt: skip


# -- the agent's server, as a process of its own ----------------------------------------


async def serve(port: int, n: int) -> None:
    """The agent's DNS server on 127.0.0.1:``port`` for ``n`` devices, until killed."""
    from agent.dns.server import DnsServer
    from agent.dns.zone import build_zone
    from wiregate.model import DnsConfig, NetMap, Peer, SelfView

    own = SelfView("self", "bench", "k", ("100.127.0.1/32",), dns=DnsConfig(DOMAIN))
    peers = {name: Peer(name, name, "k", (f"{v4}/32", f"{v6}/128"), (f"{v4}/32",))
             for name, v4, v6 in devices(n)}  # fmt: skip
    server = DnsServer(port=port)
    await server.listen(["127.0.0.1"])
    server.set_zone(build_zone(NetMap(1, own, peers), DnsConfig(DOMAIN)))
    print("ready", flush=True)
    await asyncio.Event().wait()


def process(cmd: list[str], ready: str, log: Path) -> AbstractContextManager[int]:
    """``cmd`` pinned to the server CPU until the block ends; yields its pid once ready."""
    return server(["taskset", "-c", SERVER_CPU, *cmd], ready, {}, log)


def ours(port: int, n: int, log: Path) -> AbstractContextManager[int]:
    cmd = [sys.executable, "-m", "benchmarks.dns", "--serve", str(port), "--names", str(n)]
    return process(cmd, "ready", log)


def dnsmasq(port: int, n: int, log: Path) -> AbstractContextManager[int]:
    records = [f"--host-record={name}.{DOMAIN},{v4},{v6}" for name, v4, v6 in devices(n)]
    cmd = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
           "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={port}",
           "--user=root", "--pid-file", "--log-facility=-", f"--local=/{DOMAIN}/",
           *records]  # fmt: skip
    return process(cmd, "started, version", log)


# -- the load and the checks -------------------------------------------------------------


def check(port: int, name: str, v4: str) -> None:
    """One A query: the server answers ``v4`` for ``name``."""
    query = dns.message.make_query(f"{name}.{DOMAIN}", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(query.to_wire(), ("127.0.0.1", port))
        answer = dns.message.from_wire(sock.recv(4096))
    got = [r.address for r in answer.answer[0]] if answer.answer else []
    if got != [v4]:
        raise RuntimeError(f"port {port} answered {got} for {name}, not {v4}")


def dnsperf(port: int, queries: Path, seconds: float) -> tuple[float, float]:
    """(answers per second, lost share) of dnsperf's run against ``port``."""
    cmd = ["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port),
           "-d", str(queries), "-l", str(seconds), "-q", str(OUTSTANDING), "-t", "2"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30,
                         check=True).stdout  # fmt: skip
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    sent = re.search(r"Queries sent:\s+(\d+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    if not (qps and sent and lost):
        raise RuntimeError(f"dnsperf printed no figures:\n{out[-2000:]}")
    return float(qps.group(1)), int(lost.group(1)) / max(1, int(sent.group(1)))


LATENCY = """\
import socket, sys, time
import dns.message
port, n, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
wires = [dns.message.make_query(f"node-{i % n}.wg.internal", "A").to_wire() for i in range(count)]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(1)
sock.connect(("127.0.0.1", port))
took = []
for wire in wires:
    start = time.perf_counter_ns()
    sock.send(wire)
    sock.recv(4096)
    took.append(time.perf_counter_ns() - start)
print(" ".join(map(str, took)))
"""


def latency_ms(port: int, n: int, count: int = 2000) -> tuple[float, float]:
    """(p50, p99) in milliseconds, one query in flight, the client on the client CPU."""
    cmd = ["taskset", "-c", CLIENT_CPU, sys.executable, "-c", LATENCY, str(port), str(n),
           str(count)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    took = sorted(int(x) / 1e6 for x in out.split())
    return took[len(took) // 2], took[int(len(took) * 0.99)]


def run(rounds: int, seconds: float, n: int, workdir: Path) -> dict[str, float | str]:
    for tool, package in (("dnsmasq", "dnsmasq-base"), ("dnsperf", "dnsperf"),
                          ("taskset", "util-linux")):  # fmt: skip
        if shutil.which(tool) is None:
            return {"skipped": f"{tool} (Debian package {package}) is not installed"}
    queries = workdir / "queries.txt"
    queries.write_text("".join(f"{name}.{DOMAIN} {t}\n" for name, _, _ in devices(n)
                               for t in ("A", "AAAA")))  # fmt: skip
    mine: list[float] = []
    theirs: list[float] = []
    ratios: list[float] = []
    lost: list[float] = []
    p_ours = (free_port(), free_port())
    with (
        ours(p_ours[0], n, workdir / "ours.log"),
        dnsmasq(p_ours[1], n, workdir / "dnsmasq.log"),
    ):
        name, v4, _ = devices(n)[n // 2]
        check(p_ours[0], name, v4)
        check(p_ours[1], name, v4)
        for _ in range(rounds):
            a, lost_a = dnsperf(p_ours[0], queries, seconds)
            b, _ = dnsperf(p_ours[1], queries, seconds)
            mine.append(a)
            theirs.append(b)
            lost.append(lost_a)
            ratios.append(a / b if b else 0.0)
            print(f"round: ours {a:.0f}/s dnsmasq {b:.0f}/s", file=sys.stderr)
        our_lat, their_lat = latency_ms(p_ours[0], n), latency_ms(p_ours[1], n)
    return {
        "dns_qps": round(statistics.median(mine)),
        "dnsmasq_qps": round(statistics.median(theirs)),
        "dns_vs_dnsmasq": round(statistics.median(ratios), 3),
        "dns_p50_ms": round(our_lat[0], 3),
        "dns_p99_ms": round(our_lat[1], 3),
        "dnsmasq_p50_ms": round(their_lat[0], 3),
        "dnsmasq_p99_ms": round(their_lat[1], 3),
        "dns_lost_frac": round(statistics.median(lost), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="mesh-domain queries/s: agent vs dnsmasq")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.names))
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wiregate-bench-dns-") as tmp:
        figures = run(args.rounds, args.seconds, args.names, Path(tmp))
    print(f"took {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
