"""The aiosqlite driver with one trip to its thread per statement.

aiosqlite runs every call on its connection's own thread, and SQLAlchemy's adapter
makes four calls per statement (open a cursor, execute, fetch, close): four hand-offs
between the event loop and that thread, each a wake-up of both. Here a statement is
one call: the thread opens the cursor, executes, fetches every row and closes it, and
the loop gets back the description, the rows, ``lastrowid`` and ``rowcount`` at once,
which is what the stock adapter's buffered (non server-side) cursor keeps anyway.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)

__all__ = ["one_trip_dbapi"]

_Outcome = tuple[Any, list[Any], int | None, int]


def _execute(conn: sqlite3.Connection, operation: str, parameters: Any) -> _Outcome:
    """On the driver's thread: one statement, its rows fetched, its cursor closed."""
    cursor = conn.cursor()
    try:
        if parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        if cursor.description:
            return cursor.description, cursor.fetchall(), -1, -1
        return None, [], cursor.lastrowid, cursor.rowcount
    finally:
        cursor.close()


def _executemany(conn: sqlite3.Connection, operation: str, seq: Any) -> _Outcome:
    """On the driver's thread: one statement for every parameter set."""
    cursor = conn.cursor()
    try:
        cursor.executemany(operation, seq)
        return None, [], cursor.lastrowid, cursor.rowcount
    finally:
        cursor.close()


class _OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    __slots__ = ()

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        self._run(_execute, operation, parameters)

    def executemany(self, operation: Any, seq_of_parameters: Any) -> Any:
        self._run(_executemany, operation, seq_of_parameters)

    def _run(self, fn: Any, operation: Any, parameters: Any) -> None:
        connection: aiosqlite.Connection = self._connection  # type: ignore[assignment]
        submit: Callable[..., Awaitable[_Outcome]] = connection._execute  # aiosqlite's queue
        try:
            found = self.await_(submit(fn, connection._conn, operation, parameters))
        except Exception as error:
            self._adapt_connection._handle_exception(error)
        self.description, rows, lastrowid, self.rowcount = found
        self.lastrowid = lastrowid  # type: ignore[assignment]  # the DBAPI allows None
        self._rows = deque(rows)


class _OneTripConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()

    def cursor(self, server_side: bool = False) -> AsyncAdapt_aiosqlite_cursor:
        return super().cursor(server_side) if server_side else _OneTripCursor(self)


class _OneTripDBAPI(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> AsyncAdapt_aiosqlite_connection:
        adapted = super().connect(*arg, **kw)
        if type(adapted) is not AsyncAdapt_aiosqlite_connection:  # the sync fallback
            return adapted
        return _OneTripConnection(self, adapted._connection)


def one_trip_dbapi() -> AsyncAdapt_aiosqlite_dbapi:
    """The DBAPI module to hand ``create_async_engine(module=...)`` for aiosqlite URLs."""
    return _OneTripDBAPI(aiosqlite, sqlite3)
