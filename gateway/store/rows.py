"""Building device rows: the parts of enrollment shared by every path."""

from __future__ import annotations

import secrets
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import Select, select

from gateway.mapping.ipam import Allocation
from gateway.store.models import DeviceRow, IdentityRow
from gateway.store.records import EnrollRequest
from identity.enrollment import hash_secret
from wiregate.model import Identity

__all__ = ["Grant", "device_query", "in_list", "new_device"]


def in_list(values: Collection[str]) -> list[str]:
    """``values`` sorted, the last repeated up to a power of two: the values of an ``IN``
    of one of a few lengths. Each length is a statement of its own, which asyncpg
    prepares and every pooled connection keeps (SQLAlchemy's cache, 100 a connection):
    one per number of devices changed or streaming kept growing the replicas' memory
    in the soak."""
    padded = sorted(values)
    if padded:
        padded += padded[-1:] * ((1 << (len(padded) - 1).bit_length()) - len(padded))
    return padded


def device_query() -> Select[tuple[DeviceRow, str, str]]:
    """Devices joined with their identity's issuer and subject."""
    return select(DeviceRow, IdentityRow.issuer, IdentityRow.subject).join(
        IdentityRow, DeviceRow.identity_id == IdentityRow.id
    )


@dataclass(frozen=True, slots=True)
class Grant:
    """Who a new device belongs to and what it is given."""

    identity: Identity
    tags: tuple[str, ...]
    ephemeral: bool


def new_device(
    request: EnrollRequest, grant: Grant, allocation: Allocation, token: str, now: float
) -> DeviceRow:
    """A new device row (its ``identity_id`` is set by the caller)."""
    return DeviceRow(
        id="dev_" + secrets.token_hex(8),
        name=request.name,
        public_key=request.public_key,
        ip_index=allocation.index,
        ipv4=allocation.ipv4,
        ipv6=allocation.ipv6,
        tags=list(grant.tags),
        endpoints=list(request.endpoints),
        routes=list(request.routes),
        keepalive=request.keepalive,
        ephemeral=grant.ephemeral,
        token_hash=hash_secret(token),
        created_at=now,
        expires_at=None,
        last_seen=None,
    )
