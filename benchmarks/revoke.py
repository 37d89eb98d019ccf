"""Revocation through the real gateway process until every agent has it, over real WebSockets.

Starts ``wiregate gateway`` as a subprocess (embedded SQLite), enrolls N devices over
REST with one reusable key and opens one map stream per device from this process
(as :mod:`benchmarks.fanout` does), waiting until every agent holds its full map.

Each of K revocations is the admin's real path: ``DELETE /api/v1/devices/{id}``
through the admin unix socket; the store deletes the device, its token stops
working, and the broker pushes ``remove`` to every other agent and ``revoked`` to
the device itself. A revocation is timed from the admin call until the last of the
N agents has it (the N - 1 others have received the delta removing the device and
the revoked one its ``revoked`` message, ``time.monotonic`` in this one process).
An agent's own apply of a removal (one peer off its interface) is local and is not
part of this figure. Revocations run one after another.

Figures:

* ``revoke_p99_s`` / ``revoke_p50_s``: per revocation, admin call → the last agent has
  it (nearest rank over the K revocations: with K = 20 the p99 is the worst);
* ``revoke_call_p50_s``: the admin call's own latency (the answer comes after every
  stream was handed the change);
* ``revoke_agents``: N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import aiohttp

from benchmarks.common import emit
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

AGENTS = 1000
REVOCATIONS = 20
TIMEOUT_S = 10.0
GAP_S = 0.2
DEADLINE_S = 170.0


@dataclass
class Fleet:
    """N map streams; records when each agent learned of each awaited removal."""

    n: int
    fulls: int = 0
    all_full: asyncio.Event = field(default_factory=asyncio.Event)
    removed: dict[str, list[float]] = field(default_factory=dict)  # device id -> receipts
    errors: list[str] = field(default_factory=list)

    async def agent(
        self, session: aiohttp.ClientSession, url: str, dev: Enrolled, gate: asyncio.Semaphore
    ) -> None:
        headers = {"Authorization": f"Bearer {dev.token}"}
        async with gate:
            ws = await session.ws_connect(url, headers=headers, max_msg_size=0)
        async with ws:
            async for msg in ws:
                now = time.monotonic()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                self.receive(dev.device_id, msg.data, now)

    def receive(self, device_id: str, text: str, now: float) -> None:
        if text.startswith('{"type":"delta"'):
            for gone in json.loads(text)["remove"]:
                times = self.removed.get(gone)
                if times is not None:
                    times.append(now)
        elif text.startswith('{"type":"full"'):
            self.fulls += 1
            if self.fulls == self.n:
                self.all_full.set()
        elif text.startswith('{"type":"revoked"'):
            times = self.removed.get(device_id)
            if times is not None:
                times.append(now)
        else:
            self.errors.append(f"{device_id}: unexpected {text[:80]!r}")


async def revoke_one(gw: Gateway, admin: aiohttp.ClientSession, fleet: Fleet,
                     device_id: str, expected: int) -> tuple[float, float]:  # fmt: skip
    """(until every agent has it, the admin call's own latency) for one revocation."""
    times = fleet.removed[device_id] = []
    t0 = time.monotonic()
    async with admin.delete(f"http://gateway/api/v1/devices/{device_id}") as resp:
        if resp.status != 204:
            raise RuntimeError(f"revoke {device_id}: {resp.status} {await resp.text()}")
    call = time.monotonic() - t0
    deadline = t0 + TIMEOUT_S
    while len(times) < expected:
        if time.monotonic() > deadline or fleet.errors:
            raise TimeoutError(f"revoke {device_id}: {len(times)}/{expected} agents have it; "
                               + "; ".join(fleet.errors[:5]))  # fmt: skip
        await asyncio.sleep(0.001)
    return max(times) - t0, call


async def drive(gw: Gateway, n: int, k: int) -> dict[str, float]:
    async with client_session() as session:
        await wait_ready(gw, session)
        devices = await enroll_all(gw, session, await create_key(gw), n)
        fleet = Fleet(n)
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        url = f"{gw.base}/api/v1/stream"
        tasks = [asyncio.create_task(fleet.agent(session, url, d, gate)) for d in devices]
        unix = aiohttp.UnixConnector(path=str(gw.admin_socket))
        try:
            async with asyncio.timeout(90):
                await fleet.all_full.wait()
            async with aiohttp.ClientSession(connector=unix) as admin:
                per_revocation, calls = [], []
                for j in range(k):  # the agents still connected each time: n - j
                    victim = devices[(j * 37) % n].device_id
                    until, call = await revoke_one(gw, admin, fleet, victim, n - j)
                    per_revocation.append(until)
                    calls.append(call)
                    await asyncio.sleep(GAP_S)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "revoke_p99_s": percentile(per_revocation, 99),
        "revoke_p50_s": statistics.median(per_revocation),
        "revoke_call_p50_s": statistics.median(calls),
        "revoke_agents": n,
    }


def run(n: int = AGENTS, k: int = REVOCATIONS) -> dict[str, float]:
    """Start a gateway, enroll and connect ``n`` agents, time ``k`` revocations, clean up."""
    return with_gateway("wiregate-revoke-", lambda gw: drive(gw, n, k))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=AGENTS, help="agents")
    parser.add_argument("-k", type=int, default=REVOCATIONS, help="revocations")
    args = parser.parse_args()
    emit(run(args.n, args.k))
