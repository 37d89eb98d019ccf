"""Fan-out with gateway replicas: 1 000 agents over two replicas vs over one, same run.

A real PostgreSQL (Debian's, :class:`lab.pg.PgServer`, loopback) and two real
``wiregate gateway`` processes on it. N devices are enrolled through the first.
Then, in alternating phases, this process holds N map streams (real WebSockets):

* ``one``: every agent streams from replica 1 (replica 2 runs, following the feed);
* ``two``: agent i streams from replica (i mod 2) + 1, so a change sent by an agent on
  one replica reaches half the fleet through the other (LISTEN/NOTIFY, change feed).

Each change is the real path (an agent's ``endpoints`` message on its stream →
store → feed → every replica's broker → deltas), timed from the send until the
last of the N - 1 other agents has it (see :mod:`benchmarks.fanout`). Phases run
``one, two, one, two`` with K/2 changes each, so drift on a noisy machine hits both.

Figures: ``replicas_fanout_p99_one_s``, ``replicas_fanout_p99_two_s`` (nearest rank
over each layout's K changes), their ratio ``replicas_fanout_ratio`` (target ≤ 1.5),
the p50s, and ``replicas_agents``.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from benchmarks.common import emit, raise_nofile
from benchmarks.fanout import (
    CONNECT_CONCURRENCY,
    Agents,
    Enrolled,
    Gateway,
    create_key,
    enroll_all,
    percentile,
    start_gateway,
    stop_gateway,
    timed_changes,
    wait_ready,
)
from lab.pg import PgServer

AGENTS = 1000
CHANGES = 20  # per layout, over two phases
DEADLINE_S = 600.0


async def connect(
    session: aiohttp.ClientSession, agents: Agents, devices: list[Enrolled], urls: list[str]
) -> list[asyncio.Task[None]]:
    """Open agent i's stream at ``urls[i % len(urls)]``; return once all hold full maps."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    tasks = [
        asyncio.create_task(agents.agent(session, urls[i % len(urls)], d, gate))
        for i, d in enumerate(devices)
    ]
    full = asyncio.create_task(agents.all_full.wait())
    done, _ = await asyncio.wait([full, *tasks], timeout=120, return_when="FIRST_COMPLETED")
    if full not in done:
        full.cancel()
        await disconnect(tasks)
        raise RuntimeError(f"{agents.fulls}/{agents.n} full maps; {'; '.join(agents.errors[:5])}")
    return tasks


async def disconnect(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def phase(
    session: aiohttp.ClientSession, devices: list[Enrolled], urls: list[str], k: int, first: int
) -> list[float]:
    agents = Agents(len(devices))
    tasks = await connect(session, agents, devices, urls)
    try:
        await asyncio.sleep(1.0)  # let the connection burst settle
        per_change, _ = await timed_changes(agents, devices, k, first)
    finally:
        await disconnect(tasks)
    return per_change


async def drive(gws: list[Gateway], n: int, k: int) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for gw in gws:
            await wait_ready(gw, session)
        secret = await create_key(gws[0])
        devices = await enroll_all(gws[0], session, secret, n)
        streams = [f"{gw.base}/api/v1/stream" for gw in gws]
        layouts = {"one": streams[:1], "two": streams}
        samples: dict[str, list[float]] = {"one": [], "two": []}
        first = 0
        for name in ("one", "two", "one", "two"):
            started = time.monotonic()
            samples[name] += await phase(session, devices, layouts[name], k // 2, first)
            first += k // 2
            print(f"phase {name}: {time.monotonic() - started:.1f}s", flush=True)
    one, two = percentile(samples["one"], 99), percentile(samples["two"], 99)
    return {
        "replicas_fanout_p99_one_s": one,
        "replicas_fanout_p99_two_s": two,
        "replicas_fanout_p50_one_s": statistics.median(samples["one"]),
        "replicas_fanout_p50_two_s": statistics.median(samples["two"]),
        "replicas_fanout_ratio": two / one,
        "replicas_agents": n,
    }


def run(n: int = AGENTS, k: int = CHANGES) -> dict[str, float]:
    """PostgreSQL, two replicas, ``n`` agents; ``k`` changes per layout; clean up."""
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="wiregate-replicas-"))
    try:
        with PgServer() as pg:
            url = pg.create_database()
            gws = [start_gateway(tmp / f"replica{i}", database_url=url) for i in (1, 2)]
            try:
                return asyncio.run(asyncio.wait_for(drive(gws, n, k), DEADLINE_S))
            except BaseException as exc:
                for gw in gws:
                    exc.add_note(f"{gw.log.parent.name} log:\n{gw.log_tail()}")
                raise
            finally:
                for gw in gws:
                    stop_gateway(gw.proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    emit(run())
