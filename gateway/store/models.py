"""SQLAlchemy 2 declarative models of the gateway's store.

Portable types only (SQLite today, PostgreSQL for several replicas): times are
POSIX seconds in ``Float`` columns, lists are ``JSON``. The Alembic migrations in
``migrations/versions`` must describe exactly these tables (a test compares
them).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "AuditRow",
    "Base",
    "DeviceRow",
    "EndedSessionRow",
    "EnrollmentKeyRow",
    "IdentityRow",
    "KeyHistoryRow",
    "LeaseRow",
    "LoginRequestRow",
    "MapChangeRow",
    "MetaRow",
    "PathReportRow",
    "PodRow",
    "PolicyRow",
    "RateBucketRow",
    "RelayPairRow",
]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention (stable migrations)."""

    metadata = MetaData(naming_convention=NAMING)


class MetaRow(Base):
    """The single row (id = 1) of global state: map version, pools, IPAM cursor."""

    __tablename__ = "meta"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    map_version: Mapped[int] = mapped_column(BigInteger, nullable=False)
    ipv4_pool: Mapped[str] = mapped_column(String(64), nullable=False)
    ipv6_pool: Mapped[str] = mapped_column(String(64), nullable=False)
    ipam_cursor: Mapped[int] = mapped_column(Integer, nullable=False)
    # map_changes holds every change after this version (older ones are pruned)
    changes_floor: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")


