"""What the soak measures: gateway resources (/proc and /metrics), ping loss around
key rotations, iperf3 throughput. Parsing is pure; the sampler is asyncio."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

__all__ = [
    "PingLog",
    "Sample",
    "Sampler",
    "fd_breakdown",
    "iperf_figures",
    "parse_metrics",
    "parse_ping",
    "rotation_window",
]

WANTED = (
    "wiregate_asyncio_tasks",
    "wiregate_broker_connected_agents",
    "wiregate_netmap_version",
    "process_open_fds",
    "process_resident_memory_bytes",
)


@dataclass(frozen=True, slots=True)
class Sample:
    """One replica's figures at one moment (``t``: seconds since the sampler started)."""

    label: str
    t: float
    replica: int
    fds: int  # entries of /proc/PID/fd
    rss_kb: int  # VmRSS of /proc/PID/status
    tasks: int  # wiregate_asyncio_tasks
    connected: int  # wiregate_broker_connected_agents
    version: int  # wiregate_netmap_version
    metric_fds: int  # process_open_fds
    metric_rss_kb: int  # process_resident_memory_bytes / 1024

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of the :data:`WANTED` series in a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name in WANTED:
            out[name] = float(value)
    return out


def proc_figures(pid: int) -> tuple[int, int]:
    """(open fds, VmRSS in KiB) of ``pid`` from /proc."""
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return fds, rss


_TCP_STATES = {"01": "established", "06": "time-wait", "08": "close-wait", "0A": "listen"}


def _sockets(pid: int) -> dict[str, str]:
    """Socket inode -> a description (TCP: local port and state; unix: its path)."""
    out = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                f = line.split()
                port = int(f[1].rsplit(":", 1)[1], 16)
                out[f[9]] = f"tcp :{port} {_TCP_STATES.get(f[3], f[3])}"
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
            f = line.split()
            out[f[6]] = f"unix {Path(f[7]).name if len(f) > 7 else '(unnamed)'}"
    return out


def fd_breakdown(pid: int) -> dict[str, int]:
    """What ``pid``'s open fds are, counted by kind (sockets by port/path and state)."""
    sockets = _sockets(pid)
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            kinds[sockets.get(target[8:-1], "socket (other)")] += 1
        elif target.startswith("/"):
            kinds["file"] += 1
        else:
            kinds[target.split(":")[0] + ":" + target.split(":")[1][:12]] += 1
    return dict(sorted(kinds.items()))


class Sampler:
    """Samples every replica now and then; ``samples`` keeps them all."""

    def __init__(self, targets: Sequence[tuple[int, str]], http: aiohttp.ClientSession) -> None:
        self.targets = list(targets)  # (pid, metrics URL) per replica
        self.http = http
        self.samples: list[Sample] = []
        self.started = time.monotonic()

    async def sample(self, label: str) -> list[Sample]:
        taken = []
        for replica, (pid, url) in enumerate(self.targets):
            async with self.http.get(url) as resp:
                metrics = parse_metrics(await resp.text())
            fds, rss = proc_figures(pid)  # after the scrape: its connection is closed again
            taken.append(Sample(
                label, round(time.monotonic() - self.started, 1), replica, fds, rss,
                int(metrics["wiregate_asyncio_tasks"]),
                int(metrics["wiregate_broker_connected_agents"]),
                int(metrics["wiregate_netmap_version"]),
                int(metrics["process_open_fds"]),
                int(metrics["process_resident_memory_bytes"]) // 1024,
            ))  # fmt: skip
        self.samples += taken
        return taken

    async def run(self, every: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            if not stop.is_set():
                await self.sample("churn")


# --------------------------------------------------------------------------- ping

_REPLY = re.compile(r"^\[(\d+\.\d+)\].* icmp_seq=(\d+) ")
_SENT = re.compile(r"(\d+) packets transmitted")


@dataclass(frozen=True, slots=True)
class PingLog:
    """A ``ping -D`` run: replies (unwrapped seq -> receive time) and how many were sent."""

    replies: dict[int, float]
    sent: int

    def lost(self) -> list[int]:
        """Echoes never answered, up to the last answered one (ping's deadline may cut
        the replies of the final few short)."""
        last = min(self.sent, max(self.replies, default=0))
        return [seq for seq in range(1, last + 1) if seq not in self.replies]

    def lost_at(self) -> list[float]:
        """An estimated send time of each lost echo: interpolated between the replies
        around it (at 50 pps they are 20 ms apart, well inside any window we count)."""
        seqs = sorted(self.replies)
        if not seqs:
            return []
        times = []
        for seq in self.lost():
            i = bisect.bisect_left(seqs, seq)
            lo, hi = seqs[max(i - 1, 0)], seqs[min(i, len(seqs) - 1)]
            if lo == hi:
                times.append(self.replies[lo])
            else:
                frac = (seq - lo) / (hi - lo)
                times.append(self.replies[lo] + frac * (self.replies[hi] - self.replies[lo]))
        return times

    def lost_between(self, start: float, end: float) -> int:
        return sum(start <= t <= end for t in self.lost_at())


def parse_ping(text: str) -> PingLog:
    """Parse ``ping -n -D`` output (sequence numbers wrap at 65536; duplicates ignored)."""
    replies: dict[int, float] = {}
    wraps, last = 0, 0
    for line in text.splitlines():
        match = _REPLY.match(line)
        if match is None or "DUP!" in line:
            continue
        seq = int(match.group(2))
        if seq < last - 30000:
            wraps += 1
        last = seq
        replies.setdefault(seq + 65536 * wraps, float(match.group(1)))
    sent = _SENT.search(text)
    return PingLog(replies, int(sent.group(1)) if sent else max(replies, default=0))


def rotation_window(agent_log: str, after: float) -> tuple[float, float] | None:
    """When the agent rotated (its first rotation at or after ``after``): (registered,
    switched) from its JSON log, or None if it did not. The switch may be logged first:
    the map carrying the new key can arrive before the gateway's answer."""
    seen: dict[str, float] = {}
    for line in agent_log.splitlines():
        if not line.startswith("{") or '"key ' not in line:
            continue
        with contextlib.suppress(ValueError, KeyError):
            doc = json.loads(line)
            when = datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00")).timestamp()
            if when >= after and doc["event"] in ("key rotation registered", "key switched"):
                seen.setdefault(doc["event"], when)
    if len(seen) < 2:
        return None
    return seen["key rotation registered"], seen["key switched"]


# --------------------------------------------------------------------------- iperf3


def iperf_figures(text: str) -> dict[str, Any]:
    """Throughput figures from ``iperf3 -J`` output (Mbit/s)."""
    start = text.find("{")
    doc = json.loads(text[start:]) if start >= 0 else {}
    if "end" not in doc or "sum_sent" not in doc.get("end", {}):
        return {"error": str(doc.get("error", "no iperf3 result")), "intervals_mbps": []}
    intervals = [i["sum"]["bits_per_second"] / 1e6 for i in doc.get("intervals", [])]
    retransmits = [i["sum"].get("retransmits") for i in doc.get("intervals", [])]
    end = doc["end"]
    return {
        "sent_mbps": round(end["sum_sent"]["bits_per_second"] / 1e6, 1),
        "received_mbps": round(end["sum_received"]["bits_per_second"] / 1e6, 1),
        "retransmits": end["sum_sent"].get("retransmits"),
        "seconds": round(end["sum_sent"]["seconds"], 1),
        "intervals_mbps": [round(x, 1) for x in intervals],
        "interval_retransmits": retransmits,
        "min_interval_mbps": round(min(intervals), 1) if intervals else 0.0,
    }
