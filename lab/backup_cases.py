"""Backup and restore of the store on every SQL dialect: round trips, refusals that change
nothing, older revisions, a snapshot taken during enrollments, the CLI.

A test module imports these tests (and fixtures) and provides ``dialect``:
tests/unit/gateway/test_backup.py on SQLite, tests/service/test_backup_postgres.py on a
real PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner, Result
from sqlalchemy import inspect, select
from sqlalchemy.engine import Connection

from gateway.store import EnrollRequest, KeySpec, Store
from gateway.store.backup import (
    FORMAT_VERSION,
    TRANSIENT_TABLES,
    VERSION_JUMP,
    BackupError,
    Snapshot,
    TableRows,
    backup_database,
    decode,
    encode,
    read_backup,
    restore_database,
    take_snapshot,
)
from gateway.store.engine import create_engine
from gateway.store.migrate import head_revision, upgrade
from gateway.store.models import Base
from lab.fakes import T0, new_key
from lab.pg import PgServer
from wiregate.cli.main import main
from wiregate.model import Identity

OIDC = Identity("https://idp.example.com", "alice")


__all__ = [  # what a test module imports: the tests, and the fixtures they take
    "make_url",
    "source",
    "target",
    "test_a_backup_during_enrollments_is_one_instant",
    "test_a_database_at_an_older_revision_is_backed_up_as_it_is",
    "test_a_database_newer_than_the_code_is_refused",
    "test_a_failure_midway_leaves_the_store_as_it_was",
    "test_a_store_in_use_is_refused_unless_replace",
    "test_an_older_backup_is_restored_and_migrated",
    "test_backup_holds_hashes_only_and_is_private",
    "test_bad_backups_are_refused_and_change_nothing",
    "test_cli_backup_to_stdout",
    "test_cli_restore_refusals",
    "test_round_trip_into_a_fresh_database",
]


MakeUrl = Callable[[str], str]


@pytest.fixture
def make_url(request: pytest.FixtureRequest, tmp_path: Path) -> MakeUrl:
    """A fresh, empty database of the dialect asked for."""
    made = iter(range(1000))

    def make(dialect: str) -> str:
        if dialect == "sqlite":
            return f"sqlite+aiosqlite:///{tmp_path / f'db{next(made)}.db'}"
        pg: PgServer = request.getfixturevalue("pg_server")
        return pg.create_database()

    return make


@dataclasses.dataclass
class Populated:
    """What populate() made, including every secret the store must not hold in clear."""

    reusable_secret: str
    token: str
    device_id: str
    secrets: list[str]


async def populate(store: Store) -> Populated:
    """Keys, enrollments, a replaced device, a rename, a deletion, logins, audit records."""
    _, secret = await store.create_key(KeySpec(tags=("tag:vm",), reusable=True))
    _, once = await store.create_key(KeySpec(tags=("tag:db",), description="one shot"))
    await store.revoke_key((await store.create_key(KeySpec()))[0].id, actor="admin:socket")
    first = await store.enroll(secret, EnrollRequest(new_key(), "vm-1", ("192.0.2.1:51820",)))
    second = await store.enroll(once, EnrollRequest(new_key(), "db-1", routes=("10.1.0.0/24",)))
    third = await store.enroll(secret, EnrollRequest(new_key(), "vm-3", keepalive=25))
    await store.rename_device(second.record.device.id, "db-main", actor="admin:socket")
    await store.delete_device(third.record.device.id, actor="admin:socket")
    await store.enroll_identity(OIDC, ("tag:k8s",), EnrollRequest(new_key(), "node-a"),
                                actor="system:test", detail={"via": "test"})  # fmt: skip
    approved = await store.create_login_request(new_key(), "laptop", T0)
    await store.approve_login_request(approved.record.id, OIDC, ("tag:laptop",), T0)
    pending = await store.create_login_request(new_key(), "phone", T0)
    await store.record_audit("admin:socket", "test.note", "store", {"note": "ünïcode"})
    secrets = [secret, once, first.token, second.token, third.token]
    secrets += [approved.user_code, approved.poll_token, pending.user_code, pending.poll_token]
    return Populated(secret, first.token, first.record.device.id, secrets)


def _dump(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    present = set(inspect(conn).get_table_names())
    out = {}
    for table in Base.metadata.sorted_tables:
        if table.name in present:
            rows = conn.execute(select(table).order_by(*table.primary_key.columns))
            out[table.name] = [dict(row._mapping) for row in rows]
    return out


async def dump(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every table of the models, every row, read with the models' own types."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_dump)
    finally:
        await engine.dispose()


def without_version(tables: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The durable tables, meta's map version (and change-feed floor) left out."""
    meta = [{k: v for k, v in row.items() if k not in ("map_version", "changes_floor")}
            for row in tables["meta"]]  # fmt: skip
    durable = {k: v for k, v in tables.items() if k not in TRANSIENT_TABLES}
    return {**durable, "meta": meta}


