"""Values the store returns and accepts (frozen, slotted), and row conversions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.store.models import DeviceRow, EnrollmentKeyRow, LoginRequestRow
from identity.enrollment import KeyState
from identity.policy import GROUP_PREFIX
from wiregate.model import Device, Identity

__all__ = [
    "ADMIN_ISSUER",
    "ENROLLMENT_ISSUER",
    "NO_EXPIRY",
    "DeviceRecord",
    "EnrollRequest",
    "Enrolled",
    "KeyRecord",
    "KeySpec",
    "LoginApproved",
    "LoginCreated",
    "LoginPoll",
    "LoginRecord",
    "Removal",
    "device_record",
    "key_record",
    "key_state",
    "login_record",
]

ENROLLMENT_ISSUER = "wiregate:enrollment-key"
ADMIN_ISSUER = "wiregate:admin"  # devices an administrator approved under a name


def NO_EXPIRY(_identity: Identity, _tags: Sequence[str]) -> float | None:
    """The default key lifetime: keys never expire."""
    return None


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A device plus what only the control plane cares about."""

    device: Device
    last_seen: float | None = None
    ephemeral: bool = False
    previous_public_key: str | None = None
    key_rotated_at: float | None = None
    agent_version: str | None = None  # as its agent last said (not part of the map)
    agent_os: str | None = None


@dataclass(frozen=True, slots=True)
class Removal:
    """A device the store deleted, at which map version, and why (the agent is told)."""

    device_id: str
    version: int
    reason: str


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An enrollment key as an administrator sees it (never its secret)."""

    id: str
    tags: tuple[str, ...]
    reusable: bool
    ephemeral: bool
    description: str
    created_at: float
    expires_at: float
    used_count: int
    revoked: bool
    device_key_expiry: float | None = None


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What an administrator asks for when creating an enrollment key."""

    tags: tuple[str, ...] = ()
    expiry: float = 3600.0
    reusable: bool = False
    ephemeral: bool = False
    description: str = ""
    device_key_expiry: float | None = None  # lifetime of the keys of devices it enrolls


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    """A validated enrollment: canonical public key, name, endpoints and routes."""

    public_key: str
    name: str
    endpoints: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    keepalive: int | None = None


@dataclass(frozen=True, slots=True)
class Enrolled:
    """The result of an enrollment: the device, its one-time-shown token, the map version."""

    record: DeviceRecord
    token: str
    version: int


@dataclass(frozen=True, slots=True)
class LoginRecord:
    """A login request as the approver sees it: the device's name and key fingerprint."""

    id: str
    name: str
    public_key: str
    fingerprint: str
    status: str
    created_at: float
    expires_at: float
    device_id: str | None = None


@dataclass(frozen=True, slots=True)
class LoginCreated:
    """A new login request with its user code (canonical form) and poll token, shown once."""

    record: LoginRecord
    user_code: str
    poll_token: str
    interval: int


@dataclass(frozen=True, slots=True)
class LoginApproved:
    """The device an approval enrolled and the map version it produced (no token)."""

    login: LoginRecord
    record: DeviceRecord
    version: int


@dataclass(frozen=True, slots=True)
class LoginPoll:
    """A poll's answer; ``record`` and ``token`` only with ``approved``, only once."""

    status: str
    interval: int
    record: DeviceRecord | None = None
    token: str | None = None


def login_record(row: LoginRequestRow) -> LoginRecord:
    """Convert a login request row to a value (the hashes stay behind)."""
    return LoginRecord(
        id=row.id,
        name=row.name,
        public_key=row.public_key,
        fingerprint=row.fingerprint,
        status=row.status,
        created_at=row.created_at,
        expires_at=row.expires_at,
        device_id=row.device_id,
    )


def device_record(row: DeviceRow, identity: Identity) -> DeviceRecord:
    """Convert a device row (and its identity) to a value."""
    device = Device(
        id=row.id,
        name=row.name,
        public_key=row.public_key,
        identity=identity,
        ipv4=row.ipv4,
        ipv6=row.ipv6,
        tags=tuple(t for t in row.tags if not t.startswith(GROUP_PREFIX)),
        endpoints=tuple(row.endpoints),
        routes=tuple(row.routes),
        keepalive=row.keepalive,
        created_at=row.created_at,
        expires_at=row.expires_at,
        previous_public_key=row.previous_public_key,
        nat=row.nat_type,
        # group memberships granted at enrollment share the tag column: "group:NAME"
        groups=tuple(t[len(GROUP_PREFIX) :] for t in row.tags if t.startswith(GROUP_PREFIX)),
    )
    return DeviceRecord(
        device,
        row.last_seen,
        row.ephemeral,
        row.previous_public_key,
        row.key_rotated_at,
        row.agent_version,
        row.agent_os,
    )


def key_record(row: EnrollmentKeyRow) -> KeyRecord:
    """Convert an enrollment key row to a value (the hash stays behind)."""
    return KeyRecord(
        id=row.id,
        tags=tuple(row.tags),
        reusable=row.reusable,
        ephemeral=row.ephemeral,
        description=row.description,
        created_at=row.created_at,
        expires_at=row.expires_at,
        used_count=row.used_count,
        revoked=row.revoked,
        device_key_expiry=row.device_key_expiry,
    )


def key_state(row: EnrollmentKeyRow) -> KeyState:
    """What :func:`identity.enrollment.check_usable` needs from a key row."""
    return KeyState(row.expires_at, row.reusable, row.used_count, row.revoked)
