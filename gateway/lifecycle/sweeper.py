"""The gateway's lifecycle sweeper: removes expired keys, departed ephemeral devices and
devices of logins that were approved but never collected.

Runs every ``settings.expiry_sweep_interval`` seconds as a background task of the
API app (``cleanup_ctx``). With several replicas every one records the presence of
the agents streaming from it (``last_seen``, which the ephemeral sweep reads), and
the one holding the ``sweeper`` lease sweeps and prunes the change feed.
Each removal is deleted and audited in one store
transaction (actors ``system:expiry``, ``system:ephemeral``,
``system:login-expiry``), then pushed to the broker: viewers drop the device
and its own stream is told ``revoked`` with the reason ("key expired", ...).
The clock is the app's (``CLOCK``), so tests drive a sweep with a fake one.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from gateway.api.lifecycle import publish_removals
from gateway.appkeys import BROKER, CLOCK, SETTINGS, STORE
from gateway.store import Removal
from wiregate.logging import get_logger
from wiregate.tasks import cancel_and_wait

__all__ = ["LEASE", "duty_once", "replica_id", "sweep_once", "sweeper_ctx"]

LEASE = "sweeper"  # one replica sweeps at a time
LEASE_TTL_ROUNDS = 3  # the lease outlives a missed round or two of its holder
KEEP_CHANGES = 50_000  # map versions of changes kept for replicas catching up
RELAY_PAIR_IDLE_S = 3600.0  # relay pairs no ticket used for this long are forgotten

_log = get_logger("gateway.lifecycle.sweeper")


async def sweep_once(app: web.Application) -> list[Removal]:
    """One sweep at the app's clock's ``now``; the removals it made (already published)."""
    store, broker, settings = app[STORE], app[BROKER], app[SETTINGS]
    now = app[CLOCK]()
    removals = await store.expire_devices(now)
    removals += await store.sweep_ephemeral(now, settings.ephemeral_timeout, broker.connected_ids())
    removals += await store.sweep_abandoned_logins(now)
    publish_removals(broker, removals)
    for removal in removals:
        _log.info("device_swept", device_id=removal.device_id, reason=removal.reason)
    return removals


async def duty_once(app: web.Application, holder: str, interval: float) -> bool:
    """One round on this replica: record the presence of the agents streaming from it,
    then sweep and prune if it holds (or takes) the sweeper lease; whether it did."""
    store = app[STORE]
    await store.touch_many(app[BROKER].connected_ids())
    if not await store.take_lease(LEASE, holder, LEASE_TTL_ROUNDS * interval):
        return False
    await sweep_once(app)
    await store.prune_changes(KEEP_CHANGES, RELAY_PAIR_IDLE_S)
    return True


def replica_id() -> str:
    """This process, as a lease holder: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


async def _run(app: web.Application, interval: float) -> None:
    holder = replica_id()
    while True:
        await asyncio.sleep(interval)
        try:
            await duty_once(app, holder, interval)
        except Exception:  # a failed sweep is retried at the next interval
            _log.exception("sweep_failed")


def sweeper_ctx(interval: float) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry running :func:`sweep_once` every ``interval`` s (0: never)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_run(app, interval)) if interval > 0 else None
        yield
        await cancel_and_wait(task)

    return ctx
