"""Session-level helpers for a device's life after enrollment; :class:`~gateway.store.Store`
wraps them in its write transactions.

* identities: list, revoke (every device goes), disable (every device goes and no
  new device may be added for it until it is enabled again);
* key expiry: which devices' keys have expired at ``now``;
* ephemeral devices: which have been away from their stream for too long;
* device logins approved but never collected before the request expired;
* key rotation: the device's next key replaces its key, same addresses.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store.models import DeviceRow, IdentityRow, LoginRequestRow
from gateway.store.names import given_for
from gateway.store.replication import insert_for
from identity.device_login import Status
from wiregate.errors import Forbidden, NotFound
from wiregate.model import Identity

__all__ = [
    "IdentityRecord",
    "KeyLifetime",
    "abandoned_logins",
    "add_identity",
    "claim_identity",
    "ephemeral_gone",
    "expired",
    "find_identity",
    "identity_and_device",
    "identity_devices",
    "identity_for_new_device",
    "identity_record",
    "list_identities",
    "renewed_expiry",
]

# How long a device's WireGuard key lives, by who owns it and what it is tagged
# (None: no expiry). The policy file may supply its own; see gateway/lifecycle/expiry.py.
KeyLifetime = Callable[[Identity, Sequence[str]], float | None]


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    """An identity as an administrator sees it."""

    id: int
    identity: Identity
    created_at: float
    disabled: bool
    devices: int
    email: str | None = None  # a person's verified email, once known (web approval)
    name: str | None = None  # a person's display name, once known


async def list_identities(s: AsyncSession) -> list[IdentityRecord]:
    """Every identity with its device count, oldest first."""
    count = func.count(DeviceRow.id)
    query = (
        select(IdentityRow, count)
        .outerjoin(DeviceRow, DeviceRow.identity_id == IdentityRow.id)
        .group_by(IdentityRow.id)
        .order_by(IdentityRow.created_at, IdentityRow.id)
    )
    return [identity_record(row, n) for row, n in (await s.execute(query)).tuples()]


def identity_record(row: IdentityRow, devices: int) -> IdentityRecord:
    """Convert an identity row (and its device count) to a value."""
    identity = Identity(row.issuer, row.subject)
    return IdentityRecord(
        row.id, identity, row.created_at, row.disabled, devices, row.email, row.name
    )


async def find_identity(s: AsyncSession, ref: int | Identity) -> IdentityRow:
    """The identity by id or by (issuer, subject), or :class:`NotFound`."""
    if isinstance(ref, int):
        row = await s.get(IdentityRow, ref, populate_existing=True)
    else:
        query = select(IdentityRow).where(
            IdentityRow.issuer == ref.issuer, IdentityRow.subject == ref.subject
        )
        row = (await s.execute(query)).scalar_one_or_none()
    if row is None:
        raise NotFound("no such identity")
    return row


async def identity_devices(s: AsyncSession, identity_id: int) -> list[DeviceRow]:
    """The devices an identity owns."""
    query = select(DeviceRow).where(DeviceRow.identity_id == identity_id)
    return list((await s.execute(query.order_by(DeviceRow.id))).scalars())


async def identity_for_new_device(s: AsyncSession, identity: Identity, now: float) -> int:
    """The row id of ``identity``, added if new; :class:`Forbidden` if it is disabled
    (no new device for it)."""
    query = select(IdentityRow.id, IdentityRow.disabled).where(
        IdentityRow.issuer == identity.issuer, IdentityRow.subject == identity.subject
    )
    found = (await s.execute(query)).first()
    if found is None:
        return await add_identity(s, identity, now)
    _refuse_disabled(found.disabled)
    return int(found.id)


async def identity_and_device(
    s: AsyncSession, identity: Identity, name: str
) -> tuple[int | None, DeviceRow | None]:
    """In one query: the row id of ``identity`` (None: new, see :func:`add_identity`) and
    its device named ``name`` (or, failing that, ``name-N``: the name it was given when
    another device had ``name``), if any; :class:`Forbidden` if the identity is disabled."""
    same_name = and_(
        DeviceRow.identity_id == IdentityRow.id,
        or_(DeviceRow.name == name, DeviceRow.name.like(name + "-%")),
    )
    query = (
        select(IdentityRow.id, IdentityRow.disabled, DeviceRow)
        .outerjoin(DeviceRow, same_name)
        .where(IdentityRow.issuer == identity.issuer, IdentityRow.subject == identity.subject)
    )
    found = list((await s.execute(query)).tuples())
    if not found:
        return None, None
    identity_id, disabled, _ = found[0]
    _refuse_disabled(disabled)
    devices = {d.name: d for _, _, d in found if d is not None}
    given = [d for n, d in sorted(devices.items()) if given_for(n, name)]
    return int(identity_id), devices.get(name) or next(iter(given), None)


async def claim_identity(
    s: AsyncSession, identity: Identity, name: str, now: float
) -> tuple[int, DeviceRow | None]:
    """The row id of ``identity`` and its device named ``name`` (as
    :func:`identity_and_device` finds it), if any. A new identity is added by the
    statement that looks for it (an insert that does nothing when the identity exists:
    one statement for a first enrollment, which has no device yet); a known one is read
    with its device, :class:`Forbidden` if it is disabled."""
    table = IdentityRow.__table__
    row = {"issuer": identity.issuer, "subject": identity.subject, "created_at": now}
    stmt = insert_for(s, table).values(**row).on_conflict_do_nothing()
    added = (await s.execute(stmt.returning(table.c.id))).first()
    if added is not None:
        return int(added[0]), None
    known, device = await identity_and_device(s, identity, name)
    if known is None:  # removed between the two statements
        raise NotFound("no such identity")
    return known, device


async def add_identity(s: AsyncSession, identity: Identity, now: float) -> int:
    """Add ``identity`` (flushed); its row id."""
    row = IdentityRow(issuer=identity.issuer, subject=identity.subject, created_at=now)
    s.add(row)
    await s.flush()
    return row.id


def _refuse_disabled(disabled: bool) -> None:
    if disabled:
        raise Forbidden(
            "this identity is disabled",
            code="identity_disabled",
            hint="an administrator can enable it again (wiregate admin identities enable)",
        )


async def expired(s: AsyncSession, now: float) -> list[DeviceRow]:
    """Devices whose key expired at or before ``now``."""
    query = select(DeviceRow).where(DeviceRow.expires_at.is_not(None), DeviceRow.expires_at <= now)
    return list((await s.execute(query.order_by(DeviceRow.id))).scalars())


async def ephemeral_gone(
    s: AsyncSession, now: float, away: float, connected: Collection[str]
) -> list[DeviceRow]:
    """Ephemeral devices not in ``connected`` whose stream closed ``away`` seconds ago or more.

    A device that never opened its stream counts from its enrollment.
    """
    since = func.coalesce(DeviceRow.last_seen, DeviceRow.created_at)
    where: ColumnElement[bool] = and_(DeviceRow.ephemeral.is_(True), since <= now - away)
    rows = (await s.execute(select(DeviceRow).where(where).order_by(DeviceRow.id))).scalars()
    return [row for row in rows if row.id not in connected]


async def abandoned_logins(s: AsyncSession, now: float) -> list[tuple[LoginRequestRow, DeviceRow]]:
    """Approved logins whose device never collected its token before the request expired."""
    query = (
        select(LoginRequestRow, DeviceRow)
        .join(DeviceRow, LoginRequestRow.device_id == DeviceRow.id)
        .where(
            LoginRequestRow.status == Status.APPROVED.value,
            LoginRequestRow.expires_at <= now,
        )
        .order_by(LoginRequestRow.id)
    )
    return list((await s.execute(query)).tuples())


def renewed_expiry(row: DeviceRow, now: float) -> float | None:
    """A rotated key's expiry: the same lifetime as the key it replaces, from ``now``."""
    if row.expires_at is None:
        return None
    issued = row.key_rotated_at if row.key_rotated_at is not None else row.created_at
    return now + max(row.expires_at - issued, 0.0)
