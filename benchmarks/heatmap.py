"""The gateway's cost of ingesting a fleet's path reports: ``python -m benchmarks.heatmap``.

Starts ``wiregate gateway`` as a subprocess (embedded SQLite, the default deployment)
and, through its admin socket, puts in force a policy of groups of :data:`GROUP`
devices (``tag:gK`` peers with ``tag:gK``: 15 peers each) and creates one enrollment
key per group; enrolls N = 1 000 devices over REST and opens each one's map stream
(``GET /api/v1/stream``), as agents do.

Then :data:`MINUTES` minutes of reports, each compressed into :data:`MINUTE_S` seconds:
every device sends one ``paths`` message a minute (:func:`wiregate.pathwire.build_paths`,
one realistic entry per peer: direct or relayed, a path MTU, a handshake age, an RTT),
the N sends spread evenly over the compressed minute. Each report is followed on its
stream by a WebSocket ping: the gateway reads its agent messages in order and answers
the ping only once the report is through (parsed, rate gate, policy check, one upsert
committed), so send → pong is the report's ingest time as an agent sees it.

Figures:

* ``heatmap_cpu_s_per_min``: the gateway process's CPU time (user + system, from
  ``/proc/PID/stat``, not wall time) per real minute of a fleet reporting once a
  minute: ``heatmap_ingest_cpu_s_per_min`` + ``heatmap_rest_cpu_s_per_min``;
* ``heatmap_ingest_cpu_s_per_min``: CPU time while the reports came in, less the CPU
  time at rest over the same wall time, per minute of reports;
* ``heatmap_rest_cpu_s_per_min``: CPU time per wall minute with the matrix full and no
  report coming (the streams held, and the path metrics recomputed from the store
  every 15 s: a cost of the fleet's matrix, paid whether reports are compressed or not);
* ``heatmap_ingest_p99_ms`` / ``_p50_ms``: send → pong per report, nearest rank;
* ``heatmap_paths_get_s``: serve time of ``GET /api/v1/paths`` (the whole matrix, over
  the admin socket), median of 5; ``heatmap_paths_pairs``: the pairs it lists;
* ``heatmap_reports_accepted``: reports the gateway counted accepted (its
  ``wiregate_path_reports_total``), which must be every one sent;
* ``heatmap_agents``, ``heatmap_minutes``.

The machine is shared (2 cores): CPU seconds hold better than wall times.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from dataclasses import dataclass, field

import aiohttp

from benchmarks.common import emit
from benchmarks.enroll import cpu_seconds
from benchmarks.fanout import (
    CONNECT_CONCURRENCY,
    Enrolled,
    Gateway,
    client_session,
    create_key,
    enroll_all,
    percentile,
    wait_ready,
    with_gateway,
)
from wiregate.pathwire import PathEntry, build_paths

AGENTS = 1000
GROUP = 16  # devices per policy group: each peers with the 15 others
MINUTES = 5  # within the gateway's per-device burst (8 reports), so none is dropped
MINUTE_S = 6.0  # one minute of reports, compressed
DEADLINE_S = 600.0
PONG_TIMEOUT_S = 30.0
REST_S = 30.0  # two of the path metrics' 15 s refreshes


def policy(groups: int) -> str:
    """Each group's devices may reach each other (YAML)."""
    rules = (f'  - {{src: ["tag:g{g}"], dst: ["tag:g{g}"]}}' for g in range(groups))
    return "acls:\n" + "\n".join(rules) + "\n"


def group_peers(ids: list[str]) -> list[list[str]]:
    """Each device's peers under :func:`policy`: the others of its group of :data:`GROUP`."""
    return [[p for p in ids[i - i % GROUP : i - i % GROUP + GROUP] if p != ids[i]]
            for i in range(len(ids))]  # fmt: skip


def report(minute: int, me: int, peers: list[str]) -> str:
    """One agent's ``paths`` message of ``minute``: an entry per peer, figures varied."""
    entries = []
    for k, peer in enumerate(peers):
        relayed = (me + k) % 10 == 0  # one pair in ten relayed
        why = "relayed: no direct handshake" if relayed else "handshake on the direct endpoint"
        entries.append(PathEntry(
            peer=peer, path_mtu=1420 - 80 * ((me + k) % 3), black_hole=(me * k) % 97 == 0,
            frag_needed=(me + k) % 4, probe_failures=minute + k % 3,
            path="relayed" if relayed else "direct", relay="relay-1" if relayed else None,
            reason=why, handshake_age=float((me * 7 + k * 13 + minute * 60) % 170),
            rtt_ms=0.4 + (me + k) % 40,
        ))  # fmt: skip
    return json.dumps(build_paths(entries))


@dataclass
class Stream:
    """One agent's map stream: pings answered, pongs awaited (the client pings itself)."""

    ws: aiohttp.ClientWebSocketResponse
    pongs: asyncio.Queue[float] = field(default_factory=asyncio.Queue)
    closed: str | None = None

    async def read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.PING:
                await self.ws.pong(msg.data)
            elif msg.type is aiohttp.WSMsgType.PONG:
                self.pongs.put_nowait(time.perf_counter())
            elif msg.type is not aiohttp.WSMsgType.TEXT:
                break
        self.closed = f"closed ({self.ws.close_code})"

    async def ingest(self, text: str) -> float:
        """Send a report and a ping; seconds until the pong."""
        started = time.perf_counter()
        await self.ws.send_str(text)
        await self.ws.ping(b"r")
        try:
            return await asyncio.wait_for(self.pongs.get(), PONG_TIMEOUT_S) - started
        except TimeoutError:
            raise RuntimeError(f"no pong: stream {self.closed or 'open'}") from None


