"""Session-level helpers for login requests; :class:`~gateway.store.Store` wraps them.

Every state change is a compare-and-set (``UPDATE ... WHERE status = <from>``)
following :data:`identity.device_login.TRANSITIONS`, so two approvals (or two
polls collecting a token) cannot both succeed, even across processes.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, desc, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store.limits import RateLimited
from gateway.store.models import DeviceRow, LoginRequestRow
from gateway.store.records import LoginCreated, login_record
from identity.device_login import (
    INTERVAL,
    LIFETIME,
    Event,
    InvalidTransition,
    PollDecision,
    PollState,
    Status,
    effective_status,
    generate_poll_token,
    generate_user_code,
    transition,
)
from identity.enrollment import hash_secret
from wiregate.errors import NotFound
from wiregate.keys import fingerprint

__all__ = [
    "KEEP_FOR",
    "MAX_PENDING",
    "PER_SOURCE",
    "advance",
    "by_poll_token",
    "by_user_code",
    "insert",
    "make_room",
    "pending",
    "poll_state",
    "record_poll",
    "rotate_device_token",
    "source_key",
]

MAX_PENDING = 1000  # also bounds a code guesser's odds (see gateway.api.limits)
PER_SOURCE = 20  # requests one address may have waiting
KEEP_FOR = 86400.0  # finished requests are deleted a day after they expire
_UNKNOWN = "no pending login request has this code"


async def make_room(s: AsyncSession, now: float, source: str) -> None:
    """Delete long-expired requests; refuse a new one from ``source`` past its fair share.

    A source (an address: IPv4, or an IPv6 /64) may have :data:`PER_SOURCE` requests
    waiting. When :data:`MAX_PENDING` wait in all, the source holding the most gives
    way (its oldest request expires) to a source holding fewer than it less one, so
    one source, or a few, cannot keep everybody else from logging in. Sources are
    stored hashed (only equality matters).
    """
    source = source_key(source)
    await s.execute(delete(LoginRequestRow).where(LoginRequestRow.expires_at < now - KEEP_FOR))
    if await _pending_count(s, now, source) >= PER_SOURCE:
        raise RateLimited(
            "too many device logins from this address are waiting for approval",
            code="too_many_logins", hint="approve or let expire the ones waiting, then retry",
        )  # fmt: skip
    if await _pending_count(s, now, None) < MAX_PENDING:
        return
    t = LoginRequestRow
    n, first = func.count().label("n"), func.min(t.created_at).label("first")
    by_source = select(t.source, n, first).where(_pending(now)).group_by(t.source)
    by_source = by_source.order_by(desc(n), first).limit(1)  # ties: the oldest request
    heaviest = (await s.execute(by_source)).first()
    mine = await _pending_count(s, now, source)
    if heaviest is None or heaviest.n <= mine + 1:
        raise RateLimited(
            "too many device logins are waiting for approval",
            code="too_many_logins", hint="try again in a few minutes",
        )  # fmt: skip
    oldest = select(t.id).where(_pending(now), t.source == heaviest.source)
    victim = (await s.execute(oldest.order_by(t.created_at, t.id).limit(1))).scalar_one()
    await advance(s, victim, Event.EXPIRE, now)


def source_key(source: str) -> str:
    """How a request's source is stored: its SHA-256 (no address kept in clear); an
    unknown source (empty, as in rows older than sources) stays empty."""
    return hashlib.sha256(source.encode()).hexdigest() if source else ""


def _pending(now: float) -> ColumnElement[bool]:
    t = LoginRequestRow
    return and_(t.status == Status.PENDING.value, t.expires_at > now)


async def _pending_count(s: AsyncSession, now: float, source: str | None) -> int:
    query = select(func.count()).select_from(LoginRequestRow).where(_pending(now))
    if source is not None:
        query = query.where(LoginRequestRow.source == source)
    return int((await s.execute(query)).scalar_one())


async def insert(
    s: AsyncSession, public_key: str, name: str, now: float, source: str = ""
) -> LoginCreated:
    """Add a pending request with a fresh user code and poll token (flushed)."""
    user_code, poll_token = generate_user_code(), generate_poll_token()
    row = LoginRequestRow(
        id="login_" + secrets.token_hex(8),
        user_code_hash=hash_secret(user_code),
        poll_token_hash=hash_secret(poll_token),
        public_key=public_key,
        name=name,
        fingerprint=fingerprint(public_key),
        status=Status.PENDING.value,
        created_at=now,
        expires_at=now + LIFETIME,
        last_poll_at=None,
        interval=INTERVAL,
        source=source_key(source),
    )
    s.add(row)
    await s.flush()
    return LoginCreated(login_record(row), user_code, poll_token, INTERVAL)


async def pending(s: AsyncSession, now: float) -> list[LoginRequestRow]:
    """The requests waiting for approval at ``now``, oldest first."""
    query = select(LoginRequestRow).where(_pending(now))
    return list((await s.execute(query.order_by(LoginRequestRow.created_at))).scalars())


async def by_user_code(s: AsyncSession, user_code: str, now: float) -> LoginRequestRow:
    """The pending request with this canonical user code, or :class:`NotFound`."""
    query = select(LoginRequestRow).where(LoginRequestRow.user_code_hash == hash_secret(user_code))
    row = (await s.execute(query)).scalar_one_or_none()
    if row is None or _status(row, now) is not Status.PENDING:
        raise NotFound(
            _UNKNOWN, code="unknown_user_code", hint="check the code on the device, or start over"
        )
    return row


async def by_poll_token(s: AsyncSession, poll_token: str) -> LoginRequestRow | None:
    """The request this poll token belongs to, if any."""
    query = select(LoginRequestRow).where(
        LoginRequestRow.poll_token_hash == hash_secret(poll_token)
    )
    return (await s.execute(query)).scalar_one_or_none()


async def advance(
    s: AsyncSession, request_id: str, event: Event, now: float, **values: Any
) -> LoginRequestRow:
    """Apply ``event`` to a request (compare-and-set); the refreshed row."""
    row = await s.get(LoginRequestRow, request_id, populate_existing=True)
    if row is None:
        raise NotFound(f"no login request {request_id!r}")
    after = transition(_status(row, now), event)  # nothing leaves expired
    await _compare_and_set(s, row, after, **values)
    return row


async def record_poll(
    s: AsyncSession, row: LoginRequestRow, decision: PollDecision, now: float
) -> bool:
    """Store a poll's outcome; False if another poll changed the request first."""
    try:
        await _compare_and_set(
            s, row, decision.status, last_poll_at=now, interval=decision.interval
        )
    except InvalidTransition:
        return False
    return True


