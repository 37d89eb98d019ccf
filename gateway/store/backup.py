"""Backups of the gateway's store: a consistent, portable snapshot and its restore.

A backup is one JSON-lines document::

    {"format": "wiregate-backup", "version": 1, "revision": "0005",
     "created_at": "2026-11-25T01:30:00Z", "dialect": "sqlite", "tables": ["meta", ...]}
    {"table": "meta", "columns": ["id", "map_version", ...], "rows": 1}
    [1, 57, "100.64.0.0/16", "fd7a:7767:6174::/64", 12, 40]
    ...
    {"end": true, "sha256": "<hex SHA-256 of every line above>"}

It is read in one transaction (SQLite: the WAL snapshot of one BEGIN; PostgreSQL:
REPEATABLE READ, READ ONLY), so every table comes from the same instant while
the gateway keeps writing. The tables are those of the models
(:data:`Base.metadata`, parents first) except :data:`TRANSIENT_TABLES`; their
columns are read from the database itself, so a database at an older schema
revision is backed up as it is. Values are JSON (integers, floats, strings,
booleans, lists, objects), so a SQLite backup restores into PostgreSQL and back.

:func:`restore` runs in one transaction (a refusal or a failure leaves the
database as it was): migrate to head, refuse a non-empty store unless
``replace``, empty every table, step the schema down to the backup's revision
if it is older, insert the rows, migrate to head again, then move the map
version past anything agents may hold (:data:`VERSION_JUMP`) and reset
PostgreSQL's sequences.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from alembic import command
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Integer, MetaData, Table, func, inspect, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.store.engine import create_engine
from gateway.store.migrate import alembic_config, current_revision, head_revision, upgrade
from gateway.store.models import Base
from wiregate.errors import LocalError
from wiregate.files import write_private

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "TRANSIENT_TABLES",
    "VERSION_JUMP",
    "BackupError",
    "Restored",
    "Snapshot",
    "TableRows",
    "backup_database",
    "decode",
    "encode",
    "read_backup",
    "restore",
    "restore_database",
    "take_snapshot",
    "write_backup",
]

FORMAT = "wiregate-backup"
FORMAT_VERSION = 1
# Rebuilt by the gateways themselves, meaningless in another database: the map
# change feed, run-once leases, relay pair choices, rate buckets, signed-out web
# sessions, agents' path reports, nodes' pods (each agent reports them all again when
# it reconnects). Never backed up; emptied on restore.
TRANSIENT_TABLES = frozenset(
    {"map_changes", "leases", "relay_pairs", "rate_buckets", "ended_sessions", "path_reports",
     "pods"}
)  # fmt: skip
# After a restore the map version jumps this far past the backup's (and the replaced
# store's): agents may hold versions written after the backup, and an agent that
# reconnects with ?since= equal to the current version is told it is in sync.
VERSION_JUMP = 1_000_000
_META = "meta"
_FEED_FLOOR = "changes_floor"  # meta column: changes before it are not in map_changes
_CHUNK = 500

Row = tuple[Any, ...]


class BackupError(LocalError):
    """A backup that cannot be written, read or restored; nothing was changed."""

    code = "backup"


@dataclass(frozen=True, slots=True)
class TableRows:
    """One table of a backup: its column names and its rows (JSON values, in key order)."""

    name: str
    columns: tuple[str, ...]
    rows: tuple[Row, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The durable tables of a store at one instant, and where they came from."""

    revision: str
    created_at: str
    dialect: str
    tables: tuple[TableRows, ...]

    def counts(self) -> dict[str, int]:
        """Rows per table, in backup order."""
        return {t.name: len(t.rows) for t in self.tables}

    def meta(self) -> dict[str, Any]:
        """The single ``meta`` row (map version, pools, ...) as a mapping."""
        table = next((t for t in self.tables if t.name == _META), None)
        if table is None or len(table.rows) != 1:
            raise BackupError("the backup has no single meta row", code="backup_corrupt")
        return dict(zip(table.columns, table.rows[0], strict=True))

    @property
    def map_version(self) -> int:
        """The map version at the instant of the backup."""
        version = self.meta().get("map_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise BackupError("the backup's map version is not a count", code="backup_corrupt")
        return version


@dataclass(frozen=True, slots=True)
class Restored:
    """What a restore did: rows per table, the new map version, the revision migrated from."""

    counts: Mapping[str, int]
    map_version: int
    migrated_from: str | None  # the backup's revision when it was older than head


# -- taking a snapshot ---------------------------------------------------------------


async def take_snapshot(engine: AsyncEngine, now: float) -> Snapshot:
    """Read every durable table in one read-only transaction (see the module docstring)."""
    try:
        async with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                await conn.execution_options(
                    isolation_level="REPEATABLE READ", postgresql_readonly=True
                )
            async with conn.begin():
                return await conn.run_sync(_read_all, now)
    except SQLAlchemyError as exc:
        raise _database_error(exc) from exc


def _read_all(conn: Connection, now: float) -> Snapshot:
    revision = current_revision(conn)  # the first read: SQLite's snapshot starts here
    if revision is None:
        raise BackupError("the database holds no wiregate store (never migrated)")
    _check_known(revision, "the database")
    tables = tuple(_read_table(conn, table) for table in _durable_tables(conn))
    created = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Snapshot(revision, created, conn.dialect.name, tables)


def _durable_tables(conn: Connection) -> list[Table]:
    """The models' tables present in the database, parents first, as the database has them."""
    present = set(inspect(conn).get_table_names())
    reflected = MetaData()
    return [
        Table(table.name, reflected, autoload_with=conn)
        for table in Base.metadata.sorted_tables
        if table.name in present and table.name not in TRANSIENT_TABLES
    ]


def _read_table(conn: Connection, table: Table) -> TableRows:
    query = select(table).order_by(*table.primary_key.columns)
    rows = tuple(
        tuple(
            _json_value(table.name, col, value)
            for col, value in zip(table.columns, row, strict=True)
        )
        for row in conn.execute(query)
    )
    return TableRows(table.name, tuple(c.name for c in table.columns), rows)


def _json_value(table: str, column: Any, value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise BackupError(f"{table}.{column.name} holds {value}, which JSON cannot carry")
    if value is None or isinstance(value, (bool, int, float, str, list, dict)):
        return value
    raise BackupError(f"{table}.{column.name} holds a {type(value).__name__}, not a JSON value")


# -- the document ------------------------------------------------------------------------


def encode(snapshot: Snapshot) -> Iterator[bytes]:
    """The backup document, line by line (each ends with a newline)."""
    digest = hashlib.sha256()
    for doc in _documents(snapshot):
        line = _line(doc)
        digest.update(line)
        yield line
    yield _line({"end": True, "sha256": digest.hexdigest()})


def _documents(snapshot: Snapshot) -> Iterator[Any]:
    yield {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "revision": snapshot.revision,
        "created_at": snapshot.created_at,
        "dialect": snapshot.dialect,
        "tables": [t.name for t in snapshot.tables],
    }
    for table in snapshot.tables:
        yield {"table": table.name, "columns": list(table.columns), "rows": len(table.rows)}
        yield from (list(row) for row in table.rows)


def _line(doc: Any) -> bytes:
    text_ = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text_.encode() + b"\n"


def decode(data: bytes) -> Snapshot:
    """Parse and check a backup document; :class:`BackupError` names what is wrong."""
    lines = data.split(b"\n")
    if len(lines) < 3 or lines.pop() != b"":
        raise _corrupt("it is empty or truncated (no final newline)")
    header = _header(_parse(lines[0], 1))
    end = _parse(lines[-1], len(lines))
    if not isinstance(end, dict) or end.get("end") is not True:
        raise _corrupt("it is truncated (its last line is not the end marker)")
    body = b"".join(line + b"\n" for line in lines[:-1])
    if end.get("sha256") != hashlib.sha256(body).hexdigest():
        raise _corrupt("its checksum does not match its content")
    tables = _tables(lines[1:-1])
    if [t.name for t in tables] != header["tables"]:
        raise _corrupt("its tables differ from those its header lists")
    return Snapshot(header["revision"], header["created_at"], header["dialect"], tables)


def _parse(line: bytes, number: int) -> Any:
    try:
        return json.loads(line, parse_constant=_no_constant)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _corrupt(f"line {number} is not JSON ({exc})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _header(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BackupError("this is not a wiregate backup", code="backup_format")
    if doc.get("version") != FORMAT_VERSION:
        raise BackupError(
            f"backup format version {doc.get('version')!r}; this wiregate reads version "
            f"{FORMAT_VERSION}",
            code="backup_format",
            hint="restore it with the wiregate release that wrote it",
        )
    fields = ("revision", "created_at", "dialect")
    if not all(isinstance(doc.get(k), str) for k in fields) or not _strings(doc.get("tables")):
        raise _corrupt("its header lacks the revision, time, dialect or table list")
    return doc


def _tables(lines: Sequence[bytes]) -> tuple[TableRows, ...]:
    tables, at = [], 0
    while at < len(lines):
        head = _parse(lines[at], at + 2)
        if not _table_head(head):
            raise _corrupt(f"line {at + 2} should start a table")
        columns, count = tuple(head["columns"]), head["rows"]
        rows = tuple(
            _parse(line, at + 3 + i) for i, line in enumerate(lines[at + 1 : at + 1 + count])
        )
        if len(rows) != count or not all(
            isinstance(r, list) and len(r) == len(columns) for r in rows
        ):
            raise _corrupt(f"table {head['table']} does not hold {count} rows of its columns")
        tables.append(TableRows(head["table"], columns, tuple(tuple(r) for r in rows)))
        at += 1 + count
    return tuple(tables)


def _table_head(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("table"), str)
        and _strings(doc.get("columns"))
        and len(set(doc["columns"])) == len(doc["columns"]) > 0
        and isinstance(doc.get("rows"), int)
        and doc["rows"] >= 0
    )


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _corrupt(why: str) -> BackupError:
    return BackupError(f"the backup is damaged: {why}", code="backup_corrupt")


# -- files -----------------------------------------------------------------------------


def write_backup(snapshot: Snapshot, out: Path | IO[bytes]) -> None:
    """Write ``snapshot`` to a stream, or to a file created 0600 atomically (temp + rename)."""
    if not isinstance(out, Path):
        out.writelines(encode(snapshot))
        out.flush()
        return
    try:
        write_private(out, encode(snapshot))
    except OSError as exc:
        raise BackupError(f"cannot write {out}: {exc.strerror}") from exc


def read_backup(path: Path) -> Snapshot:
    """Read and check the backup file at ``path``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}") from exc
    return decode(data)


# -- restoring -------------------------------------------------------------------------


async def restore(engine: AsyncEngine, snapshot: Snapshot, *, replace: bool = False) -> Restored:
    """Load ``snapshot`` into the database behind ``engine``, in one transaction.

    Refuses (changing nothing) a backup newer than this code's migrations, a
    store that is not empty unless ``replace``, and on PostgreSQL a database
    other sessions (running gateways) are connected to.
    """
    _check_known(snapshot.revision, "the backup")
    snapshot.meta()  # refuse a backup without its meta row before touching anything
    try:
        async with engine.connect() as conn, conn.begin():
            return await conn.run_sync(_restore, snapshot, replace)
    except SQLAlchemyError as exc:
        raise _database_error(exc) from exc


def _restore(conn: Connection, snapshot: Snapshot, replace: bool) -> Restored:
    _refuse_other_sessions(conn)
    existing = current_revision(conn)
    if existing is not None:
        _check_known(existing, "the database")
    upgrade(conn)
    previous = _previous_version(conn, replace)
    _empty_all(conn)
    older = snapshot.revision != head_revision()
    if older:  # every table is empty: stepping down loses nothing
        command.downgrade(alembic_config(conn), snapshot.revision)
    tables = _insert_all(conn, snapshot)
    if older:
        upgrade(conn)
    version = max(snapshot.map_version, previous) + VERSION_JUMP
    _set_version(conn, version)
    if conn.dialect.name == "postgresql":
        _reset_sequences(conn, tables)
    return Restored(snapshot.counts(), version, snapshot.revision if older else None)


def _refuse_other_sessions(conn: Connection) -> None:
    if conn.dialect.name != "postgresql":
        return
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend'"  # not autovacuum workers
    )
    others = conn.execute(query).scalar_one()
    if others:
        raise BackupError(
            f"{others} other session(s) are connected to this database",
            code="store_in_use",
            hint="stop every gateway replica before restoring",
        )


def _previous_version(conn: Connection, replace: bool) -> int:
    """The store's map version now (0 if none); refuses a store in use unless ``replace``."""
    tables = _durable_tables(conn)
    rows = {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one() for t in tables}
    meta = next(t for t in tables if t.name == _META)
    version = conn.execute(select(meta.c.map_version)).scalar() or 0
    used = sorted(name for name, n in rows.items() if n and name != _META)
    if (used or version) and not replace:
        what = ", ".join(f"{rows[name]} {name}" for name in used) or f"map version {version}"
        raise BackupError(
            f"the store is not empty ({what})",
            code="store_not_empty",
            hint="restore into an empty database, or pass --replace to discard its content",
        )
    return int(version)


def _empty_all(conn: Connection) -> None:
    present = set(inspect(conn).get_table_names())
    for table in reversed(Base.metadata.sorted_tables):
        if table.name in present:
            conn.execute(Table(table.name, MetaData(), autoload_with=conn).delete())


def _insert_all(conn: Connection, snapshot: Snapshot) -> list[Table]:
    tables = _durable_tables(conn)
    if sorted(t.name for t in tables) != sorted(snapshot.counts()):
        raise BackupError(
            f"the backup's tables ({', '.join(snapshot.counts())}) are not those of schema "
            f"revision {snapshot.revision} ({', '.join(t.name for t in tables)})",
            code="backup_corrupt",
        )
    data = {t.name: t for t in snapshot.tables}
    for table in tables:
        _insert(conn, table, data[table.name])
    return tables


def _insert(conn: Connection, table: Table, data: TableRows) -> None:
    if set(data.columns) != {c.name for c in table.columns}:
        raise BackupError(
            f"the backup's columns of {table.name} are not those of its schema revision",
            code="backup_corrupt",
        )
    rows = [dict(zip(data.columns, row, strict=True)) for row in data.rows]
    for start in range(0, len(rows), _CHUNK):
        conn.execute(table.insert(), rows[start : start + _CHUNK])


def _set_version(conn: Connection, version: int) -> None:
    meta = Table(_META, MetaData(), autoload_with=conn)
    values = {"map_version": version}
    if _FEED_FLOOR in meta.c:  # the change feed is empty: nothing before this version
        values[_FEED_FLOOR] = version
    conn.execute(meta.update().values(values))


def _reset_sequences(conn: Connection, tables: Sequence[Table]) -> None:
    """Point each serial key's sequence past the largest id restored."""
    find = text("SELECT pg_get_serial_sequence(:table, :column)")
    for table in tables:
        keys = list(table.primary_key.columns)
        if len(keys) != 1 or not isinstance(keys[0].type, Integer):
            continue
        quoted = conn.dialect.identifier_preparer.quote(table.name)
        name = conn.execute(find, {"table": quoted, "column": keys[0].name}).scalar()
        if name is not None:
            top = select(func.coalesce(func.max(keys[0]), 0) + 1).scalar_subquery()
            conn.execute(select(func.setval(name, top, False)))


# -- whole operations on a URL ------------------------------------------------------


async def backup_database(url: str, out: Path | IO[bytes], now: float) -> Snapshot:
    """Snapshot the store at ``url`` and write it to ``out``; the snapshot written."""
    _refuse_missing_sqlite(url)
    engine = create_engine(url)
    try:
        snapshot = await take_snapshot(engine, now)
    finally:
        await engine.dispose()
    write_backup(snapshot, out)
    return snapshot


async def restore_database(url: str, snapshot: Snapshot, *, replace: bool = False) -> Restored:
    """Restore ``snapshot`` into the store at ``url`` (see :func:`restore`)."""
    engine = create_engine(url)
    try:
        return await restore(engine, snapshot, replace=replace)
    finally:
        await engine.dispose()


def _refuse_missing_sqlite(url: str) -> None:
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() == "sqlite" and database and not Path(database).exists():
        raise BackupError(f"there is no database at {parsed.database}")


def _check_known(revision: str, what: str) -> None:
    """Refuse a schema revision this code's migrations do not know (written by newer code)."""
    try:
        known = ScriptDirectory.from_config(alembic_config()).get_revision(revision)
    except CommandError:
        known = None
    if known is None:
        raise BackupError(
            f"{what} is at schema revision {revision!r}, newer than this wiregate's "
            f"({head_revision()})",
            code="newer_revision",
            hint="use the wiregate release that wrote it, or a newer one",
        )


def _database_error(exc: SQLAlchemyError) -> BackupError:
    cause = getattr(exc, "orig", None) or exc
    return BackupError(f"database error: {type(cause).__name__}: {cause}".splitlines()[0])
