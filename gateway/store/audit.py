"""The audit log: who did what to what, committed with the change it records.

Actors are named by where the authority came from:

``admin:socket``            the admin unix socket (trusted by file permissions)
``admin:token``             the admin API over TCP with the admin bearer token
``admin:socket#<name>``     either of them, by an administrator who gave a name
``admin:token#<name>``      (a device login approved with ``as``: NAME)
``device:<id>``             a device, authenticated by its device token
``oidc:<iss>#<sub>``        a person signed in with OpenID Connect
``system:<duty>``           the gateway itself (``system:expiry``, ``system:ephemeral``, ...)

``detail`` is a flat mapping of strings. It must never hold a secret:
:func:`check_detail` refuses keys that name one (token, secret, password,
private key, user code), so a careless caller fails loudly in tests instead of
writing a credential to the log.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store.batch import add_at_commit
from gateway.store.models import AuditRow
from wiregate.model import Identity

__all__ = [
    "ADMIN_SOCKET",
    "ADMIN_TOKEN",
    "MAX_LIMIT",
    "AuditRecord",
    "add",
    "between",
    "check_detail",
    "device_actor",
    "oidc_actor",
    "query",
    "removed_devices",
    "system_actor",
]

ADMIN_SOCKET = "admin:socket"
ADMIN_TOKEN = "admin:token"  # noqa: S105 (an actor name, not a secret)
MAX_LIMIT = 1000
#: The actions that remove a device (deleted, its identity disabled or revoked, its key
#: expired, replaced by a re-enrollment under a new id): what relays are told of.
REMOVALS = ("device.delete", "device.replace")
MAX_TEXT = 1024
_SECRET_KEY = re.compile(r"secret|token|password|passwd|private|user_code|auth_key|cookie", re.I)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit record (times are POSIX seconds)."""

    id: int
    at: float
    actor: str
    action: str
    target: str
    detail: Mapping[str, str] = field(default_factory=dict)


def device_actor(device_id: str) -> str:
    """The actor name of a device acting with its own token."""
    return f"device:{device_id}"


def oidc_actor(identity: Identity) -> str:
    """The actor name of a person signed in with OpenID Connect."""
    return f"oidc:{identity.issuer}#{identity.subject}"


def system_actor(duty: str) -> str:
    """The actor name of one of the gateway's own duties (``expiry``, ``ephemeral``...)."""
    return f"system:{duty}"


def check_detail(detail: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``detail`` as plain strings; ValueError if a key names a secret."""
    out: dict[str, str] = {}
    for key, value in detail.items():
        if _SECRET_KEY.search(key):
            raise ValueError(f"audit detail key {key!r} names a secret; never log secrets")
        out[str(key)] = str(value)[:MAX_TEXT]
    return out


async def add(
    s: AsyncSession,
    at: float,
    actor: str,
    action: str,
    target: str,
    detail: Mapping[str, str] | None = None,
) -> None:
    """Add a record inside the caller's transaction (it commits with the change; in a
    group commit, with the batch's other records)."""
    row = AuditRow(
        at=at,
        actor=actor[:MAX_TEXT],
        action=action,
        target=target[:MAX_TEXT],
        detail=check_detail(detail or {}),
    )
    add_at_commit(s, row)


async def query(s: AsyncSession, since: float | None, limit: int) -> list[AuditRecord]:
    """Records at or after ``since`` (all if None), newest first, at most ``limit``."""
    stmt = select(AuditRow).order_by(AuditRow.at.desc(), AuditRow.id.desc())
    if since is not None:
        stmt = stmt.where(AuditRow.at >= since)
    rows = (await s.execute(stmt.limit(max(1, min(limit, MAX_LIMIT))))).scalars()
    return [AuditRecord(r.id, r.at, r.actor, r.action, r.target, dict(r.detail)) for r in rows]


async def between(s: AsyncSession, since: float, until: float, limit: int) -> list[AuditRecord]:
    """Records with ``since <= at <= until``, oldest first, at most ``limit``."""
    stmt = (
        select(AuditRow)
        .where(AuditRow.at >= since, AuditRow.at <= until)
        .order_by(AuditRow.at, AuditRow.id)
        .limit(max(1, limit))
    )
    rows = (await s.execute(stmt)).scalars()
    return [AuditRecord(r.id, r.at, r.actor, r.action, r.target, dict(r.detail)) for r in rows]


async def removed_devices(s: AsyncSession, since: float) -> list[tuple[str, float]]:
    """``(device id, when)`` of every device removal at or after ``since``, oldest first."""
    stmt = (
        select(AuditRow.target, AuditRow.at)
        .where(AuditRow.at >= since, AuditRow.action.in_(REMOVALS))
        .order_by(AuditRow.at, AuditRow.id)
    )
    return [(target, at) for target, at in (await s.execute(stmt)).tuples()]
