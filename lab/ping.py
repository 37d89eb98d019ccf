"""Pinging across the lab: until a reply comes back, or continuously with losses counted."""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass

from lab.harness import Host, Process


def ping_until(host: Host, addr: str, timeout: float = 15.0) -> bool:
    """Ping ``addr`` from ``host`` until one reply comes back or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host.ping(addr, count=1, timeout=1.0):
            return True
    return False


@dataclass(frozen=True, slots=True)
class PingResult:
    """A ``ping`` run stopped with SIGINT: what was sent and which replies came back."""

    transmitted: int
    received: int
    lost: tuple[int, ...]  # sequence numbers without a reply (the in-flight tail excluded)


def start_ping(host: Host, addr: str, interval: float = 0.05) -> Process:
    """A continuous ``ping`` from ``host`` to ``addr``, one line per reply in its log."""
    return host.spawn(["ping", "-n", "-i", str(interval), "-W", "2", addr], name="ping")


def stop_ping(proc: Process) -> PingResult:
    """SIGINT the ping, parse its replies; the last second of requests may be in flight."""
    time.sleep(1.0)  # replies to the last requests come back
    proc.signal(signal.SIGINT)
    proc.wait(timeout=10)
    out = proc.output()
    stats = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert stats, out[-2000:]
    transmitted = int(stats[1])
    replied = {int(s) for s in re.findall(r"icmp_seq=(\d+)", out)}
    settled = range(1, max(transmitted - 20, 1))  # 20 x 50 ms: the tail may be in flight
    lost = tuple(s for s in settled if s not in replied)
    return PingResult(transmitted, int(stats[2]), lost)
