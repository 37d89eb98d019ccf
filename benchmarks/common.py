"""Helpers shared by the benchmarks: timing, fleets, output."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import resource
import statistics
import time
from collections.abc import Callable

from identity.policy import Policy, Rule
from wiregate.model import Device, Identity

__all__ = [
    "GROUPS",
    "emit",
    "fleet",
    "grouped_policy",
    "loglog_slope",
    "make_device",
    "median_seconds",
    "raise_nofile",
    "vmrss_kb",
]

GROUPS = 10


def median_seconds(fn: Callable[[], object], repeat: int = 7) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs (``time.perf_counter``)."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    num = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    return num / sum((a - mx) ** 2 for a in lx)


def make_device(i: int, tags: tuple[str, ...] = (), endpoint: str = "") -> Device:
    """A realistic device: a 44-character key, two tunnel addresses, one endpoint."""
    key = base64.b64encode(hashlib.sha256(i.to_bytes(4, "big")).digest()).decode()
    return Device(
        id=f"d{i}",
        name=f"node-{i:05d}.example.internal",
        public_key=key,
        identity=Identity("wiregate:enrollment-key", f"k{i}"),
        ipv4=f"100.64.{i // 256}.{i % 256}",
        ipv6=f"fd7a:7767:6174::{i:x}",
        tags=tags,
        endpoints=(endpoint or f"198.51.{i // 256 % 256}.{i % 256}:51820",),
        keepalive=25,
    )


def fleet(n: int, grouped: bool) -> list[Device]:
    """``n`` devices; when ``grouped`` each carries one of :data:`GROUPS` tags."""
    return [make_device(i, (f"tag:g{i % GROUPS}",) if grouped else ()) for i in range(n)]


def grouped_policy() -> Policy:
    """Each device may reach the devices of its own group (~N/GROUPS peers)."""
    return Policy(
        rules=tuple(Rule(frozenset({f"tag:g{g}"}), frozenset({f"tag:g{g}"})) for g in range(GROUPS))
    )


def raise_nofile(want: int = 65536) -> None:
    """Raise the soft RLIMIT_NOFILE as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def vmrss_kb(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def emit(results: dict[str, float]) -> None:
    """Print the figures as one JSON object on stdout."""
    print(json.dumps(results, sort_keys=True))
