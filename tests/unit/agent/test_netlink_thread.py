"""The netlink backend is usable from an event loop's thread and from worker threads.

pyroute2's synchronous objects are bound to the thread that made them; the agent
reads the device on its event loop and applies from ``asyncio.to_thread`` workers.
rtnetlink (``IPRoute``) is available on any Linux host, so this runs without the
WireGuard module; tests/kernel covers the WireGuard family the same way.
"""

from __future__ import annotations

import asyncio

from agent.dataplane.netlink import NetlinkBackend


def test_backend_answers_from_the_loop_thread_and_from_workers() -> None:
    async def agent() -> list[bool]:
        backend = NetlinkBackend()  # made on the loop's thread, as the agent's data plane is
        try:
            seen = [backend.exists("lo")]
            for _ in range(4):
                seen.append(await asyncio.to_thread(backend.exists, "lo"))
                seen.append(backend.exists("lo"))
            seen.append(not await asyncio.to_thread(backend.exists, "no-such-link0"))
            return seen
        finally:
            backend.close()

    assert asyncio.run(agent()) == [True] * 10