@pytest.fixture
async def source(make_url: MakeUrl, dialect: str) -> AsyncIterator[tuple[str, Populated]]:
    url = make_url(dialect)
    store = await Store.open(url)
    made = await populate(store)
    await store.close()
    yield url, made


async def round_trip(src: str, dst: str, path: Path) -> None:
    snapshot = await backup_database(src, path, T0)
    before = await dump(src)
    restored = await restore_database(dst, read_backup(path))
    after = await dump(dst)
    assert without_version(after) == without_version(before)
    version = before["meta"][0]["map_version"]
    assert restored.map_version == version + VERSION_JUMP == after["meta"][0]["map_version"]
    assert snapshot.map_version == version and restored.migrated_from is None
    if "changes_floor" in after["meta"][0]:  # the change feed starts afresh
        assert after["meta"][0]["changes_floor"] == restored.map_version
    assert all(after[name] == [] for name in TRANSIENT_TABLES if name in after)


async def check_store_works(url: str, made: Populated, restored_version: int) -> None:
    """The restored store enrolls (fresh address, ids past the restored ones), authenticates."""
    store = await Store.open(url)
    try:
        known = await store.list_devices()
        assert (await store.device_by_token(made.token)).device.id == made.device_id
        enrolled = await store.enroll(made.reusable_secret, EnrollRequest(new_key(), "vm-new"))
        assert enrolled.version == restored_version + 1
        assert enrolled.record.device.ipv4 not in {d.device.ipv4 for d in known}
        bob = Identity("https://idp.example.com", "bob")
        await store.enroll_identity(bob, (), EnrollRequest(new_key(), "n"), actor="t", detail={})
        await store.record_audit("admin:socket", "test.after", "store", {})
        identities = await store.list_identities()
        assert len({i.id for i in identities}) == len(identities) == 4  # serial ids moved on
        assert (await store.list_audit(limit=1))[0].action == "test.after"
    finally:
        await store.close()


async def test_round_trip_into_a_fresh_database(
    source: tuple[str, Populated], make_url: MakeUrl, dialect: str, tmp_path: Path
) -> None:
    src, made = source
    dst = make_url(dialect)
    await round_trip(src, dst, tmp_path / "b.jsonl")
    await check_store_works(dst, made, (await dump(dst))["meta"][0]["map_version"])


