"""Group commit: writes that arrive while another commits share the next transaction.

A durable commit costs one fsync (SQLite ``synchronous=FULL``, PostgreSQL's WAL
flush) whatever it holds, and the store's writers are serialized anyway, so under
load most of an enrollment's time would be the wait for its own fsync. Each queued
write runs in a SAVEPOINT of one shared transaction: a write that fails is rolled
back to its savepoint and its caller gets its error, the others are unaffected;
every caller is answered only after the one commit, so nothing is acknowledged
before it is durable. A write arriving alone is committed at once (no added wait).
Results are handed back in queue order, which is the order of their map versions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from wiregate.errors import Conflict

__all__ = ["GroupCommit", "Work"]

T = TypeVar("T")
Work = Callable[[AsyncSession], Awaitable[T]]
MAX_BATCH = 16  # writes per transaction (more would only lengthen its latency)


class GroupCommit:
    """Runs queued writes, as many as are waiting, in one transaction of ``write()``."""

    def __init__(self, write: Callable[[], AbstractAsyncContextManager[AsyncSession]]) -> None:
        self._write = write
        self._queue: list[tuple[Work[Any], asyncio.Future[Any]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def run(self, work: Work[T]) -> T:
        """Run ``work`` in the next shared transaction; its result once that committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((work, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain(), name="store-group-commit")
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            outcomes: list[tuple[bool, Any]] = []
            try:
                async with self._write() as s:
                    for work, _future in batch:
                        outcomes.append(await _attempt(s, work))
            except BaseException as exc:  # the commit itself failed: nobody's write is there
                outcomes = [(False, exc)] * len(batch)
                if not isinstance(exc, Exception):
                    _answer(batch, outcomes)
                    raise
            _answer(batch, outcomes)


async def _attempt(s: AsyncSession, work: Work[Any]) -> tuple[bool, Any]:
    try:
        async with s.begin_nested():
            return True, await work(s)
    except IntegrityError as exc:
        conflict = Conflict("the change conflicts with existing state; retry")
        conflict.__cause__ = exc
        return False, conflict
    except Exception as exc:  # handed to the caller whose write it was
        return False, exc


def _answer(batch: list[tuple[Work[Any], asyncio.Future[Any]]],
            outcomes: list[tuple[bool, Any]]) -> None:  # fmt: skip
    for (_work, future), (ok, value) in zip(batch, outcomes, strict=True):
        if future.done():  # its caller was cancelled
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
