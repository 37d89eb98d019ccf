"""The async Store: every read and write of the gateway's durable state.

Each mutation that changes the network map bumps ``meta.map_version`` in the
same transaction, *as its first statement*: that UPDATE takes the write lock
(SQLite's RESERVED lock, a row lock on PostgreSQL), so map-changing
transactions are serialized across processes and replicas, and the version
returned is the one this change produced. Within one process an asyncio lock
also orders writers. Callers hand a change to the broker after its commit, so
concurrent callers may hand theirs over out of version order; the broker puts
them back in order (see :mod:`gateway.mapping.broker`).

Any error rolls the whole transaction back: a refused request changes nothing.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace

from sqlalchemy import ColumnElement, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.mapping.ipam import Allocation, Pool, allocate
from gateway.store import audit, lifecycle, limits, logins, names, pathreports, pods, policies
from gateway.store import replication as repl
from gateway.store.audit import AuditRecord, device_actor, oidc_actor, system_actor
from gateway.store.batch import GroupCommit, execute_at_commit
from gateway.store.engine import create_engine
from gateway.store.lifecycle import IdentityRecord, KeyLifetime
from gateway.store.migrate import current_revision, head_revision, upgrade
from gateway.store.models import DeviceRow, EnrollmentKeyRow, IdentityRow, MetaRow
from gateway.store.policies import PolicySource, PolicyText, PolicyWrite, StoredPolicy
from gateway.store.records import (
    ENROLLMENT_ISSUER,
    NO_EXPIRY,
    DeviceRecord,
    Enrolled,
    EnrollRequest,
    KeyRecord,
    KeySpec,
    LoginApproved,
    LoginCreated,
    LoginPoll,
    LoginRecord,
    Removal,
    device_record,
    key_record,
    key_state,
    login_record,
)
from gateway.store.replication import ChangeKind, ChangeRow
from gateway.store.rows import Grant, device_query, in_list, new_device
from identity.device_login import Event, decide_poll, normalize_user_code
from identity.enrollment import (
    KEY_PREFIX,
    check_usable,
    generate_device_token,
    generate_secret,
    hash_secret,
    secret_matches,
)
from identity.policy import GROUP_PREFIX
from wiregate.clock import Clock
from wiregate.errors import ConfigError, Conflict, NotFound, Unauthorized
from wiregate.keys import parse_public_key
from wiregate.logging import get_logger
from wiregate.model import Identity
from wiregate.pathwire import PathEntry
from wiregate.podwire import Pod, PodReport

__all__ = ["DEFAULT_POOL", "MIN_ROTATION_INTERVAL", "UNATTRIBUTED", "Store"]

DEFAULT_POOL = Pool.parse("100.64.0.0/16", "fd7a:7767:6174::/64")
_log = get_logger("gateway.store")
UNATTRIBUTED = "system:unattributed"  # a caller that did not say who acted
_MIGRATE = 0x77676D69  # PostgreSQL advisory lock key held while migrating
UPSERT, REMOVE, PODS = ChangeKind.UPSERT, ChangeKind.REMOVE, ChangeKind.PODS
DELETED = "device removed"  # what an agent is told when an admin deletes its device
EXPIRED = "key expired"  # ... when its key expired (or an admin expired it)
MIN_ROTATION_INTERVAL = 5.0  # seconds between two key rotations of one device
_ALLOCATION_WINDOW = 256  # addresses after the IPAM cursor read to find a free one
_CURSOR = "wiregate.ipam_cursor"  # Session.info: the IPAM cursor this transaction moved to
RETRY_WINDOW = 600.0  # seconds during which a lost enrollment answer may be asked again


class Store:
    """Async access to devices, identities, enrollment keys and the map version."""

    def __init__(self, engine: AsyncEngine, pool: Pool, clock: Clock) -> None:
        """Wrap an engine whose database is migrated; use :meth:`open` instead."""
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._pool = pool
        self._clock = clock
        self._lock = asyncio.Lock()
        self._grouped = GroupCommit(self._write)  # enrollments: one fsync for many
        self._key_lifetime: KeyLifetime = NO_EXPIRY

    def set_key_lifetime(self, lifetime: KeyLifetime) -> None:
        """How long new devices' keys live (by identity, tags); see :mod:`gateway.lifecycle.expiry`.

        An enrollment key's own ``device_key_expiry`` takes precedence for the
        devices it enrolls.
        """
        self._key_lifetime = lifetime

    @classmethod
    async def open(cls, url: str, *, pool: Pool = DEFAULT_POOL, clock: Clock = time.time) -> Store:
        """Open the database at ``url``, migrate it to head and check the pools."""
        engine = create_engine(url)
        try:
            async with engine.begin() as conn:
                if engine.dialect.name == "postgresql":  # replicas starting together
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE})
                await conn.run_sync(upgrade)
            store = cls(engine, pool, clock)
            await store._init_meta()
        except BaseException:
            await engine.dispose()
            raise
        _log.info("store_opened", dialect=engine.dialect.name, pool=str(pool.ipv4))
        return store

    async def close(self) -> None:
        """Release every connection."""
        await self._engine.dispose()

    # -- reads ---------------------------------------------------------------

    async def ready(self) -> bool:
        """Whether the database answers and its schema is at the newest migration."""
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            revision = await conn.run_sync(current_revision)
        return revision == head_revision()

    async def map_version(self) -> int:
        """The current network map version."""
        async with self._sessions() as s:
            return (await s.execute(select(MetaRow.map_version))).scalar_one()

    async def list_devices(self) -> list[DeviceRecord]:
        """Every device, oldest first."""
        async with self._sessions() as s:
            rows = await s.execute(device_query().order_by(DeviceRow.created_at, DeviceRow.id))
            return [device_record(d, Identity(iss, sub)) for d, iss, sub in rows.tuples()]

    async def devices_of(self, identity: Identity) -> list[DeviceRecord]:
        """The devices enrolled for ``identity`` (issuer and subject), oldest first."""
        query = device_query().where(
            IdentityRow.issuer == identity.issuer, IdentityRow.subject == identity.subject
        )
        async with self._sessions() as s:
            rows = await s.execute(query.order_by(DeviceRow.created_at, DeviceRow.id))
            return [device_record(d, identity) for d, _iss, _sub in rows.tuples()]

    async def get_device(self, device_id: str) -> DeviceRecord:
        """One device, or :class:`NotFound`."""
        return await self._one_device(DeviceRow.id == device_id)

    async def device_by_token(self, token: str) -> DeviceRecord:
        """The device a stream token belongs to, or :class:`Unauthorized`."""
        try:
            record = await self._one_device(DeviceRow.token_hash == hash_secret(token))
        except NotFound:
            raise Unauthorized("device token is not valid", code="invalid_token") from None
        return record

    async def list_keys(self) -> list[KeyRecord]:
        """Every enrollment key (revoked ones too), oldest first."""
        query = select(EnrollmentKeyRow).order_by(EnrollmentKeyRow.created_at, EnrollmentKeyRow.id)
        async with self._sessions() as s:
            return [key_record(row) for row in (await s.execute(query)).scalars()]

    async def list_audit(self, since: float | None = None, limit: int = 100) -> list[AuditRecord]:
        """Audit records at or after ``since`` (POSIX seconds), newest first."""
        async with self._sessions() as s:
            return await audit.query(s, since, limit)

    async def audit_between(self, since: float, until: float, limit: int) -> list[AuditRecord]:
        """Audit records with ``since <= at <= until``, oldest first, at most ``limit``."""
        async with self._sessions() as s:
            return await audit.between(s, since, until, limit)

    async def removed_devices(self, since: float) -> list[tuple[str, float]]:
        """``(device id, when)`` of the devices removed at or after ``since`` (deleted,
        disabled, expired, replaced), oldest first: what relays must stop admitting."""
        async with self._sessions() as s:
            return await audit.removed_devices(s, since)

    # -- map-changing writes ---------------------------------------------------

    async def enroll(self, secret: str, request: EnrollRequest) -> Enrolled:
        """Consume an enrollment key and create a device with fresh addresses and token.

        Raises :class:`Unauthorized` for an unusable key (always the same
        message), :class:`Conflict` for a duplicate public key or a full pool.
        """
        now = self._clock()
        token = generate_device_token()

        async def work(s: AsyncSession) -> Enrolled:
            found = await self._key_for(s, secret)
            if found is not None:
                retried = await self._retried_enrollment(s, found, request, token, now)
                if retried is not None:
                    return retried
            version, cursor = await self._bump_for_device(s)
            key = await self._consume_key(s, found, now)
            identity = Identity(ENROLLMENT_ISSUER, key.id)
            grant = Grant(identity, tuple(key.tags), key.ephemeral)
            identity_id = await lifecycle.identity_for_new_device(s, identity, now)
            row = await self._add_device(s, request, grant, (token, now), (identity_id, cursor))
            if key.device_key_expiry is not None:
                row.expires_at = now + key.device_key_expiry
            detail = {"key_id": key.id, "name": row.name, "public_key": row.public_key}
            await audit.add(s, now, device_actor(row.id), "device.enroll", row.id, detail)
            await repl.record_change(s, version, UPSERT, row.id, now)
            return Enrolled(device_record(row, identity), token, version)

        enrolled = await self._grouped.run(work)  # shares a commit with concurrent ones
        device = enrolled.record.device
        _log.info("device_enrolled", device_id=device.id, key_id=device.identity.subject,
                  version=enrolled.version)  # fmt: skip
        return enrolled

    async def enroll_identity(
        self,
        identity: Identity,
        tags: Sequence[str],
        request: EnrollRequest,
        *,
        actor: str,
        detail: Mapping[str, str],
    ) -> tuple[Enrolled, Removal | None]:
        """Enroll a device for a verified (workload) ``identity``.

        A device of the *same* identity with the same name is replaced (a node
        re-enrolling after a reinstall): removed at one map version, the new
        device added at the next, both audited. Returns the enrollment and the
        replaced device's removal, if any.
        """
        now = self._clock()
        token = generate_device_token()

        async def work(s: AsyncSession) -> tuple[Enrolled, Removal | None]:
            removed = None
            label = names.to_label(request.name)
            identity_id, old = await lifecycle.claim_identity(s, identity, label, now)
            if old is not None:
                removed = Removal(old.id, await self._bump(s), "replaced by a re-enrollment")
                await repl.record_change(s, removed.version, REMOVE, old.id, now, removed.reason)
                await s.delete(old)
                await s.flush()
                await audit.add(s, now, actor, "device.replace", old.id,
                                {"name": old.name, "public_key": old.public_key})  # fmt: skip
            version, cursor = await self._bump_for_device(s)
            grant = Grant(identity, tuple(dict.fromkeys(tags)), False)
            row = await self._add_device(s, request, grant, (token, now), (identity_id, cursor))
            await audit.add(s, now, actor, "device.enroll", row.id,
                            {**detail, "name": row.name, "public_key": row.public_key,
                             "tags": ",".join(grant.tags)})  # fmt: skip
            await repl.record_change(s, version, UPSERT, row.id, now)
            return Enrolled(device_record(row, identity), token, version), removed

        enrolled, removed = await self._grouped.run(work)  # shares a commit with others
        _log.info("device_enrolled", device_id=enrolled.record.device.id,
                  issuer=identity.issuer, version=enrolled.version)  # fmt: skip
        return enrolled, removed

    async def _retried_enrollment(
        self, s: AsyncSession, key: EnrollmentKeyRow, request: EnrollRequest, token: str,
        now: float,
    ) -> Enrolled | None:  # fmt: skip
        """The same enrollment again (its answer was lost: a timeout, a gateway killed
        between commit and reply): the device this key enrolled with this public key
        moments ago and that never connected gets a new token (the lost one stops
        working) instead of a refusal; the key is not used again, the map is unchanged.
        """
        if key.revoked:
            return None
        query = device_query().where(
            DeviceRow.public_key == request.public_key,
            DeviceRow.last_seen.is_(None),
            DeviceRow.created_at >= now - RETRY_WINDOW,
            IdentityRow.issuer == ENROLLMENT_ISSUER,
            IdentityRow.subject == key.id,
        )
        found = (await s.execute(query)).tuples().first()
        if found is None or not names.given_for(found[0].name, names.to_label(request.name)):
            return None
        row, issuer, subject = found
        row.token_hash = hash_secret(token)
        await audit.add(s, now, device_actor(row.id), "device.enroll_retry", row.id,
                        {"key_id": key.id, "name": row.name})  # fmt: skip
        version = (await s.execute(select(MetaRow.map_version))).scalar_one()
        _log.info("device_enroll_retried", device_id=row.id, key_id=key.id)
        return Enrolled(device_record(row, Identity(issuer, subject)), token, version)

    async def delete_device(self, device_id: str, *, actor: str = UNATTRIBUTED) -> int:
        """Delete a device (its addresses return to the pool); the new map version."""
        async with self._write() as s:
            version = await self._bump(s)
            row = await s.get(DeviceRow, device_id)
            if row is None:
                raise NotFound(f"no device {device_id!r}")
            await s.delete(row)
            await audit.add(s, self._clock(), actor, "device.delete", device_id,
                            {"name": row.name, "public_key": row.public_key})  # fmt: skip
            await repl.record_change(s, version, REMOVE, device_id, self._clock(), DELETED)
        _log.info("device_deleted", device_id=device_id, version=version)
        return version

    async def set_endpoints(
        self,
        device_id: str,
        endpoints: Sequence[str],
        nat: str | None = None,
        routes: Sequence[str] | None = None,
        agent: tuple[str, str] | None = None,
    ) -> tuple[DeviceRecord, int] | None:
        """Record a device's endpoint candidates, NAT type (None: keep the one known) and
        advertised routes (None: keep them; a change is audited ``device.routes``), at
        one map version; None if none of them changed. ``agent``, its agent's version and
        operating system (None: keep them), is not part of the map: a change of it alone
        is written with no version bump."""
        current = await self.get_device(device_id)
        nat = nat or current.device.nat
        routes = current.device.routes if routes is None else tuple(routes)
        device = current.device
        if agent is not None and agent != (current.agent_version, current.agent_os):
            async with self._write() as s:
                stmt = update(DeviceRow).where(DeviceRow.id == device_id)
                await s.execute(stmt.values(agent_version=agent[0], agent_os=agent[1]))
        if (device.endpoints, device.nat, device.routes) == (tuple(endpoints), nat, routes):
            return None
        async with self._write() as s:
            version = await self._bump(s)
            row = await s.get(DeviceRow, device_id)
            if row is None:
                raise NotFound(f"no device {device_id!r}")
            row.endpoints = list(endpoints)
            row.nat_type = nat
            if routes != device.routes:
                row.routes = list(routes)
                detail = {"from": " ".join(device.routes), "to": " ".join(routes)}
                actor = device_actor(device_id)
                await audit.add(s, self._clock(), actor, "device.routes", device_id, detail)
            await repl.record_change(s, version, UPSERT, device_id, self._clock())
        return await self.get_device(device_id), version

    async def rename_device(
        self, device_id: str, name: str, *, actor: str = UNATTRIBUTED
    ) -> tuple[DeviceRecord, int]:
        """Rename a device (see :meth:`update_device`)."""
        return await self.update_device(device_id, name=name, actor=actor)

    async def update_device(
        self,
        device_id: str,
        *,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        actor: str = UNATTRIBUTED,
    ) -> tuple[DeviceRecord, int]:
        """Rename a device and/or set its tags, at one map version (peers see both: the
        name in their maps, the tags through the policy, so peers may be gained or lost).

        ``name`` must be a DNS label no other device has (:class:`BadInput`,
        :class:`~gateway.store.names.NameTaken`); ``tags`` replace the device's tags
        (its policy groups stay). Each change is audited (``device.rename``,
        ``device.tags``).
        """
        if name is not None:
            names.check_label(name)
        now = self._clock()
        async with self._write() as s:
            version = await self._bump(s)
            row = await s.get(DeviceRow, device_id, populate_existing=True)
            if row is None:
                raise NotFound(f"no device {device_id!r}")
            if name is not None and name != row.name:
                await names.refuse_taken(s, name, device_id)
                await audit.add(s, now, actor, "device.rename", device_id,
                                {"from": row.name, "to": name})  # fmt: skip
                row.name = name
            if tags is not None:
                kept = [t for t in row.tags if t.startswith(GROUP_PREFIX)]
                new_tags = list(dict.fromkeys(tags))
                await audit.add(s, now, actor, "device.tags", device_id,
                                {"from": ",".join(t for t in row.tags if t not in kept),
                                 "to": ",".join(new_tags)})  # fmt: skip
                row.tags = new_tags + kept
            await repl.record_change(s, version, UPSERT, device_id, now)
        _log.info("device_updated", device_id=device_id, version=version)
        return await self.get_device(device_id), version

    async def expire_device(self, device_id: str, *, actor: str = UNATTRIBUTED) -> Removal:
        """Expire a device's key now: it is removed as the expiry sweep removes an expired
        key (peers drop it, its agent is told "key expired"), audited ``device.expire``."""
        async with self._write() as s:
            version = await self._bump(s)
            row = await s.get(DeviceRow, device_id)
            if row is None:
                raise NotFound(f"no device {device_id!r}")
            await audit.add(s, self._clock(), actor, "device.expire", device_id,
                            {"name": row.name, "public_key": row.public_key})  # fmt: skip
            removed = await self._remove(s, [device_id], [version], actor, EXPIRED)
        return removed[0]

    # -- other writes ------------------------------------------------------------

    async def touch(self, device_id: str) -> None:
        """Set a device's ``last_seen`` to now (not part of the map: no version bump)."""
        async with self._write() as s:
            stmt = update(DeviceRow).where(DeviceRow.id == device_id)
            await s.execute(stmt.values(last_seen=self._clock()))

    async def record_audit(
        self, actor: str, action: str, target: str, detail: Mapping[str, str]
    ) -> None:
        """Record an audit event on its own (changes the store makes record themselves)."""
        async with self._write() as s:
            await audit.add(s, self._clock(), actor, action, target, detail)

    async def create_key(
        self, spec: KeySpec, *, actor: str = UNATTRIBUTED
    ) -> tuple[KeyRecord, str]:
        """Create an enrollment key; returns it with its secret (shown only once)."""
        secret, now = generate_secret(), self._clock()
        row = EnrollmentKeyRow(
            id="key_" + secrets.token_hex(8),
            secret_hash=hash_secret(secret),
            tags=list(spec.tags),
            reusable=spec.reusable,
            ephemeral=spec.ephemeral,
            description=spec.description,
            created_at=now,
            expires_at=now + spec.expiry,
            used_count=0,
            revoked=False,
            device_key_expiry=spec.device_key_expiry,
        )
        detail = {"tags": ",".join(spec.tags), "reusable": str(spec.reusable),
                  "ephemeral": str(spec.ephemeral)}  # fmt: skip
        async with self._write() as s:
            s.add(row)
            await audit.add(s, now, actor, "key.create", row.id, detail)
        _log.info("enrollment_key_created", key_id=row.id, tags=list(spec.tags))
        return key_record(row), secret

    async def revoke_key(self, key_id: str, *, actor: str = UNATTRIBUTED) -> None:
        """Revoke an enrollment key (devices it enrolled stay)."""
        async with self._write() as s:
            stmt = update(EnrollmentKeyRow).where(EnrollmentKeyRow.id == key_id)
            done = await s.execute(stmt.values(revoked=True).returning(EnrollmentKeyRow.id))
            if done.scalar_one_or_none() is None:
                raise NotFound(f"no enrollment key {key_id!r}")
            await audit.add(s, self._clock(), actor, "key.revoke", key_id)
        _log.info("enrollment_key_revoked", key_id=key_id)

    # -- device login ------------------------------------------------------------

    async def create_login_request(
        self, public_key: str, name: str, now: float, *, source: str = ""
    ) -> LoginCreated:
        """A pending login request for ``public_key`` from ``source`` (an address); its
        user code and poll token, once.

        :class:`BadKey` for an unusable key, :class:`Conflict` when a device has or
        had it, :class:`~gateway.store.limits.RateLimited` (429) past the source's
        fair share of waiting requests (see :func:`gateway.store.logins.make_room`).
        """
        key = parse_public_key(public_key)
        for attempt in range(3):
            try:
                async with self._write() as s:
                    await limits.refuse_used_key(s, key)
                    await logins.make_room(s, now, source)
                    created = await logins.insert(s, key, name, now, source)
                break
            except Conflict as exc:  # a user code collided with an older one: draw again
                if exc.code != Conflict.code or attempt == 2:
                    raise
        _log.info("login_request_created", request_id=created.record.id,
                  fingerprint=created.record.fingerprint)  # fmt: skip
        return created

    async def pending_login_requests(self, now: float) -> list[LoginRecord]:
        """Every login request waiting for approval at ``now``, oldest first (no codes:
        only their hashes are stored)."""
        async with self._sessions() as s:
            return [login_record(row) for row in await logins.pending(s, now)]

    async def find_login_request(self, user_code: str, now: float) -> LoginRecord:
        """The pending request a person's typed code names (name, fingerprint), or NotFound."""
        code = normalize_user_code(user_code)
        async with self._sessions() as s:
            return login_record(await logins.by_user_code(s, code, now))

    async def approve_login_request(
        self,
        request_id: str,
        identity: Identity,
        tags: Sequence[str],
        now: float,
        *,
        keepalive: int | None = None,
        actor: str | None = None,
        approver: Identity | None = None,
    ) -> LoginApproved:
        """Approve a pending request: enroll its device for ``identity``, exactly once.

        ``actor`` is who approved (default: ``identity`` itself, signed in with OIDC);
        ``approver`` the identity the request records as its approver (default:
        ``identity``; an administrator approving under a name of their own).
        """
        by = approver if approver is not None else identity
        async with self._write() as s:
            version, cursor = await self._bump_for_device(s)
            row = await logins.advance(s, request_id, Event.APPROVE, now,
                                       approved_by_issuer=by.issuer,
                                       approved_by_subject=by.subject)  # fmt: skip
            request = EnrollRequest(row.public_key, row.name, keepalive=keepalive)
            grant = Grant(identity, tuple(dict.fromkeys(tags)), False)
            identity_id = await lifecycle.identity_for_new_device(s, identity, now)
            device = await self._add_device(s, request, grant, (generate_device_token(), now),
                                            (identity_id, cursor))  # fmt: skip
            row.device_id = device.id
            await audit.add(s, now, actor or oidc_actor(identity), "login.approve", request_id,
                            {"device_id": device.id, "issuer": identity.issuer,
                             "subject": identity.subject, "tags": ",".join(grant.tags),
                             "fingerprint": row.fingerprint})  # fmt: skip
            await repl.record_change(s, version, UPSERT, device.id, now)
        _log.info("login_request_approved", request_id=request_id, device_id=device.id,
                  issuer=identity.issuer, version=version)  # fmt: skip
        return LoginApproved(login_record(row), device_record(device, identity), version)

    async def deny_login_request(
        self, request_id: str, now: float, *, actor: str = UNATTRIBUTED
    ) -> LoginRecord:
        """Deny a pending request; its device will be told ``denied``."""
        async with self._write() as s:
            row = await logins.advance(s, request_id, Event.DENY, now)
            await audit.add(s, now, actor, "login.deny", request_id,
                            {"name": row.name, "fingerprint": row.fingerprint})  # fmt: skip
        _log.info("login_request_denied", request_id=request_id)
        return login_record(row)

    async def poll_login_request(self, poll_token: str, now: float) -> LoginPoll:
        """The device's poll: pending, slow_down, approved (device and token, once), ..."""
        token = generate_device_token()
        async with self._write() as s:
            row = await logins.by_poll_token(s, poll_token)
            if row is None:
                raise Unauthorized("the poll token is not valid", code="invalid_poll_token")
            decision = decide_poll(logins.poll_state(row), now)
            if not await logins.record_poll(s, row, decision, now):
                return LoginPoll("slow_down", decision.interval)
            if decision.reported != "approved":
                return LoginPoll(decision.reported, decision.interval)
            if not await logins.rotate_device_token(s, row.device_id, token):
                return LoginPoll("expired", decision.interval)
            await audit.add(s, now, device_actor(str(row.device_id)), "device.enroll",
                            str(row.device_id), {"login_request": row.id})  # fmt: skip
        _log.info("login_request_consumed", request_id=row.id, device_id=row.device_id)
        record = await self.get_device(str(row.device_id))
        return LoginPoll("approved", decision.interval, record, token)

    # -- identities, expiry, ephemeral devices, rotation -----------------------------

    async def list_identities(self) -> list[IdentityRecord]:
        """Every identity with its device count and whether it is disabled."""
        async with self._sessions() as s:
            return await lifecycle.list_identities(s)

    async def get_identity(self, ref: int | Identity) -> IdentityRecord:
        """One identity by id or (issuer, subject), or :class:`NotFound`."""
        async with self._sessions() as s:
            row = await lifecycle.find_identity(s, ref)
            devices = len(await lifecycle.identity_devices(s, row.id))
        return lifecycle.identity_record(row, devices)

    async def set_identity_profile(
        self, identity: Identity, email: str | None, name: str | None
    ) -> None:
        """Record a person's verified email and display name on their identity (not part
        of the map, not audited: what their IdP said at their last web approval)."""
        async with self._write() as s:
            stmt = update(IdentityRow).where(
                IdentityRow.issuer == identity.issuer, IdentityRow.subject == identity.subject
            )
            await s.execute(stmt.values(email=email and email[:320], name=name and name[:255]))

    async def revoke_identity(self, ref: int | Identity, *, actor: str) -> list[Removal]:
        """Delete every device of an identity (by id or (issuer, subject))."""
        return await self._identity_change(ref, None, actor)

    async def set_identity_disabled(
        self, ref: int | Identity, disabled: bool, *, actor: str
    ) -> list[Removal]:
        """Disable an identity (its devices are deleted, none may be added) or enable it."""
        return await self._identity_change(ref, disabled, actor)

    async def _identity_change(
        self, ref: int | Identity, disabled: bool | None, actor: str
    ) -> list[Removal]:
        action = {None: "identity.revoke", True: "identity.disable", False: "identity.enable"}
        reason = "identity disabled" if disabled else "identity revoked"
        async with self._write() as s:
            versions = [await self._bump(s)]  # first: takes the write lock
            row = await lifecycle.find_identity(s, ref)
            owned = [d.id for d in await lifecycle.identity_devices(s, row.id)]
            ids = [] if disabled is False else owned  # enabling removes nothing
            versions += [await self._bump(s) for _ in ids[1:]]
            if disabled is not None:
                row.disabled = disabled
            detail = {"issuer": row.issuer, "subject": row.subject, "devices": str(len(ids))}
            await audit.add(s, self._clock(), actor, action[disabled], str(row.id), detail)
            return await self._remove(s, ids, versions[: len(ids)], actor, reason)

    async def expire_devices(self, now: float) -> list[Removal]:
        """Delete the devices whose key has expired at ``now``."""
        async with self._sessions() as s:
            ids = [row.id for row in await lifecycle.expired(s, now)]
        return await self._sweep(ids, system_actor("expiry"), EXPIRED)

    async def sweep_ephemeral(
        self, now: float, away: float, connected: Collection[str]
    ) -> list[Removal]:
        """Delete ephemeral devices away from their stream for ``away`` s or more."""
        async with self._sessions() as s:
            ids = [r.id for r in await lifecycle.ephemeral_gone(s, now, away, connected)]
        return await self._sweep(ids, system_actor("ephemeral"), "ephemeral device gone")

    async def sweep_abandoned_logins(self, now: float) -> list[Removal]:
        """Delete devices of approved logins whose token was never collected in time."""
        async with self._sessions() as s:
            ids = [d.id for _, d in await lifecycle.abandoned_logins(s, now)]
        return await self._sweep(ids, system_actor("login-expiry"), "login never completed")

    async def _sweep(self, ids: list[str], actor: str, reason: str) -> list[Removal]:
        if not ids:
            return []
        async with self._write() as s:
            versions = [await self._bump(s) for _ in ids]
            return await self._remove(s, ids, versions, actor, reason)

    async def _remove(
        self, s: AsyncSession, ids: list[str], versions: list[int], actor: str, reason: str
    ) -> list[Removal]:
        """Delete the devices still there, each at its own version (audited)."""
        removed = []
        for device_id, version in zip(ids, versions, strict=True):
            row = await s.get(DeviceRow, device_id)
            if row is None:
                continue
            await s.delete(row)
            detail = {"name": row.name, "public_key": row.public_key, "reason": reason}
            await audit.add(s, self._clock(), actor, "device.delete", device_id, detail)
            await repl.record_change(s, version, REMOVE, device_id, self._clock(), reason)
            removed.append(Removal(device_id, version, reason))
        _log.info("devices_removed", actor=actor, reason=reason, devices=len(removed))
        return removed

    async def rotate_key(self, device_id: str, public_key: str) -> tuple[DeviceRecord, int]:
        """Replace a device's key by its next one (same addresses); the new map version.

        The previous key is kept (``previous_public_key``); no key any device ever
        had may be registered again (``key_history``). The key's lifetime restarts.
        :class:`Conflict` for a key used before or a rotation within
        :data:`MIN_ROTATION_INTERVAL` of the last.
        """
        key, now = parse_public_key(public_key), self._clock()
        async with self._write() as s:
            version = await self._bump(s)
            row = await s.get(DeviceRow, device_id, populate_existing=True)
            if row is None:
                raise NotFound(f"no device {device_id!r}")
            if row.key_rotated_at is not None and now - row.key_rotated_at < MIN_ROTATION_INTERVAL:
                raise Conflict("this device rotated its key moments ago", code="rotated_recently")
            await limits.record_key(s, key, device_id, now)
            old = row.public_key
            row.previous_public_key, row.public_key = old, key
            row.expires_at, row.key_rotated_at = lifecycle.renewed_expiry(row, now), now
            detail = {"previous_public_key": old, "public_key": key}
            await audit.add(s, now, device_actor(device_id), "device.rotate", device_id, detail)
            await repl.record_change(s, version, UPSERT, device_id, now)
        _log.info("device_key_rotated", device_id=device_id, version=version)
        return await self.get_device(device_id), version

    # -- abuse limits shared by replicas (see gateway.store.limits) -------------------

    async def charge(self, charges: Sequence[tuple[limits.Bucket, str]]) -> None:
        """Spend a token of each (bucket, who) at once, or none and raise its 429."""
        async with self._write() as s:
            await limits.take_all(s, charges, self._clock())

    async def end_session(self, session_id: str, expires_at: float) -> None:
        """Refuse the web session ``session_id`` on every replica until ``expires_at``."""
        async with self._write() as s:
            await limits.end_session(s, session_id, expires_at, self._clock())

    async def session_ended(self, session_id: str) -> bool:
        """Whether the web session ``session_id`` was signed out."""
        async with self._sessions() as s:
            return await limits.session_ended(s, session_id)

    # -- the policy in force (see gateway.store.policies) ------------------------------

    async def policy(self, version: int | None = None) -> StoredPolicy | None:
        """The policy document in force at map ``version`` (None: now), if one was stored."""
        async with self._sessions() as s:
            return await policies.read(s, version)

    async def set_policy(
        self, new: PolicyText, source: PolicySource, *, actor: str, keep_api: bool = False
    ) -> PolicyWrite:
        """Put ``new`` in force at the next map version (audited, in the change feed);
        nothing is written when it is in force already, or with ``keep_api`` when the
        document in force was set through the API."""
        try:
            async with self._write() as s:
                version = await self._bump(s)  # first: the write lock, across replicas
                done = await policies.write(
                    s, version, new, source, actor, self._clock(), keep_api=keep_api
                )
        except policies.Unchanged as unchanged:
            return unchanged.result
        _log.info("policy_stored", version=version, hash=new.hash, source=source.value)
        return done

    # -- replicas (see gateway.store.replication) ------------------------------------

    async def changes_since(
        self, version: int
    ) -> tuple[int, list[tuple[ChangeRow, DeviceRecord | None]]] | None:
        """The committed head and each change after ``version`` with the changed device's
        current record (None: removed since); None when those changes were pruned."""
        async with self._sessions() as s, s.begin():
            if self._engine.dialect.name == "postgresql":  # one snapshot for every read
                await s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            found = await repl.changes_since(s, version)
            if found is None:
                return None
            head, changes = found
            wanted = {c.device_id for c in changes if c.kind is UPSERT}
            records: dict[str, DeviceRecord] = {}
            if wanted:
                rows = await s.execute(device_query().where(DeviceRow.id.in_(in_list(wanted))))
                for d, iss, sub in rows.tuples():
                    records[d.id] = device_record(d, Identity(iss, sub))
            nodes = {c.device_id for c in changes if c.kind is PODS}
            held = await pods.read(s, nodes) if nodes else {}
        changes = [replace(c, pods=tuple(held.get(c.device_id, ()))) if c.kind is PODS else c
                   for c in changes]  # fmt: skip
        return head, [(c, records.get(c.device_id)) for c in changes]

    async def prune_changes(self, keep: int, relay_pairs_idle: float) -> int:
        """Drop map changes older than the newest ``keep`` versions and relay pairs idle
        for ``relay_pairs_idle`` seconds; how many changes went."""
        async with self._write() as s:
            await repl.prune_relay_pairs(s, self._clock() - relay_pairs_idle)
            return await repl.prune_changes(s, keep)

    async def take_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take or renew the lease ``name`` for ``ttl`` seconds; whether ``holder`` has it."""
        async with self._write() as s:
            return await repl.take_lease(s, name, holder, self._clock(), ttl)

    async def relay_pair(self, a: str, b: str) -> str | None:
        """The relay claimed for the pair of devices ``a``, ``b`` (any order)."""
        a, b = sorted((a, b))
        async with self._sessions() as s:
            return await repl.relay_pair(s, a, b)

    async def claim_relay_pair(self, a: str, b: str, relay_id: str, expected: str | None) -> str:
        """Claim ``relay_id`` for the pair if its relay is still ``expected``; the relay the
        pair uses afterwards (see :func:`gateway.store.replication.claim_relay_pair`)."""
        a, b = sorted((a, b))
        async with self._write() as s:
            return await repl.claim_relay_pair(s, a, b, relay_id, expected, self._clock())

    async def record_paths(self, reporter: str, entries: Sequence[PathEntry]) -> None:
        """Keep ``reporter``'s path report (:mod:`gateway.store.pathreports`); a device
        gone meanwhile is a :class:`Conflict`."""
        async with self._write() as s:
            await pathreports.upsert(s, reporter, entries, self._clock())

    async def record_pods(self, device_id: str, report: PodReport) -> int:
        """Apply a node's pod report (:mod:`gateway.store.pods`) at a new map version, which
        is returned; :class:`NotFound` for a device gone meanwhile, :class:`Conflict` when
        the node would hold more than :data:`~gateway.store.pods.MAX_ROWS_PER_NODE` pods."""
        async with self._write() as s:
            version = await self._bump(s)
            if await s.get(DeviceRow, device_id) is None:
                raise NotFound(f"no device {device_id!r}")
            await pods.apply(s, device_id, report)
            if await pods.count(s, device_id) > pods.MAX_ROWS_PER_NODE:
                raise Conflict(f"a node holds at most {pods.MAX_ROWS_PER_NODE} pods")
            await repl.record_change(s, version, PODS, device_id, self._clock())
        return version

    async def list_pods(self) -> dict[str, list[Pod]]:
        """Every node's pods as reported, by node."""
        async with self._sessions() as s:
            return await pods.read(s)

    async def list_paths(self, device_id: str | None = None) -> list[pathreports.StoredPath]:
        """Every path report, or those ``device_id`` made or is the peer of."""
        async with self._sessions() as s:
            return await pathreports.read(s, device_id)

    async def touch_many(self, device_ids: Collection[str]) -> None:
        """Set ``last_seen`` to now for devices streaming from this replica (their
        presence, read by the ephemeral sweep of whichever replica runs it)."""
        ids = sorted(device_ids)
        for start in range(0, len(ids), 500):
            async with self._write() as s:
                stmt = update(DeviceRow).where(DeviceRow.id.in_(in_list(ids[start : start + 500])))
                await s.execute(stmt.values(last_seen=self._clock()))

    # -- internals -----------------------------------------------------------------

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction; UNIQUE violations become :class:`Conflict`."""
        try:
            async with self._lock, self._sessions() as s, s.begin():
                yield s
        except IntegrityError as exc:
            raise Conflict("the change conflicts with existing state; retry") from exc

    async def _init_meta(self) -> None:
        pools = (str(self._pool.ipv4), str(self._pool.ipv6))
        async with self._write() as s:
            meta = await s.get(MetaRow, 1)
            if meta is None:
                s.add(MetaRow(id=1, map_version=0, ipv4_pool=pools[0], ipv6_pool=pools[1],
                              ipam_cursor=0))  # fmt: skip
            elif (meta.ipv4_pool, meta.ipv6_pool) != pools:
                raise ConfigError(
                    f"the store was created with pools {meta.ipv4_pool}, {meta.ipv6_pool}; "
                    f"configured: {pools[0]}, {pools[1]}",
                    hint="devices keep their addresses for life: configure the original pools",
                )

    async def _bump(self, s: AsyncSession) -> int:
        return (await self._bump_for_device(s))[0]

    async def _bump_for_device(self, s: AsyncSession) -> tuple[int, int]:
        """Take the next map version; it and the IPAM cursor (in the same statement)."""
        stmt = update(MetaRow).where(MetaRow.id == 1)
        stmt = stmt.values(map_version=MetaRow.map_version + 1)
        bumped = stmt.returning(MetaRow.map_version, MetaRow.ipam_cursor)
        version, cursor = (await s.execute(bumped)).tuples().one()
        await repl.notify(s, version)
        return version, cursor

    async def _key_for(self, s: AsyncSession, secret: str) -> EnrollmentKeyRow | None:
        """The enrollment key whose secret is ``secret``, if there is one."""
        if not secret.startswith(KEY_PREFIX):
            return None
        query = select(EnrollmentKeyRow).where(EnrollmentKeyRow.secret_hash == hash_secret(secret))
        row = (await s.execute(query)).scalar_one_or_none()
        return row if row is not None and secret_matches(secret, row.secret_hash) else None

    async def _consume_key(
        self, s: AsyncSession, row: EnrollmentKeyRow | None, now: float
    ) -> EnrollmentKeyRow:
        """Use ``row`` once (the key :meth:`_key_for` found); refused when unusable."""
        check_usable(key_state(row) if row is not None else None, now)
        assert row is not None
        k = EnrollmentKeyRow
        stmt = update(k).where(k.id == row.id, k.revoked.is_(False))
        stmt = stmt.where(or_(k.reusable.is_(True), k.used_count == 0))
        done = await s.execute(stmt.values(used_count=k.used_count + 1).returning(k.id))
        if done.scalar_one_or_none() is None:  # lost a race with another enrollment
            check_usable(None, now)
        return row

    async def _add_device(
        self, s: AsyncSession, request: EnrollRequest, grant: Grant,
        issued: tuple[str, float], place: tuple[int, int],
    ) -> DeviceRow:  # fmt: skip
        """The one enrollment path, after the identity was checked (not disabled; its
        row id and the IPAM cursor are ``place``): refuse a key any device ever had,
        allocate, add (flushed) with the token issued at ``now``; the key's expiry
        comes from :meth:`set_key_lifetime`. The device is named by the DNS label of the
        name it asked for, suffixed when another device has it (:mod:`gateway.store.names`)."""
        (token, now), (identity_id, cursor) = issued, place
        row = new_device(request, grant, await self._allocate(s, cursor), token, now)
        row.name = await names.free_name(s, names.to_label(request.name))
        lifetime = self._key_lifetime(grant.identity, grant.tags)
        row.expires_at = None if lifetime is None else now + lifetime
        row.identity_id = identity_id
        await limits.record_key(s, row.public_key, row.id, now)
        s.add(row)
        await s.flush()
        return row

    async def _allocate(self, s: AsyncSession, cursor: int) -> Allocation:
        """The next free address after ``cursor`` (read by this transaction's bump), which
        moves to it: the indexes just after it are read first (an indexed range), every
        index only when those are all taken."""
        cursor = s.info.get(_CURSOR, cursor)  # this transaction's last allocation, if any
        start = cursor % self._pool.size if cursor > 0 else 0
        end = min(start + _ALLOCATION_WINDOW, self._pool.size)
        near = select(DeviceRow.ip_index).where(DeviceRow.ip_index > start)
        in_use = set((await s.execute(near.where(DeviceRow.ip_index <= end))).scalars())
        if len(in_use) >= end - start:  # nothing free right after the cursor: look at all
            in_use = set((await s.execute(select(DeviceRow.ip_index))).scalars())
        allocation = allocate(self._pool, in_use, cursor)
        s.info[_CURSOR] = allocation.index
        moved = update(MetaRow).where(MetaRow.id == 1).values(ipam_cursor=allocation.index)
        await execute_at_commit(s, _CURSOR, moved)  # once per group commit
        return allocation

    async def _one_device(self, where: ColumnElement[bool]) -> DeviceRecord:
        async with self._sessions() as s:
            found = (await s.execute(device_query().where(where))).tuples().first()
        if found is None:
            raise NotFound("no such device")
        row, issuer, subject = found
        return device_record(row, Identity(issuer, subject))
