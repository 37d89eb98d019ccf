"""The gateway's lifecycle sweeper: removes expired keys, departed ephemeral devices and
devices of logins that were approved but never collected.

Runs every ``settings.expiry_sweep_interval`` seconds as a background task of the
API app (``cleanup_ctx``). Each removal is deleted and audited in one store
transaction (actors ``system:expiry``, ``system:ephemeral``,
``system:login-expiry``), then pushed to the broker: viewers drop the device
and its own stream is told ``revoked`` with the reason ("key expired", ...).
The clock is the app's (``CLOCK``), so tests drive a sweep with a fake one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from gateway.api.common import BROKER, CLOCK, SETTINGS, STORE
from gateway.api.lifecycle import publish_removals
from gateway.logging import get_logger
from gateway.store import Removal

__all__ = ["sweep_once", "sweeper_ctx"]

_log = get_logger("gateway.sweeper")


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


async def _run(app: web.Application, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await sweep_once(app)
        except Exception:  # a failed sweep is retried at the next interval
            _log.exception("sweep_failed")


def sweeper_ctx(interval: float) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry running :func:`sweep_once` every ``interval`` s (0: never)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_run(app, interval)) if interval > 0 else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return ctx
