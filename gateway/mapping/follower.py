"""The store's change feed into the broker: replicas follow it, a single gateway fills gaps.

Every replica streams maps to the agents connected to it; a change may be made on
any of them. The store records each change at its map version (see
:mod:`gateway.store.replication`) and, on PostgreSQL, notifies the version on
commit. :class:`Follower` keeps this replica's broker at the store's head:

* a notification (LISTEN on its own asyncpg connection), a local commit
  (:meth:`Broker.upsert` wakes it) or the periodic poll sets it *dirty*;
* one task reads every change after the broker's version from one snapshot and
  applies them in version order (:meth:`Broker.apply_changes`); changes pruned
  past reload the whole map;
* the listener reconnects by itself when PostgreSQL restarts, and catches up
  after it (notifications sent while it was away are lost, the rows are not).

A single gateway (``replica=False``, SQLite) publishes its own commits straight to
its broker, which applies them in version order; the follower is woken only when
the broker holds a change ahead of a missing version (:meth:`Broker.fill_gaps`) and
by the poll, and reads the feed to fill the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Counter, Histogram

from gateway.mapping.broker import Broker, FeedChange
from gateway.store import Store
from gateway.store.replication import CHANNEL, ChangeKind, ChangeRow
from identity.policy import Policy
from wiregate.logging import get_logger
from wiregate.podwire import PodReport

__all__ = ["FEED_LAG", "FEED_RELOADS", "Follower", "asyncpg_dsn"]

FEED_LAG = Histogram(
    "wiregate_feed_catchup_seconds",
    "Time from a replica being woken (notification, local commit, poll) to the change "
    "being applied to its broker",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
FEED_RELOADS = Counter("wiregate_feed_reloads", "Whole-map reloads (the feed was pruned past)")
FEED_ERRORS = Counter("wiregate_feed_errors", "Change-feed reads that failed (retried)")
_log = get_logger("gateway.mapping.follower")
PolicyAt = Callable[[int], Awaitable[Policy]]


def asyncpg_dsn(url: str) -> str:
    """The libpq-style DSN asyncpg takes, from a SQLAlchemy ``postgresql+asyncpg`` URL."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


class Follower:
    """Keeps a broker at the store's head (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        broker: Broker,
        *,
        listen_dsn: str | None,
        poll_interval: float = 1.0,
        retry_interval: float = 0.5,
        replica: bool = True,
        policy_at: PolicyAt | None = None,
    ) -> None:
        self._store, self._broker = store, broker
        self._policy_at = policy_at  # the policy a version put in force (policy changes)
        self._replica = replica
        self._dsn = listen_dsn
        self._poll, self._retry = poll_interval, retry_interval
        self._dirty = asyncio.Event()
        self._woken_at: float | None = None
        self._caught_up = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = False

    def wake(self) -> None:
        """Something changed: read the feed soon."""
        if self._woken_at is None:
            self._woken_at = time.perf_counter()
        self._dirty.set()

    def start(self) -> None:
        """Start the apply loop, the poll and (PostgreSQL) the listener."""
        if self._replica:
            self._broker.follow(self.wake)
        else:
            self._broker.fill_gaps(self.wake)
        self._tasks = [
            asyncio.create_task(self._apply_loop()),
            asyncio.create_task(self._poll_loop()),
        ]
        if self._dsn is not None:
            self._tasks.append(asyncio.create_task(self._listen_loop()))

    async def stop(self) -> None:
        """Stop every task."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def sync(self, version: int, wait: float) -> bool:
        """Wait until the broker holds ``version`` (an agent resuming from a version this
        replica has not applied yet); whether it got there in time."""
        if self._broker.version >= version:
            return True
        self.wake()
        async with self._caught_up:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._caught_up.wait_for(lambda: self._broker.version >= version), wait
                )
        return self._broker.version >= version

    # -- applying ------------------------------------------------------------------

    async def catch_up(self) -> None:
        """Read and apply every change after the broker's version (one snapshot)."""
        found = await self._store.changes_since(self._broker.version)
        if found is None:  # the head first: devices newer than it are only re-applied
            head = await self._store.map_version()
            devices = [record.device for record in await self._store.list_devices()]
            if head > self._broker.version:  # alone, it may have gone on meanwhile
                _log.warning("feed_pruned_past; reloading the whole map", head=head)
                FEED_RELOADS.inc()
                policy = None if self._policy_at is None else await self._policy_at(head)
                self._broker.load(devices, head, policy, await self._store.list_pods())
        else:
            head, changes = found
            policy_version, policy = await self._policy_of(changes)
            self._broker.apply_changes(
                head,
                [
                    FeedChange(
                        c.version,
                        c.device_id,
                        None if record is None else record.device,
                        removed=c.kind is ChangeKind.REMOVE,
                        reason=c.reason,
                        policy=policy if c.version == policy_version else None,
                        pods=PodReport(True, c.pods) if c.kind is ChangeKind.PODS else None,
                    )
                    for c, record in changes
                ],
            )
        async with self._caught_up:
            self._caught_up.notify_all()

    async def _policy_of(self, changes: list[tuple[ChangeRow, Any]]) -> tuple[int, Policy | None]:
        """The last policy change among ``changes`` not applied yet: its version and policy."""
        versions = [c.version for c, _ in changes if c.kind is ChangeKind.POLICY]
        if not versions or self._policy_at is None or versions[-1] <= self._broker.version:
            return 0, None
        return versions[-1], await self._policy_at(versions[-1])

    async def _apply_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            woken, self._woken_at = self._woken_at, None
            try:
                await self.catch_up()
            except Exception as exc:  # the database is away: keep serving, retry
                FEED_ERRORS.inc()
                _log.warning("feed_read_failed", error=str(exc) or exc.__class__.__name__)
                await asyncio.sleep(self._retry)
                self._woken_at = woken
                self._dirty.set()
                continue
            if woken is not None:
                FEED_LAG.observe(time.perf_counter() - woken)

    async def _poll_loop(self) -> None:
        # A safety net for lost notifications (listener reconnecting, SQLite replicas).
        while True:
            await asyncio.sleep(self._poll)
            self._dirty.set()

    # -- listening (PostgreSQL) ----------------------------------------------------

    async def _listen_loop(self) -> None:
        import asyncpg

        assert self._dsn is not None
        delay = self._retry
        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(CHANNEL, self._notified)
                self.listening, delay = True, self._retry
                _log.info("feed_listening", channel=CHANNEL)
                self.wake()  # whatever was notified while not listening
                while not lost.is_set():  # a dead server shows on the next round trip
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 5.0)
                    if not lost.is_set():
                        await asyncio.wait_for(conn.execute("SELECT 1"), 5.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("feed_listener_lost", error=str(exc) or exc.__class__.__name__)
            finally:
                self.listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            version = int(payload)
        except ValueError:
            return
        if version > self._broker.version:
            self.wake()


def _setter(event: asyncio.Event) -> Any:
    def terminated(_conn: object) -> None:
        event.set()

    return terminated
