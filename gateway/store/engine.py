"""Engine construction: one place for driver-specific tuning."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any

from sqlalchemy import event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.store._sqlite import one_trip_dbapi

__all__ = ["BUSY_TIMEOUT_MS", "create_engine"]

BUSY_TIMEOUT_MS = 10_000
_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
)


def create_engine(url: str) -> AsyncEngine:
    """An async engine for ``url``; SQLite gets WAL, durable commits and real BEGINs,
    PostgreSQL a pool that survives a server restart. aiosqlite runs each statement in
    one trip to its thread (:mod:`gateway.store._sqlite`).

    A SQLite database file is created 0600 (whatever the umask), and it and its
    ``-wal``/``-shm`` files are made 0600 on each new connection."""
    if url.startswith("postgresql"):
        # pre_ping: a connection the server dropped (a restart) is replaced, not used
        return create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    one_trip = make_url(url).drivername == "sqlite+aiosqlite"
    engine = create_async_engine(url, **({"module": one_trip_dbapi()} if one_trip else {}))
    if engine.dialect.name == "sqlite":
        database = _sqlite_file(url)
        if database is not None:
            _create_private(database)
        connect = functools.partial(_sqlite_connect, database=database)
        event.listen(engine.sync_engine, "connect", connect)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
    return engine


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite ``url``; None for an in-memory or URI database."""
    database = make_url(url).database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _create_private(path: Path) -> None:
    """Create ``path`` empty and 0600 unless it exists (SQLite gives its -wal and -shm
    files the database's mode)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.suppress(FileExistsError, FileNotFoundError):  # SQLite reports the latter
        os.close(os.open(path, flags, 0o600))


def _make_private(database: Path) -> None:
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        with contextlib.suppress(OSError):  # absent, or not ours to change
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)


def _sqlite_connect(dbapi_connection: Any, _record: Any, *, database: Path | None) -> None:
    # Take transaction control away from the driver (it would only BEGIN before
    # DML, leaving reads outside the transaction); see SQLAlchemy's pysqlite docs.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in _SQLITE_PRAGMAS:
        cursor.execute(pragma)
    cursor.close()
    if database is not None:  # after journal_mode=WAL: the -wal and -shm files exist
        _make_private(database)


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN")
