"""What gateway replicas share through the store: the map change feed, leases, relay pairs.

Session-level helpers the :class:`~gateway.store.Store` calls inside its transactions.

* **Change feed**: every map-changing transaction writes one ``map_changes`` row per
  device it changed, at the version it took; on PostgreSQL the version is also sent
  with ``pg_notify`` on :data:`CHANNEL`, delivered when (and only if) the
  transaction commits. A replica that hears of a version it has not applied reads
  the rows after its own version (:func:`changes_since`).
* **Leases**: a named duty (the expiry sweeper) held by one replica until it stops
  renewing; ``INSERT … ON CONFLICT DO UPDATE … WHERE`` takes it atomically on both
  dialects.
* **Relay pairs**: which relay a pair of devices uses, claimed first-writer-wins and
  moved with compare-and-set, so both sides of a pair get the same relay whichever
  replica they ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store.batch import add_at_commit
from gateway.store.models import LeaseRow, MapChangeRow, MetaRow, RelayPairRow
from wiregate.podwire import Pod

__all__ = [
    "CHANNEL",
    "ChangeKind",
    "ChangeRow",
    "changes_since",
    "claim_relay_pair",
    "insert_for",
    "notify",
    "prune_changes",
    "prune_relay_pairs",
    "record_change",
    "relay_pair",
    "take_lease",
]

CHANNEL = "wiregate_map"


class ChangeKind(StrEnum):
    """What a map version did to one device, or to the policy."""

    UPSERT = "upsert"
    REMOVE = "remove"
    POLICY = "policy"  # a policy document put in force (no device; see store.policies)
    PODS = "pods"  # a node's pods changed (store.pods)


@dataclass(frozen=True, slots=True)
class ChangeRow:
    """One recorded change: ``version`` changed ``device_id`` (``reason`` for removals;
    ``pods``, for a pods change, the node's pods as the same snapshot holds them)."""

    version: int
    kind: ChangeKind
    device_id: str
    reason: str | None
    pods: tuple[Pod, ...] = ()


def _dialect(s: AsyncSession) -> str:
    return s.get_bind().dialect.name


async def notify(s: AsyncSession, version: int) -> None:
    """Tell listening replicas (PostgreSQL) that ``version`` exists once this commits."""
    if _dialect(s) == "postgresql":
        await s.execute(text("SELECT pg_notify(:c, :v)"), {"c": CHANNEL, "v": str(version)})


async def record_change(
    s: AsyncSession, version: int, kind: ChangeKind, device_id: str, now: float,
    reason: str | None = None,
) -> None:  # fmt: skip
    """Record that ``version`` changed ``device_id`` (in a group commit, inserted with the
    batch's other changes)."""
    add_at_commit(s, MapChangeRow(version=version, kind=kind.value, device_id=device_id,
                                  reason=reason, at=now))  # fmt: skip


async def changes_since(s: AsyncSession, version: int) -> tuple[int, list[ChangeRow]] | None:
    """The committed head version and every change after ``version`` up to it, in order;
    None when changes after ``version`` were pruned (reload the whole map instead).

    The head is read first: versions are taken under the meta row's lock in commit
    order, so every version up to a committed head is settled, and the change rows
    read by the next statement include all of them.
    """
    head, floor = (await s.execute(select(MetaRow.map_version, MetaRow.changes_floor))).one()
    if version < floor:
        return None
    query = (
        select(MapChangeRow)
        .where(MapChangeRow.version > version, MapChangeRow.version <= head)
        .order_by(MapChangeRow.version)
    )
    rows = (await s.execute(query)).scalars()
    return head, [ChangeRow(r.version, ChangeKind(r.kind), r.device_id, r.reason) for r in rows]


async def prune_changes(s: AsyncSession, keep: int) -> int:
    """Keep the newest ``keep`` versions' changes; returns how many rows went."""
    head = (await s.execute(select(MetaRow.map_version).with_for_update())).scalar_one()
    floor = max(0, head - keep)
    done = await s.execute(delete(MapChangeRow).where(MapChangeRow.version <= floor))
    await s.execute(
        update(MetaRow).where(MetaRow.changes_floor < floor).values(changes_floor=floor)
    )
    return int(getattr(done, "rowcount", 0) or 0)


def insert_for(s: AsyncSession, table: Any) -> Any:
    """An INSERT of the session's dialect (with ``on_conflict_do_*``)."""
    return (postgresql.insert if _dialect(s) == "postgresql" else sqlite.insert)(table)


async def take_lease(s: AsyncSession, name: str, holder: str, now: float, ttl: float) -> bool:
    """Take or renew the lease ``name`` for ``holder`` until ``now + ttl``; whether held."""
    lease = LeaseRow.__table__
    stmt = insert_for(s, lease).values(name=name, holder=holder, expires_at=now + ttl)
    stmt = stmt.on_conflict_do_update(
        index_elements=[lease.c.name],
        set_={"holder": holder, "expires_at": now + ttl},
        where=(lease.c.holder == holder) | (lease.c.expires_at < now),
    ).returning(lease.c.holder)
    return (await s.execute(stmt)).scalar_one_or_none() == holder


async def relay_pair(s: AsyncSession, a: str, b: str) -> str | None:
    """The relay the pair ``a`` < ``b`` uses, if one was claimed."""
    query = select(RelayPairRow.relay_id).where(
        RelayPairRow.device_a == a, RelayPairRow.device_b == b
    )
    found: str | None = (await s.execute(query)).scalar_one_or_none()
    return found


async def claim_relay_pair(
    s: AsyncSession, a: str, b: str, relay_id: str, expected: str | None, now: float
) -> str:
    """Set the pair's relay to ``relay_id`` if it is still ``expected`` (None: unclaimed);
    returns the relay the pair uses afterwards (another replica's choice if it won)."""
    pair = RelayPairRow.__table__
    if expected is None:
        stmt = insert_for(s, pair).values(device_a=a, device_b=b, relay_id=relay_id, used_at=now)
        await s.execute(stmt.on_conflict_do_nothing())
    else:
        await s.execute(
            update(RelayPairRow)
            .where(RelayPairRow.device_a == a, RelayPairRow.device_b == b)
            .where(RelayPairRow.relay_id == expected)
            .values(relay_id=relay_id, used_at=now)
        )
    current = await relay_pair(s, a, b)
    return current if current is not None else relay_id


async def prune_relay_pairs(s: AsyncSession, before: float) -> None:
    """Forget pairs no ticket used since ``before``."""
    await s.execute(delete(RelayPairRow).where(RelayPairRow.used_at < before))
