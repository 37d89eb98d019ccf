"""Session-level helpers for login requests; :class:`~gateway.store.Store` wraps them.

Every state change is a compare-and-set (``UPDATE ... WHERE status = <from>``)
following :data:`identity.device_login.TRANSITIONS`, so two approvals (or two
polls collecting a token) cannot both succeed, even across processes.
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

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
    TooManyGuesses,
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
    "advance",
    "by_poll_token",
    "by_user_code",
    "insert",
    "make_room",
    "poll_state",
    "record_poll",
    "rotate_device_token",
]

MAX_PENDING = 1000  # also bounds a code guesser's odds (see GuessLimiter)
KEEP_FOR = 86400.0  # finished requests are deleted a day after they expire
_UNKNOWN = "no pending login request has this code"


async def make_room(s: AsyncSession, now: float) -> None:
    """Delete long-expired requests; refuse a new one when too many are pending."""
    await s.execute(delete(LoginRequestRow).where(LoginRequestRow.expires_at < now - KEEP_FOR))
    pending = select(func.count()).select_from(LoginRequestRow)
    pending = pending.where(
        LoginRequestRow.status == Status.PENDING.value, LoginRequestRow.expires_at > now
    )
    if (await s.execute(pending)).scalar_one() >= MAX_PENDING:
        raise TooManyGuesses(
            "too many device logins are waiting for approval", hint="try again in a few minutes"
        )


async def insert(s: AsyncSession, public_key: str, name: str, now: float) -> LoginCreated:
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
    )
    s.add(row)
    await s.flush()
    return LoginCreated(login_record(row), user_code, poll_token, INTERVAL)


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
