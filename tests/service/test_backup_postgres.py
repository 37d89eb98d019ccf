"""Backup and restore against a real PostgreSQL (lab.pg): the dialect-independent tests
of lab/backup_cases.py, and what needs PostgreSQL whatever the source: round trips
across dialects, a PostgreSQL session in the way, restoring into PostgreSQL from the CLI."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from gateway.store import Store
from gateway.store.backup import (
    BackupError,
    backup_database,
    read_backup,
    restore_database,
)
from lab.backup_cases import *  # noqa: F403 (its tests and fixtures, here on PostgreSQL)
from lab.backup_cases import (
    MakeUrl,
    Populated,
    check_store_works,
    cli,
    config,
    dump,
    populate,
    round_trip,
    without_version,
)
from lab.fakes import T0


@pytest.fixture(params=["postgresql"])
def dialect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize(("src_dialect", "dst_dialect"),
                         [("sqlite", "postgresql"), ("postgresql", "sqlite")])  # fmt: skip
async def test_round_trip_across_dialects(
    make_url: MakeUrl, src_dialect: str, dst_dialect: str, tmp_path: Path
) -> None:
    src, dst = make_url(src_dialect), make_url(dst_dialect)
    store = await Store.open(src)
    made = await populate(store)
    await store.close()
    await round_trip(src, dst, tmp_path / "b.jsonl")
    assert read_backup(tmp_path / "b.jsonl").dialect == src_dialect
    await check_store_works(dst, made, (await dump(dst))["meta"][0]["map_version"])


async def test_backup_of_a_missing_or_unmigrated_database_is_refused(
    tmp_path: Path, make_url: MakeUrl
) -> None:
    missing = tmp_path / "none.db"
    with pytest.raises(BackupError, match="no database"):
        await backup_database(f"sqlite+aiosqlite:///{missing}", tmp_path / "b", T0)
    assert not missing.exists() and not (tmp_path / "b").exists()
    with pytest.raises(BackupError, match="never migrated"):
        await backup_database(make_url("postgresql"), tmp_path / "b", T0)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_postgresql_in_use_by_another_session_is_refused(
    make_url: MakeUrl, source: tuple[str, Populated], tmp_path: Path
) -> None:
    snapshot = await backup_database(source[0], tmp_path / "b.jsonl", T0)
    url = make_url("postgresql")
    running = await Store.open(url)  # a gateway replica still connected
    try:
        await running.map_version()
        with pytest.raises(BackupError, match="other session") as info:
            await restore_database(url, snapshot)
        assert info.value.code == "store_in_use"
    finally:
        await running.close()
    await restore_database(url, snapshot)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_cli_backup_and_restore_end_to_end(
    tmp_path: Path, source: tuple[str, Populated], make_url: MakeUrl
) -> None:
    src, made = source
    out = tmp_path / "b.jsonl"
    result = await asyncio.to_thread(cli, "backup", "--config", str(config(tmp_path, "a", src)),
                                     "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "backup written to" in result.stderr and "devices 4" in result.stderr
    assert result.stdout == "" and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert all(secret not in result.stderr for secret in made.secrets)

    dst = tmp_path / "b" / "wiregate.db"  # the default: SQLite in the state dir
    cfg = config(tmp_path, "b")
    result = await asyncio.to_thread(cli, "restore", "--config", str(cfg), str(out))
    assert result.exit_code == 0, result.output
    assert "map version" in result.stderr and "devices 4" in result.stderr
    assert without_version(await dump(f"sqlite+aiosqlite:///{dst}")) == without_version(
        await dump(src)
    )
    again = await asyncio.to_thread(cli, "restore", "--config", str(cfg), str(out))
    assert again.exit_code == 1 and "not empty" in again.stderr and "--replace" in again.stderr
    replaced = await asyncio.to_thread(cli, "restore", "--config", str(cfg), str(out), "--replace")
    assert replaced.exit_code == 0, replaced.output

    # SQLite to PostgreSQL: the URL (which may hold a password) comes from the environment
    pg = make_url("postgresql")
    env = {"WIREGATE_DATABASE_URL": pg}
    moved = await asyncio.to_thread(cli, "restore", "--config", str(cfg), str(out), env=env)
    assert moved.exit_code == 0, moved.output
    assert without_version(await dump(pg)) == without_version(await dump(src))
