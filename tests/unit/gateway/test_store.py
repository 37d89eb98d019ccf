"""The Store against a real SQLite file: round trips, versions, races, restarts.

The dialect-independent tests are in lab/store_cases.py (tests/service runs them on
PostgreSQL); the SQLite pragmas are checked here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from gateway.store import KeySpec, Store
from gateway.store.engine import create_engine
from lab.store_cases import *  # noqa: F403 (its tests and fixtures, here on SQLite)


def url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'wiregate.db'}"


@pytest.fixture(params=["sqlite"])
def db_url(tmp_path: Path) -> str:
    return url(tmp_path)


async def test_ready_and_sqlite_pragmas(tmp_path: Path) -> None:
    store = await Store.open(url(tmp_path))
    assert await store.ready()
    await store.close()
    engine = create_engine(url(tmp_path))
    try:
        async with engine.connect() as conn:
            pragma = {
                name: (await conn.execute(text(f"PRAGMA {name}"))).scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
    finally:
        await engine.dispose()
    assert pragma == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1,
                      "busy_timeout": 10000}  # fmt: skip


async def test_sqlite_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    database = tmp_path / "wiregate.db"
    old = os.umask(0o022)
    try:
        store = await Store.open(url(tmp_path))
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        assert modes == {"wiregate.db": 0o600, "wiregate.db-wal": 0o600, "wiregate.db-shm": 0o600}
        await store.create_key(KeySpec(tags=()))  # a write: the WAL grows
        for path in (database, tmp_path / "wiregate.db-wal", tmp_path / "wiregate.db-shm"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        await store.close()
        database.chmod(0o644)  # a database an older version left readable
        store = await Store.open(url(tmp_path))
        await store.close()
        assert stat.S_IMODE(database.stat().st_mode) == 0o600
    finally:
        os.umask(old)


async def test_sqlite_statements_take_one_trip_to_the_driver_thread(tmp_path: Path) -> None:
    engine = create_engine(url(tmp_path))
    try:
        async with engine.begin() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            submit, trips = driver._execute, []

            async def counted(fn: Any, *args: Any) -> Any:
                trips.append(fn)
                return await submit(fn, *args)

            driver._execute = counted
            await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)"))
            done = await conn.execute(text("INSERT INTO t (v) VALUES ('a')"))
            assert done.rowcount == 1 and done.lastrowid == 1
            many = await conn.execute(
                text("INSERT INTO t (v) VALUES (:v)"), [{"v": "b"}, {"v": "c"}]
            )
            assert many.rowcount == 2
            rows = await conn.execute(text("SELECT id, v FROM t ORDER BY id"))
            assert list(rows.keys()) == ["id", "v"]
            assert [tuple(r) for r in rows] == [(1, "a"), (2, "b"), (3, "c")]
            assert len(trips) == 4  # one per statement
            with pytest.raises(IntegrityError):
                await conn.execute(text("INSERT INTO t (v) VALUES ('a')"))
    finally:
        await engine.dispose()