async def rotate_device_token(s: AsyncSession, device_id: str | None, token: str) -> bool:
    """Give the enrolled device the token the poll hands out; False if it is gone."""
    if device_id is None:
        return False
    stmt = update(DeviceRow).where(DeviceRow.id == device_id)
    done = await s.execute(stmt.values(token_hash=hash_secret(token)).returning(DeviceRow.id))
    return done.scalar_one_or_none() is not None


async def _compare_and_set(
    s: AsyncSession, row: LoginRequestRow, after: Status, **values: Any
) -> None:
    t = LoginRequestRow
    stmt = update(t).where(t.id == row.id, t.status == row.status)
    stmt = stmt.values(status=after.value, **values).returning(t.id)
    stmt = stmt.execution_options(synchronize_session=False)
    if (await s.execute(stmt)).scalar_one_or_none() is None:
        raise InvalidTransition("the login request changed meanwhile; it cannot change twice")
    await s.refresh(row)


def poll_state(row: LoginRequestRow) -> PollState:
    """What :func:`identity.device_login.decide_poll` needs from a row."""
    return PollState(Status(row.status), row.expires_at, row.last_poll_at, row.interval)


def _status(row: LoginRequestRow, now: float) -> Status:
    return effective_status(Status(row.status), row.expires_at, now)
