"""The Store against a real SQLite file: round trips, versions, races, restarts.

The dialect-independent tests are in lab/store_cases.py (tests/service runs them on
PostgreSQL); the SQLite pragmas are checked here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.store import Store
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
