"""Policy documents in the store: the one in force, by the map version that set it.

A policy change is a map change: :func:`write` runs inside a transaction that took the
next map version (and with it the write lock, so replicas setting policies at once
are serialized), adds the document's row, records a ``policy`` change in the feed
and the audit record (who, the old hash, the new hash). Each replica's follower reads
the change and the document that version set (:func:`read`), and applies it.

Which document wins: one set through the admin API (``source`` ``api``) stays in
force until it is reset; a replica's policy file (``source`` ``file``) is written
only while no API-set document is in force (``keep_api``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store import audit
from gateway.store import replication as repl
from gateway.store.models import PolicyRow

__all__ = [
    "POLICY_CHANGE_ID",
    "PolicySource",
    "PolicyText",
    "PolicyWrite",
    "StoredPolicy",
    "Unchanged",
    "read",
    "write",
]

POLICY_CHANGE_ID = ""  # the device_id of a policy change in map_changes: no device's
ACTION = "policy.set"


class PolicySource(StrEnum):
    """Where a document in force came from."""

    API = "api"
    FILE = "file"
    DEFAULT = "default"  # reset without a policy file: every device peers with every other


@dataclass(frozen=True, slots=True)
class PolicyText:
    """A document to put in force: its text, its format (yaml, json, toml), its hash."""

    text: str
    format: str
    hash: str


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    """A document the store holds, put in force at map ``version`` by ``actor``."""

    version: int
    hash: str
    format: str
    source: PolicySource
    document: str
    actor: str
    at: float


@dataclass(frozen=True, slots=True)
class PolicyWrite:
    """What :func:`write` did: ``stored`` is the new document in force (None: nothing
    was written: the same document was in force, or an API-set one was kept)."""

    previous: StoredPolicy | None
    stored: StoredPolicy | None = None


class Unchanged(Exception):  # control flow: roll the version taken back
    """Nothing to write: the transaction is rolled back, the version it took with it."""

    def __init__(self, result: PolicyWrite) -> None:
        super().__init__("policy unchanged")
        self.result = result


def _stored(row: PolicyRow) -> StoredPolicy:
    return StoredPolicy(row.version, row.hash, row.format, PolicySource(row.source),
                        row.document, row.actor, row.at)  # fmt: skip


async def read(s: AsyncSession, version: int | None = None) -> StoredPolicy | None:
    """The document in force at ``version`` (None: now); None if none was ever stored."""
    query = select(PolicyRow).order_by(PolicyRow.version.desc()).limit(1)
    if version is not None:
        query = query.where(PolicyRow.version <= version)
    row = (await s.execute(query)).scalar_one_or_none()
    return None if row is None else _stored(row)


async def write(
    s: AsyncSession, version: int, new: PolicyText, source: PolicySource, actor: str,
    now: float, *, keep_api: bool,
) -> PolicyWrite:  # fmt: skip
    """Put ``new`` in force at ``version`` (taken by this transaction); :class:`Unchanged`
    when the same document from the same source is in force, or ``keep_api`` and the
    document in force was set through the API."""
    previous = await read(s)
    if previous is not None and (
        (previous.hash, previous.source) == (new.hash, source)
        or (keep_api and previous.source is PolicySource.API)
    ):
        raise Unchanged(PolicyWrite(previous))
    row = PolicyRow(version=version, hash=new.hash, format=new.format, source=source.value,
                    document=new.text, actor=actor[: audit.MAX_TEXT], at=now)  # fmt: skip
    s.add(row)
    await repl.record_change(s, version, repl.ChangeKind.POLICY, POLICY_CHANGE_ID, now)
    old_hash = "none" if previous is None else previous.hash
    detail = {"old_hash": old_hash, "new_hash": new.hash, "source": source.value,
              "version": str(version)}  # fmt: skip
    await audit.add(s, now, actor, ACTION, "policy", detail)
    return PolicyWrite(previous, _stored(row))
