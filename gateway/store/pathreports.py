"""Agents' path reports in the store: one row per (reporter, peer), replaced by each
report and deleted with either device (``ON DELETE CASCADE``), so every replica serves
the same fleet matrix (:mod:`gateway.pathmatrix`). :class:`~gateway.store.Store` wraps
these."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store.models import PathReportRow
from gateway.store.replication import insert_for
from wiregate.pathwire import PathEntry

__all__ = ["StoredPath", "read", "upsert"]

_UPDATED = ("path_mtu", "black_hole", "frag_needed", "probe_failures", "path", "relay_id",
            "reason", "handshake_age", "rtt_ms", "reported_at")  # fmt: skip


@dataclass(frozen=True, slots=True)
class StoredPath:
    """What ``reporter`` last reported of its path to ``entry.peer``, and when."""

    reporter: str
    entry: PathEntry
    reported_at: float


def _values(reporter: str, entry: PathEntry, now: float) -> dict[str, object]:
    return {
        "reporter_id": reporter,
        "peer_id": entry.peer,
        "path_mtu": entry.path_mtu,
        "black_hole": entry.black_hole,
        "frag_needed": entry.frag_needed,
        "probe_failures": entry.probe_failures,
        "path": entry.path,
        "relay_id": entry.relay,
        "reason": entry.reason,
        "handshake_age": entry.handshake_age,
        "rtt_ms": entry.rtt_ms,
        "reported_at": now,
    }


async def upsert(s: AsyncSession, reporter: str, entries: Sequence[PathEntry], now: float) -> None:
    """Insert or replace the rows of ``entries`` (one statement)."""
    if not entries:
        return
    table = PathReportRow.__table__
    stmt = insert_for(s, table).values([_values(reporter, e, now) for e in entries])
    stmt = stmt.on_conflict_do_update(
        index_elements=[table.c.reporter_id, table.c.peer_id],
        set_={name: stmt.excluded[name] for name in _UPDATED},
    )
    await s.execute(stmt)


async def read(s: AsyncSession, device: str | None = None) -> list[StoredPath]:
    """Every row, or those ``device`` reported or is the peer of, by (reporter, peer)."""
    stmt = select(PathReportRow).order_by(PathReportRow.reporter_id, PathReportRow.peer_id)
    if device is not None:
        stmt = stmt.where(or_(PathReportRow.reporter_id == device, PathReportRow.peer_id == device))
    return [_stored(row) for row in (await s.execute(stmt)).scalars()]


def _stored(row: PathReportRow) -> StoredPath:
    entry = PathEntry(
        peer=row.peer_id,
        path_mtu=row.path_mtu,
        black_hole=row.black_hole,
        frag_needed=row.frag_needed,
        probe_failures=row.probe_failures,
        path=row.path,
        relay=row.relay_id,
        reason=row.reason,
        handshake_age=row.handshake_age,
        rtt_ms=row.rtt_ms,
    )
    return StoredPath(row.reporter_id, entry, row.reported_at)