async def admin(gw: Gateway, method: str, path: str, body: object = None) -> tuple[int, bytes]:
    connector = aiohttp.UnixConnector(path=str(gw.admin_socket))
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.request(method, f"http://gateway{path}", json=body) as resp,
    ):
        return resp.status, await resp.read()


async def enroll_groups(gw: Gateway, session: aiohttp.ClientSession, n: int) -> list[Enrolled]:
    """``n`` devices, :data:`GROUP` per policy group (each group its key and tag)."""
    groups = -(-n // GROUP)
    status, body = await admin(gw, "PUT", "/api/v1/policy", {"document": policy(groups)})
    if status != 200:
        raise RuntimeError(f"policy: {status} {body[:200]!r}")
    devices: list[Enrolled] = []
    for g in range(groups):
        secret = await create_key(gw, [f"tag:g{g}"])
        first = g * GROUP
        devices += await enroll_all(gw, session, secret, min(GROUP, n - first), first)
    return devices


async def connect(
    gw: Gateway, session: aiohttp.ClientSession, devices: list[Enrolled]
) -> tuple[list[Stream], list[asyncio.Task[None]]]:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(dev: Enrolled) -> Stream:
        headers = {"Authorization": f"Bearer {dev.token}"}
        async with gate:
            ws = await session.ws_connect(
                f"{gw.base}/api/v1/stream", max_msg_size=0, autoping=False, headers=headers
            )
        return Stream(ws)

    streams = list(await asyncio.gather(*(one(d) for d in devices)))
    return streams, [asyncio.create_task(s.read()) for s in streams]


async def minute_of_reports(streams: list[Stream], texts: list[str]) -> list[float]:
    """Every stream sends its report, the sends spread evenly over :data:`MINUTE_S`."""
    start, gap = time.perf_counter(), MINUTE_S / len(streams)

    async def one(i: int) -> float:
        await asyncio.sleep(max(0.0, start + i * gap - time.perf_counter()))
        return await streams[i].ingest(texts[i])

    return list(await asyncio.gather(*(one(i) for i in range(len(streams)))))


async def accepted(gw: Gateway, session: aiohttp.ClientSession) -> float:
    async with session.get(f"{gw.metrics}/metrics") as resp:
        text = await resp.text()
    line = next(x for x in text.splitlines()
                if x.startswith('wiregate_path_reports_total{outcome="accepted"}'))  # fmt: skip
    return float(line.rsplit(" ", 1)[1])


async def serve_matrix(gw: Gateway) -> tuple[float, int]:
    """Median seconds of ``GET /api/v1/paths`` (5 calls), and the pairs listed."""
    times, pairs = [], 0
    for _ in range(5):
        started = time.perf_counter()
        status, body = await admin(gw, "GET", "/api/v1/paths")
        times.append(time.perf_counter() - started)
        if status != 200:
            raise RuntimeError(f"GET /api/v1/paths: {status}")
        pairs = len(json.loads(body)["paths"])
    return statistics.median(times), pairs


async def drive(gw: Gateway, n: int, minutes: int) -> dict[str, float]:
    async with client_session() as session:
        await wait_ready(gw, session)
        devices = await enroll_groups(gw, session, n)
        peers = group_peers([d.device_id for d in devices])
        texts = [[report(m, i, peers[i]) for i in range(n)] for m in range(minutes)]
        streams, readers = await connect(gw, session, devices)
        try:
            await asyncio.sleep(2.0)  # the full maps written
            before = await accepted(gw, session)
            cpu, started = cpu_seconds(gw.proc.pid), time.perf_counter()
            latencies = list(itertools.chain.from_iterable(
                [await minute_of_reports(streams, texts[m]) for m in range(minutes)]))  # fmt: skip
            busy, wall = cpu_seconds(gw.proc.pid) - cpu, time.perf_counter() - started
            taken = await accepted(gw, session) - before
            cpu = cpu_seconds(gw.proc.pid)
            await asyncio.sleep(REST_S)
            rest = (cpu_seconds(gw.proc.pid) - cpu) * 60 / REST_S  # per wall minute
            get_s, pairs = await serve_matrix(gw)
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    if taken != n * minutes:
        raise RuntimeError(f"{taken:.0f} of {n * minutes} reports accepted")
    ingest = max(0.0, busy - rest * wall / 60) / minutes
    return {
        "heatmap_cpu_s_per_min": ingest + rest,
        "heatmap_ingest_cpu_s_per_min": ingest,
        "heatmap_rest_cpu_s_per_min": rest,
        "heatmap_ingest_p99_ms": percentile(latencies, 99) * 1000,
        "heatmap_ingest_p50_ms": percentile(latencies, 50) * 1000,
        "heatmap_paths_get_s": get_s,
        "heatmap_paths_pairs": pairs,
        "heatmap_reports_accepted": taken,
        "heatmap_agents": n,
        "heatmap_minutes": minutes,
    }


def run(n: int = AGENTS, minutes: int = MINUTES) -> dict[str, float]:
    """Start a gateway, enroll and connect ``n`` agents, ingest ``minutes`` of reports."""
    return with_gateway("wiregate-heatmap-", lambda gw: drive(gw, n, minutes), DEADLINE_S)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=AGENTS, help="agents")
    parser.add_argument("--minutes", type=int, default=MINUTES, help="minutes of reports (≤ 8)")
    args = parser.parse_args()
    emit(run(args.n, args.minutes))
