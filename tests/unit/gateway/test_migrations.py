"""The Alembic migrations and the SQLAlchemy models describe the same schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from gateway.store import Store
from gateway.store.engine import create_engine
from gateway.store.migrate import alembic_config, current_revision, head_revision, upgrade
from gateway.store.models import Base


def url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"


def _diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, Base.metadata))


async def test_models_and_migrations_agree(tmp_path: Path) -> None:
    engine = create_engine(url(tmp_path))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(upgrade)
            assert await conn.run_sync(_diff) == []
            assert await conn.run_sync(current_revision) == head_revision() == "0012"
    finally:
        await engine.dispose()


async def test_diff_detects_a_missing_column(tmp_path: Path) -> None:
    # The comparison above can fail: drop a column and it must notice.
    engine = create_engine(url(tmp_path))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(upgrade)
            await conn.exec_driver_sql("ALTER TABLE devices DROP COLUMN last_seen")
            diff = await conn.run_sync(_diff)
        assert any(d[0] == "add_column" and d[3].name == "last_seen" for d in diff)
    finally:
        await engine.dispose()


async def test_open_migrates_to_head_and_downgrade_drops_all(tmp_path: Path) -> None:
    store = await Store.open(url(tmp_path))
    await store.close()
    engine = create_engine(url(tmp_path))
    try:
        async with engine.begin() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            assert {"meta", "identities", "devices", "enrollment_keys", "login_requests"} <= tables
            await conn.run_sync(_downgrade)
            left = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert left == {"alembic_version"}
    finally:
        await engine.dispose()


def _downgrade(conn: Connection) -> None:
    command.downgrade(alembic_config(conn), "base")
