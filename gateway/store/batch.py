"""Group commit: writes that arrive while another commits share the next transaction.

A durable commit costs one fsync (SQLite ``synchronous=FULL``, PostgreSQL's WAL
flush) whatever it holds, and the store's writers are serialized anyway, so under
load most of an enrollment's time would be the wait for its own fsync. Each queued
write runs in a SAVEPOINT of one shared transaction: a write that fails is rolled
back to its savepoint and its caller gets its error, the others are unaffected;
every caller is answered only after the one commit, so nothing is acknowledged
before it is durable. A write arriving alone is committed at once (no added wait).
Results are handed back in queue order, which is the order of their map versions.

Rows a write only appends (its audit records, its map-change records) are added with
:func:`add_at_commit`: the rows of the writes that succeeded are inserted together
just before the commit, one INSERT per table for the whole batch, and a failure there
fails every write of the batch (none was answered yet). A statement whose last value
is all that matters (the IPAM cursor) is given to :func:`execute_at_commit` under a
key: the batch executes the last one given, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import Executable

from wiregate.errors import Conflict

__all__ = ["GroupCommit", "Work", "add_at_commit", "execute_at_commit"]

T = TypeVar("T")
Work = Callable[[AsyncSession], Awaitable[T]]
MAX_BATCH = 16  # writes per transaction (more would only lengthen its latency)
_AT_COMMIT = "wiregate.at_commit"  # Session.info: the running write's appended rows
_LAST_AT_COMMIT = "wiregate.last_at_commit"  # Session.info: its keyed last statements


def add_at_commit(s: AsyncSession, row: object) -> None:
    """Add ``row`` (an insert nothing in the transaction reads back): in a group commit,
    with the same rows of the batch's other writes just before the commit; otherwise at
    once, like ``s.add``."""
    pending: list[object] | None = s.info.get(_AT_COMMIT)
    if pending is None:
        s.add(row)
    else:
        pending.append(row)


async def execute_at_commit(s: AsyncSession, key: str, statement: Executable) -> None:
    """Execute ``statement`` (a write nothing in the transaction reads back, of which
    only the last one under ``key`` matters): in a group commit, once for the batch just
    before the commit, the last one a successful write gave; otherwise at once."""
    pending: dict[str, Executable] | None = s.info.get(_LAST_AT_COMMIT)
    if pending is None:
        await s.execute(statement)
    else:
        pending[key] = statement


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
                    outcomes = await _attempt_all(s, [work for work, _future in batch])
            except BaseException as exc:  # the commit itself failed: nobody's write is there
                outcomes = [(False, exc)] * len(batch)
                if not isinstance(exc, Exception):
                    _answer(batch, outcomes)
                    raise
            _answer(batch, outcomes)


async def _attempt_all(s: AsyncSession, works: list[Work[Any]]) -> list[tuple[bool, Any]]:
    """Each write in its savepoint, then the rows appended by those that succeeded."""
    outcomes, appended = [], []
    last: dict[str, Executable] = {}
    for work in works:
        pending: list[object] = []
        keyed: dict[str, Executable] = {}
        s.info[_AT_COMMIT], s.info[_LAST_AT_COMMIT] = pending, keyed
        outcomes.append(await _attempt(s, work))
        if outcomes[-1][0]:
            appended += pending
            last.update(keyed)
    del s.info[_AT_COMMIT], s.info[_LAST_AT_COMMIT]
    for statement in last.values():
        await s.execute(statement)
    s.add_all(appended)  # flushed by the commit
    return outcomes


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