async def test_backup_holds_hashes_only_and_is_private(
    source: tuple[str, Populated], tmp_path: Path
) -> None:
    src, made = source
    path = tmp_path / "b.jsonl"
    path.write_text("an older backup\n")
    path.chmod(0o644)
    snapshot = await backup_database(src, path, T0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # replaced by a new 0600 file
    assert os.listdir(tmp_path).count("b.jsonl") == 1 and not list(tmp_path.glob(".b.jsonl*"))
    data = path.read_bytes()
    assert all(secret.encode() not in data for secret in made.secrets)
    assert b"wgk_" not in data and b"wgd_" not in data
    header = json.loads(data.splitlines()[0])
    assert header["format"] == "wiregate-backup" and header["version"] == FORMAT_VERSION
    assert header["revision"] == head_revision() and header["created_at"] == "2023-11-14T22:13:20Z"
    assert not set(header["tables"]) & TRANSIENT_TABLES
    order = header["tables"]
    assert order.index("identities") < order.index("devices") < order.index("login_requests")
    assert decode(data) == snapshot
    assert snapshot.counts()["devices"] == 4 and snapshot.counts()["enrollment_keys"] == 3


@pytest.fixture
async def target(make_url: MakeUrl, dialect: str) -> str:
    """A store in use: one device enrolled, map version 1."""
    url = make_url(dialect)
    store = await Store.open(url)
    _, secret = await store.create_key(KeySpec())
    await store.enroll(secret, EnrollRequest(new_key(), "other"))
    await store.close()
    return url


async def test_a_store_in_use_is_refused_unless_replace(
    source: tuple[str, Populated], target: str, tmp_path: Path
) -> None:
    src, made = source
    snapshot = await backup_database(src, tmp_path / "b.jsonl", T0)
    before = await dump(target)
    refused = (r"not empty \(2 audit_log, 1 devices, 1 enrollment_keys, 1 identities, "
               r"1 key_history\)")  # fmt: skip
    with pytest.raises(BackupError, match=refused) as info:
        await restore_database(target, snapshot)
    assert info.value.code == "store_not_empty"
    assert await dump(target) == before
    restored = await restore_database(target, snapshot, replace=True)
    assert without_version(await dump(target)) == without_version(await dump(src))
    assert restored.map_version == max(snapshot.map_version, 1) + VERSION_JUMP
    await check_store_works(target, made, restored.map_version)


async def test_a_failure_midway_leaves_the_store_as_it_was(
    source: tuple[str, Populated], target: str, tmp_path: Path
) -> None:
    snapshot = await backup_database(source[0], tmp_path / "b.jsonl", T0)
    devices = next(t for t in snapshot.tables if t.name == "devices")
    orphan = dict(zip(devices.columns, devices.rows[0], strict=True)) | {"identity_id": 999}
    broken = TableRows("devices", devices.columns, (*devices.rows, tuple(orphan.values())))
    tables = tuple(broken if t.name == "devices" else t for t in snapshot.tables)
    before = await dump(target)
    with pytest.raises(BackupError, match="database error: "):
        await restore_database(target, dataclasses.replace(snapshot, tables=tables), replace=True)
    assert await dump(target) == before  # deletions, inserts and the version all rolled back


def resealed(lines: list[bytes]) -> bytes:
    """The lines (the old end marker dropped) with a correct end marker: well-formed."""
    body = b"".join(lines[:-1])
    return (
        body
        + json.dumps({"end": True, "sha256": hashlib.sha256(body).hexdigest()}).encode()
        + b"\n"
    )


def _edit_header(data: bytes, **changes: Any) -> bytes:
    lines = data.splitlines(keepends=True)
    header = json.loads(lines[0]) | changes
    lines[0] = json.dumps(header).encode() + b"\n"
    return resealed(lines)


@pytest.mark.parametrize(
    ("damage", "code", "message"),
    [
        (lambda d: d[: len(d) // 2], "backup_corrupt", "truncated"),
        (lambda d: d[:-1], "backup_corrupt", "truncated"),
        (lambda d: d.replace(b'"vm-1"', b'"vm-2"'), "backup_corrupt", "checksum"),
        (lambda d: b"", "backup_corrupt", "empty"),
        (lambda d: b"\x00\xff" + d, "backup_corrupt", "not JSON"),
        (lambda d: _edit_header(d, format="other"), "backup_format", "not a wiregate backup"),
        (lambda d: _edit_header(d, version=2), "backup_format", "format version 2"),
        (lambda d: _edit_header(d, revision="9999"), "newer_revision", "'9999', newer"),
        (lambda d: _edit_header(d, tables=["meta"]), "backup_corrupt", "tables differ"),
    ],
    ids=[
        "half",
        "last-byte",
        "bit-flip",
        "empty",
        "garbage",
        "format",
        "version",
        "newer",
        "tables",
    ],
)
async def test_bad_backups_are_refused_and_change_nothing(
    source: tuple[str, Populated],
    target: str,
    tmp_path: Path,
    damage: Callable[[bytes], bytes],
    code: str,
    message: str,
) -> None:
    path = tmp_path / "b.jsonl"
    await backup_database(source[0], path, T0)
    path.write_bytes(damage(path.read_bytes()))
    before = await dump(target)
    with pytest.raises(BackupError, match=message) as info:
        await restore_database(target, read_backup(path), replace=True)
    assert info.value.code == code
    assert await dump(target) == before


async def test_a_database_newer_than_the_code_is_refused(target: str, tmp_path: Path) -> None:
    engine = create_engine(target)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    finally:
        await engine.dispose()
    with pytest.raises(BackupError, match="'9999', newer") as info:
        await backup_database(target, tmp_path / "b.jsonl", T0)
    assert info.value.code == "newer_revision" and not (tmp_path / "b.jsonl").exists()


def _at_revision_0003(snapshot: Snapshot) -> Snapshot:
    """The snapshot as a database at revision 0003 would have held it."""
    dropped = {"meta": {"changes_floor"}, "devices": {"nat_type", "agent_version", "agent_os"},
               "login_requests": {"source"},
               "identities": {"email", "name"}}  # fmt: skip
    tables = []
    for t in snapshot.tables:
        if t.name in ("key_history", "policies"):  # revisions 0006, 0008
            continue
        keep = [i for i, c in enumerate(t.columns) if c not in dropped.get(t.name, set())]
        rows = tuple(tuple(row[i] for i in keep) for row in t.rows)
        tables.append(TableRows(t.name, tuple(t.columns[i] for i in keep), rows))
    return dataclasses.replace(snapshot, revision="0003", tables=tuple(tables))


async def test_an_older_backup_is_restored_and_migrated(
    source: tuple[str, Populated], make_url: MakeUrl, dialect: str, tmp_path: Path
) -> None:
    src, made = source
    path = tmp_path / "old.jsonl"
    path.write_bytes(b"".join(encode(_at_revision_0003(await backup_database(src, path, T0)))))
    dst = make_url(dialect)
    restored = await restore_database(dst, read_backup(path))
    assert restored.migrated_from == "0003"
    before, after = await dump(src), await dump(dst)
    assert [d["nat_type"] for d in after["devices"]] == [None] * len(before["devices"])
    strip = [{k: v for k, v in d.items() if k != "nat_type"} for d in before["devices"]]
    assert [{k: v for k, v in d.items() if k != "nat_type"} for d in after["devices"]] == strip
    rebuilt = {"devices": [], "key_history": []}  # key_history: refilled by migration 0006
    assert without_version(after) | rebuilt == without_version(before) | rebuilt
    keys = [sorted(k["public_key"] for k in d["key_history"]) for d in (after, before)]
    assert keys[0] == keys[1] and keys[0]
    await check_store_works(dst, made, restored.map_version)


async def test_a_database_at_an_older_revision_is_backed_up_as_it_is(
    make_url: MakeUrl, dialect: str, tmp_path: Path
) -> None:
    url = make_url(dialect)
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(upgrade, "0002")
            await conn.exec_driver_sql(
                "INSERT INTO meta (id, map_version, ipv4_pool, ipv6_pool, ipam_cursor) "
                "VALUES (1, 7, '100.64.0.0/16', 'fd7a:7767:6174::/64', 0)"
            )
    finally:
        await engine.dispose()
    snapshot = await backup_database(url, tmp_path / "b.jsonl", T0)
    assert snapshot.revision == "0002" and "audit_log" not in snapshot.counts()
    assert snapshot.meta() == {"id": 1, "map_version": 7, "ipv4_pool": "100.64.0.0/16",
                               "ipv6_pool": "fd7a:7767:6174::/64", "ipam_cursor": 0}  # fmt: skip
    dst = make_url(dialect)
    restored = await restore_database(dst, read_backup(tmp_path / "b.jsonl"))
    assert restored.migrated_from == "0002" and restored.map_version == 7 + VERSION_JUMP
    store = await Store.open(dst)
    try:
        assert await store.map_version() == restored.map_version
    finally:
        await store.close()


async def test_a_backup_during_enrollments_is_one_instant(make_url: MakeUrl, dialect: str) -> None:
    url = make_url(dialect)
    store = await Store.open(url)
    engine = create_engine(url)
    try:
        _, secret = await store.create_key(KeySpec(reusable=True))
        versions: dict[str, int] = {}

        async def enroll(i: int) -> None:
            enrolled = await store.enroll(secret, EnrollRequest(new_key(), f"vm-{i}"))
            versions[enrolled.record.device.id] = enrolled.version

        tasks = [asyncio.create_task(enroll(i)) for i in range(60)]
        snapshots = []
        while not all(t.done() for t in tasks):
            snapshots.append(await take_snapshot(engine, T0))
        await asyncio.gather(*tasks)
    finally:
        await engine.dispose()
        await store.close()
    partial = [s for s in snapshots if 0 < s.counts()["devices"] < 60]
    assert partial, "no snapshot was taken while enrollments ran"
    for snapshot in snapshots:
        assert_consistent(snapshot, versions)


def assert_consistent(snapshot: Snapshot, versions: dict[str, int]) -> None:
    tables = {t.name: [dict(zip(t.columns, r, strict=True)) for r in t.rows]
              for t in snapshot.tables}  # fmt: skip
    devices = {d["id"] for d in tables["devices"]}
    assert devices == {d for d, v in versions.items() if v <= snapshot.map_version}
    assert {d["identity_id"] for d in tables["devices"]} <= {i["id"] for i in tables["identities"]}
    assert tables["enrollment_keys"][0]["used_count"] == len(devices)
    enrolled = {a["target"] for a in tables["audit_log"] if a["action"] == "device.enroll"}
    assert enrolled == devices
    assert snapshot.meta()["ipam_cursor"] == len(devices)


def config(tmp_path: Path, name: str, url: str | None = None) -> Path:
    state = tmp_path / name
    state.mkdir()
    path = tmp_path / f"{name}.toml"
    lines = [f'[gateway]\nstate_dir = "{state}"\nadmin_socket = "{state}/gw.sock"\n']
    lines += [f'database_url = "{url}"\n'] if url else []
    path.write_text("".join(lines))
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    with structlog.testing.capture_logs():
        return CliRunner().invoke(main, list(args), env=env)


async def test_cli_backup_to_stdout(tmp_path: Path, source: tuple[str, Populated]) -> None:
    cfg = config(tmp_path, "a", source[0])
    result = await asyncio.to_thread(cli, "backup", "--config", str(cfg), "--out", "-")
    assert result.exit_code == 0, result.output
    assert decode(result.stdout_bytes).counts()["devices"] == 4
    assert "backup written to stdout" in result.stderr


async def test_cli_restore_refusals(tmp_path: Path, source: tuple[str, Populated]) -> None:
    out = tmp_path / "b.jsonl"
    await backup_database(source[0], out, T0)
    cfg = config(tmp_path, "b")
    db = tmp_path / "b" / "wiregate.db"
    with socket.socket(socket.AF_UNIX) as listener:  # a gateway answering on its admin socket
        listener.bind(str(tmp_path / "b" / "gw.sock"))
        listener.listen(1)
        running = await asyncio.to_thread(cli, "restore", "--config", str(cfg), str(out))
    assert running.exit_code == 1 and "the gateway is running" in running.stderr
    assert not db.exists()
    other_pools = cfg.read_text() + 'ipv4_pool = "10.20.0.0/16"\n'
    cfg.write_text(other_pools)
    pools = await asyncio.to_thread(cli, "restore", "--config", str(cfg), str(out))
    assert pools.exit_code == 1 and "address pools are 100.64.0.0/16" in pools.stderr
    assert not db.exists()
    out.write_bytes(out.read_bytes()[:-10])
    damaged = await asyncio.to_thread(cli, "restore", "--config", str(config(tmp_path, "c")),
                                      str(out))  # fmt: skip
    assert damaged.exit_code == 1 and "damaged" in damaged.stderr
    assert not (tmp_path / "c" / "wiregate.db").exists()
