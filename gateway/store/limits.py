"""Session-level helpers for what every replica shares against abuse: token buckets,
signed-out web sessions and the history of device keys; :class:`~gateway.store.Store`
wraps them.

A bucket is one row (``rate_buckets``); taking a token is a single conditional
``UPDATE`` that refills and spends in SQL, so two replicas charging the same bucket
at once cannot both spend its last token (PostgreSQL re-checks the condition on the
row it locked; SQLite serializes writers). A missing row is a full bucket.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, case, delete, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store.models import EndedSessionRow, KeyHistoryRow, RateBucketRow
from gateway.store.replication import insert_for
from wiregate.errors import Conflict, RemoteError

__all__ = [
    "FORGET_AFTER",
    "Bucket",
    "RateLimited",
    "bucket_key",
    "end_session",
    "record_key",
    "refuse_used_key",
    "session_ended",
    "take_all",
]

FORGET_AFTER = 3600.0  # a bucket untouched this long is full again for every Bucket below


class RateLimited(RemoteError):
    """Over a rate limit (HTTP 429); nothing was looked up or changed."""

    status = 429
    code = "rate_limited"


@dataclass(frozen=True, slots=True)
class Bucket:
    """A kind of token bucket: ``capacity`` tokens, refilled at ``rate`` per second."""

    name: str
    capacity: float
    rate: float
    message: str  # the 429's message and hint, and its error code
    hint: str
    code: str = RateLimited.code

    def __post_init__(self) -> None:
        if self.capacity / self.rate > FORGET_AFTER:
            raise ValueError(f"bucket {self.name} refills slower than FORGET_AFTER")


def bucket_key(bucket: Bucket, who: str) -> str:
    """The row key of ``bucket`` for ``who`` (hashed: no address or identity in clear)."""
    return f"{bucket.name}:{hashlib.sha256(who.encode()).hexdigest()}"


async def take_all(s: AsyncSession, charges: Sequence[tuple[Bucket, str]], now: float) -> None:
    """Spend one token of each bucket for its ``who``; the first refusal is raised
    (the caller's transaction is rolled back, so nothing is spent then)."""
    table = RateBucketRow.__table__
    await s.execute(delete(RateBucketRow).where(RateBucketRow.updated < now - FORGET_AFTER))
    for bucket, who in charges:
        key = bucket_key(bucket, who)
        fresh = insert_for(s, table).values(key=key, tokens=bucket.capacity, updated=now)
        await s.execute(fresh.on_conflict_do_nothing())
        available = _available(bucket, now)
        stmt = update(RateBucketRow).where(RateBucketRow.key == key, available >= 1.0)
        later = case((RateBucketRow.updated < now, literal(now)), else_=RateBucketRow.updated)
        stmt = stmt.values(tokens=available - 1.0, updated=later)
        if (await s.execute(stmt.returning(RateBucketRow.key))).scalar_one_or_none() is None:
            raise RateLimited(bucket.message, hint=bucket.hint, code=bucket.code)


def _available(bucket: Bucket, now: float) -> ColumnElement[float]:
    """The bucket's tokens after refilling up to ``now`` (capped), in SQL."""
    row = RateBucketRow
    elapsed = case((row.updated < now, literal(now) - row.updated), else_=0.0)
    refilled = row.tokens + elapsed * bucket.rate
    return case((refilled > bucket.capacity, literal(bucket.capacity)), else_=refilled)


# -- signed-out web sessions -------------------------------------------------------------


def _session_key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


async def end_session(s: AsyncSession, session_id: str, expires_at: float, now: float) -> None:
    """Refuse ``session_id`` until ``expires_at`` (when its cookie expires anyway)."""
    await s.execute(delete(EndedSessionRow).where(EndedSessionRow.expires_at <= now))
    stmt = insert_for(s, EndedSessionRow.__table__)
    stmt = stmt.values(session_id=_session_key(session_id), expires_at=expires_at)
    await s.execute(stmt.on_conflict_do_nothing())


async def session_ended(s: AsyncSession, session_id: str) -> bool:
    """Whether ``session_id`` was signed out."""
    query = select(EndedSessionRow.session_id)
    query = query.where(EndedSessionRow.session_id == _session_key(session_id))
    return (await s.execute(query)).first() is not None


# -- key history -------------------------------------------------------------------------

_USED = "this public key belongs or belonged to a device; a key is never registered twice"
_NEW_KEY = "generate a new key pair (an old key never comes back)"


async def refuse_used_key(s: AsyncSession, public_key: str) -> None:
    """:class:`Conflict` (409 ``duplicate_public_key``) if any device ever had the key."""
    query = select(KeyHistoryRow.public_key).where(KeyHistoryRow.public_key == public_key)
    if (await s.execute(query)).first() is not None:
        raise Conflict(_USED, code="duplicate_public_key", hint=_NEW_KEY)


async def record_key(s: AsyncSession, public_key: str, device_id: str, now: float) -> None:
    """Remember that ``device_id`` uses ``public_key``; :class:`Conflict` (409
    ``duplicate_public_key``) if any device ever did (one statement: check and insert)."""
    row = {"public_key": public_key, "device_id": device_id, "first_used_at": now}
    stmt = insert_for(s, KeyHistoryRow.__table__).values(**row).on_conflict_do_nothing()
    if (await s.execute(stmt.returning(KeyHistoryRow.public_key))).first() is None:
        raise Conflict(_USED, code="duplicate_public_key", hint=_NEW_KEY)
