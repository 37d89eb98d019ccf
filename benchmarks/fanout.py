"""End-to-end fan-out over real WebSockets (127.0.0.1, two processes).

Starts ``benchmarks.fanout_server`` with N devices (allow-all), connects one
agent per device from this process, waits for every full map, then triggers K
single-device endpoint changes one after another. For each change it measures
the time from the trigger until every affected agent has received the delta
(both times from ``time.monotonic``, one host clock).

Figures: ``fanout_p99_s`` / ``fanout_p50_s`` (per change, until the last agent),
``fanout_agent_p99_s`` (over every agent delivery), ``fanout_connect_s`` (all
agents connected with their full maps), ``fanout_rss_kb_per_agent`` (server
VmRSS after connecting minus before, per agent; it includes heap that held the
full maps in flight), ``fanout_rss_trimmed_kb_per_agent`` (the same after the
server's ``gc.collect()`` + ``malloc_trim``: what the agents retain), and
``fanout_server_write_mean_s`` (server side: change → delta written, mean).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections import defaultdict

import aiohttp

from benchmarks.common import emit, raise_nofile, vmrss_kb

AGENTS = 1000
CHANGES = 20
DEADLINE_S = 100.0


class Agents:
    """N WebSocket agents; records when each delta version reached each agent."""

    def __init__(self, base_url: str, n: int) -> None:
        self.base_url, self.n = base_url, n
        self.fulls = 0
        self.arrivals: dict[int, list[float]] = defaultdict(list)
        self.tasks: list[asyncio.Task[None]] = []
        self.all_full = asyncio.Event()

    async def agent(self, session: aiohttp.ClientSession, i: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            ws = await session.ws_connect(f"{self.base_url}/stream/d{i}", max_msg_size=0)
        async with ws:
            async for msg in ws:
                now = time.monotonic()
                text = msg.data
                if text.startswith('{"type":"full"'):
                    self.fulls += 1
                    if self.fulls == self.n:
                        self.all_full.set()
                elif text.startswith('{"type":"delta"'):
                    head = text[: text.index(',"self"')]
                    self.arrivals[int(head.rsplit(":", 1)[1])].append(now)

    def start(self, session: aiohttp.ClientSession) -> None:
        gate = asyncio.Semaphore(100)
        self.tasks = [asyncio.create_task(self.agent(session, i, gate)) for i in range(self.n)]


async def wait_for_count(arrivals: list[float], count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(arrivals) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(arrivals)}/{count} agents got the delta")
        await asyncio.sleep(0.002)


async def drive(port: int, pid: int, n: int, k: int) -> dict[str, float]:
    base = f"http://127.0.0.1:{port}"
    agents = Agents(base, n)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        rss_before = vmrss_kb(pid)
        started = time.monotonic()
        agents.start(session)
        await asyncio.wait_for(agents.all_full.wait(), 60)
        connect_s = time.monotonic() - started
        await asyncio.sleep(1.0)
        rss_after = vmrss_kb(pid)
        await (await session.post(f"{base}/trim")).release()
        rss_trimmed = vmrss_kb(pid)
        per_change, per_agent = [], []
        for j in range(k):
            t0 = time.monotonic()
            async with session.post(f"{base}/change/d{(j * 37) % n}") as resp:
                version = (await resp.json())["version"]
            await wait_for_count(agents.arrivals[version], n - 1, 10)
            times = [t - t0 for t in agents.arrivals[version]]
            per_change.append(max(times))
            per_agent.extend(times)
        async with session.get(f"{base}/stats") as resp:
            stats = await resp.json()
        for task in agents.tasks:
            task.cancel()
        await asyncio.gather(*agents.tasks, return_exceptions=True)
    return {
        "fanout_p99_s": percentile(per_change, 99),
        "fanout_p50_s": statistics.median(per_change),
        "fanout_agent_p99_s": percentile(per_agent, 99),
        "fanout_connect_s": connect_s,
        "fanout_rss_kb_per_agent": (rss_after - rss_before) / n,
        "fanout_rss_trimmed_kb_per_agent": (rss_trimmed - rss_before) / n,
        "fanout_server_write_mean_s": stats["fanout_seconds_sum"] / stats["deltas_written"],
    }


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def run(n: int = AGENTS, k: int = CHANGES) -> dict[str, float]:
    """Start the server process, drive ``n`` agents through ``k`` changes, stop it."""
    raise_nofile()
    cmd = [sys.executable, "-m", "benchmarks.fanout_server", "--devices", str(n)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"fanout server did not start: {line!r}")
        coro = drive(int(line.split()[1]), server.pid, n, k)
        return asyncio.run(asyncio.wait_for(coro, DEADLINE_S))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    emit(run())