class IdentityRow(Base):
    """An (issuer, subject) pair that owns devices."""

    __tablename__ = "identities"
    __table_args__ = (UniqueConstraint("issuer", "subject"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    issuer: Mapped[str] = mapped_column(String(512), nullable=False)
    subject: Mapped[str] = mapped_column(String(512), nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    disabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())
    # a person's verified email and display name, as the IdP said at their last web approval
    email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    name: Mapped[str | None] = mapped_column(String(255), nullable=True)


class DeviceRow(Base):
    """An enrolled device, its tunnel addresses and its credential hash."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # a DNS label, unique (see gateway.store.names)
    name: Mapped[str] = mapped_column(String(255), nullable=False, unique=True, index=True)
    public_key: Mapped[str] = mapped_column(String(44), nullable=False, unique=True)
    identity_id: Mapped[int] = mapped_column(
        ForeignKey("identities.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    ip_index: Mapped[int] = mapped_column(Integer, nullable=False, unique=True)
    ipv4: Mapped[str] = mapped_column(String(45), nullable=False, unique=True)
    ipv6: Mapped[str] = mapped_column(String(45), nullable=False, unique=True)
    tags: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    endpoints: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    routes: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    keepalive: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ephemeral: Mapped[bool] = mapped_column(Boolean, nullable=False)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    previous_public_key: Mapped[str | None] = mapped_column(String(44), nullable=True)
    key_rotated_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    nat_type: Mapped[str | None] = mapped_column(String(16), nullable=True)
    agent_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    agent_os: Mapped[str | None] = mapped_column(String(128), nullable=True)


class EnrollmentKeyRow(Base):
    """An enrollment key; only the SHA-256 of its secret is stored."""

    __tablename__ = "enrollment_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    tags: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    reusable: Mapped[bool] = mapped_column(Boolean, nullable=False)
    ephemeral: Mapped[bool] = mapped_column(Boolean, nullable=False)
    description: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False)
    used_count: Mapped[int] = mapped_column(Integer, nullable=False)
    revoked: Mapped[bool] = mapped_column(Boolean, nullable=False)
    device_key_expiry: Mapped[float | None] = mapped_column(Float, nullable=True)


class LoginRequestRow(Base):
    """A device login request; only the SHA-256 of its user code and poll token is stored."""

    __tablename__ = "login_requests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_code_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    poll_token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    public_key: Mapped[str] = mapped_column(String(44), nullable=False)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False)
    last_poll_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    interval: Mapped[int] = mapped_column(Integer, nullable=False)
    # SHA-256 of the client address (IPv4, an IPv6 /64) that asked: fair shares of the cap
    source: Mapped[str] = mapped_column(String(64), nullable=False, server_default="", index=True)
    approved_by_issuer: Mapped[str | None] = mapped_column(String(512), nullable=True)
    approved_by_subject: Mapped[str | None] = mapped_column(String(512), nullable=True)
    device_id: Mapped[str | None] = mapped_column(
        ForeignKey("devices.id", ondelete="SET NULL"), nullable=True
    )


class AuditRow(Base):
    """One audit record: who (actor) did what (action) to what (target), and when.

    ``detail`` is a flat object of strings; never a secret (see :mod:`gateway.store.audit`).
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, nullable=False, index=True)
    actor: Mapped[str] = mapped_column(String(1100), nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    target: Mapped[str] = mapped_column(String(1100), nullable=False)
    detail: Mapped[dict[str, str]] = mapped_column(JSON, nullable=False)


class MapChangeRow(Base):
    """What one map version changed, for replicas following each other's writes.

    Written in the transaction that took the version; ``kind`` is ``upsert`` (the
    device's current row is the change), ``remove`` (with the reason its agent is
    told), ``policy`` (the policy row of that version) or ``pods`` (the node's rows in
    ``pods``). Versions that changed no device (an identity enabled) have no row. Pruned
    to a window: a replica further behind reloads the whole map.
    """

    __tablename__ = "map_changes"

    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(8), nullable=False)
    device_id: Mapped[str] = mapped_column(String(32), nullable=False)
    reason: Mapped[str | None] = mapped_column(String(255), nullable=True)
    at: Mapped[float] = mapped_column(Float, nullable=False)


class LeaseRow(Base):
    """A named lease: a duty one replica runs at a time (the expiry sweeper) until
    ``expires_at`` unless it renews."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128), nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False)


class RelayPairRow(Base):
    """The relay a pair of devices shares (``device_a`` < ``device_b``), so both sides get
    the same relay whichever replica they ask."""

    __tablename__ = "relay_pairs"

    device_a: Mapped[str] = mapped_column(String(32), primary_key=True)
    device_b: Mapped[str] = mapped_column(String(32), primary_key=True)
    relay_id: Mapped[str] = mapped_column(String(64), nullable=False)
    used_at: Mapped[float] = mapped_column(Float, nullable=False)


class KeyHistoryRow(Base):
    """Every WireGuard public key any device ever had: none may be registered again."""

    __tablename__ = "key_history"

    public_key: Mapped[str] = mapped_column(String(44), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(32), nullable=False)
    first_used_at: Mapped[float] = mapped_column(Float, nullable=False)


class RateBucketRow(Base):
    """A token bucket every replica charges (login requests, user-code lookups).

    ``key`` is the bucket's name and the SHA-256 of whom it limits (an address, an
    identity); a row missing is a full bucket.
    """

    __tablename__ = "rate_buckets"

    key: Mapped[str] = mapped_column(String(96), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float, nullable=False)
    updated: Mapped[float] = mapped_column(Float, nullable=False, index=True)


class EndedSessionRow(Base):
    """A web session signed out before its expiry: refused by every replica until then."""

    __tablename__ = "ended_sessions"

    session_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False, index=True)


class PolicyRow(Base):
    """A policy document put in force at map version ``version`` (newest row: in force).

    ``source`` is ``api`` (set through the admin API; it wins over every replica's
    file until reset) or ``file`` (a replica's policy file, written when it changed).
    Rows are never changed: a replica applying version V reads the document V set.
    """

    __tablename__ = "policies"

    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)
    format: Mapped[str] = mapped_column(String(8), nullable=False)
    source: Mapped[str] = mapped_column(String(8), nullable=False)
    document: Mapped[str] = mapped_column(Text, nullable=False)
    actor: Mapped[str] = mapped_column(String(1100), nullable=False)
    at: Mapped[float] = mapped_column(Float, nullable=False)


class PathReportRow(Base):
    """What ``reporter`` last said of its path to ``peer`` (an agent's ``paths`` message,
    :mod:`wiregate.pathwire`): one row per pair, replaced by each report, gone with either
    device."""

    __tablename__ = "path_reports"

    reporter_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    peer_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    path_mtu: Mapped[int | None] = mapped_column(Integer, nullable=True)
    black_hole: Mapped[bool] = mapped_column(Boolean, nullable=False)
    frag_needed: Mapped[int] = mapped_column(BigInteger, nullable=False)
    probe_failures: Mapped[int] = mapped_column(BigInteger, nullable=False)
    path: Mapped[str] = mapped_column(String(16), nullable=False)
    relay_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(String(200), nullable=False)
    handshake_age: Mapped[float | None] = mapped_column(Float, nullable=True)
    rtt_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    reported_at: Mapped[float] = mapped_column(Float, nullable=False)


class PodRow(Base):
    """A pod its node reported (an agent's ``pods`` message, :mod:`wiregate.podwire`), as
    reported: the policy's check of its addresses is each broker's. Gone with the node."""

    __tablename__ = "pods"

    device_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    namespace: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    ips: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    service_account: Mapped[str] = mapped_column(String(253), nullable=False)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, nullable=False)
