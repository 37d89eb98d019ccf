"""What the Store must do with device names, tags and expiry on every SQL dialect.

Device names are unique DNS labels: an enrollment asking for a taken name gets a
``-N`` suffix, a rename to a taken name is refused, and migration 0007 turns the
names a database already holds into unique labels. A test module imports these
tests and provides ``db_url``: tests/unit/gateway/test_device_names.py on SQLite,
tests/service/test_device_names_postgres.py on a real PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from gateway.store import EnrollRequest, KeySpec, Store
from gateway.store.engine import create_engine
from gateway.store.migrate import upgrade
from gateway.store.names import NameTaken
from lab.fakes import FakeClock, new_key
from wiregate.errors import BadInput, NotFound
from wiregate.model import Identity

__all__ = [
    "named_store",
    "test_a_workload_re_enrolling_replaces_its_suffixed_device",
    "test_enrollment_names_are_unique_labels",
    "test_expire_now_removes_the_device_as_expiry_does",
    "test_migration_0007_makes_names_unique_labels",
    "test_rename_and_retag_at_one_version",
    "test_rename_refusals_change_nothing",
]


@pytest.fixture
async def named_store(db_url: str, clock: FakeClock) -> AsyncIterator[Store]:
    s = await Store.open(db_url, clock=clock)
    yield s
    await s.close()


async def _enroll(store: Store, secret: str, name: str) -> str:
    enrolled = await store.enroll(secret, EnrollRequest(new_key(), name))
    return enrolled.record.device.name


async def test_enrollment_names_are_unique_labels(named_store: Store) -> None:
    _, secret = await named_store.create_key(KeySpec(reusable=True))
    got = [await _enroll(named_store, secret, n) for n in ("vm-1", "vm-1", "VM-1", "vm-1")]
    assert got == ["vm-1", "vm-1-2", "vm-1-3", "vm-1-4"]
    assert await _enroll(named_store, secret, "Web_01.Prod") == "web-01-prod"
    long = "a" * 63
    assert await _enroll(named_store, secret, long) == long
    assert await _enroll(named_store, secret, long) == "a" * 61 + "-2"
    # a freed name is given again
    first = [r.device for r in await named_store.list_devices() if r.device.name == "vm-1"]
    await named_store.delete_device(first[0].id)
    assert await _enroll(named_store, secret, "vm-1") == "vm-1"


async def test_rename_and_retag_at_one_version(named_store: Store) -> None:
    _, secret = await named_store.create_key(KeySpec(tags=("tag:a",), reusable=True))
    enrolled = await named_store.enroll(secret, EnrollRequest(new_key(), "a"))
    device_id = enrolled.record.device.id
    before = await named_store.map_version()
    record, version = await named_store.update_device(
        device_id, name="db-main", tags=["tag:db", "tag:db", "tag:x"], actor="admin:socket"
    )
    assert version == before + 1 == await named_store.map_version()
    assert record.device.name == "db-main" and record.device.tags == ("tag:db", "tag:x")
    found = await named_store.changes_since(before)
    assert found is not None and [c.device_id for c, _ in found[1]] == [device_id]
    audit = {(e.action, e.actor): e.detail for e in await named_store.list_audit()}
    assert audit[("device.rename", "admin:socket")] == {"from": "a", "to": "db-main"}
    assert audit[("device.tags", "admin:socket")] == {"from": "tag:a", "to": "tag:db,tag:x"}
    # a rename to its own name is no conflict; an enrollment asking for it is suffixed
    await named_store.update_device(device_id, name="db-main")
    assert await _enroll(named_store, secret, "db-main") == "db-main-2"


async def test_rename_refusals_change_nothing(named_store: Store) -> None:
    _, secret = await named_store.create_key(KeySpec(reusable=True))
    a = (await named_store.enroll(secret, EnrollRequest(new_key(), "a"))).record.device
    await _enroll(named_store, secret, "b")
    version = await named_store.map_version()
    for bad in ("B", "-b", "b-", "b_c", "b.c", "", "x" * 64):
        with pytest.raises(BadInput):
            await named_store.update_device(a.id, name=bad)
    with pytest.raises(NameTaken) as taken:
        await named_store.update_device(a.id, name="b", tags=["tag:z"])
    assert taken.value.status == 409 and taken.value.code == "name_taken"
    with pytest.raises(NotFound):
        await named_store.update_device("dev_nope", name="c")
    assert await named_store.map_version() == version
    assert sorted(d.device.name for d in await named_store.list_devices()) == ["a", "b"]
    assert (await named_store.get_device(a.id)).device.tags == ()


async def test_expire_now_removes_the_device_as_expiry_does(named_store: Store) -> None:
    _, secret = await named_store.create_key(KeySpec(reusable=True))
    a = (await named_store.enroll(secret, EnrollRequest(new_key(), "a"))).record.device
    removal = await named_store.expire_device(a.id, actor="admin:token")
    assert removal.reason == "key expired" and removal.version == 2
    assert await named_store.list_devices() == []
    actions = [(e.action, e.actor) for e in await named_store.list_audit()]
    assert ("device.expire", "admin:token") in actions
    assert ("device.delete", "admin:token") in actions  # what relays are told
    assert [d for d, _ in await named_store.removed_devices(0)] == [a.id]
    with pytest.raises(NotFound):
        await named_store.expire_device(a.id)


async def test_a_workload_re_enrolling_replaces_its_suffixed_device(named_store: Store) -> None:
    _, secret = await named_store.create_key(KeySpec())
    await _enroll(named_store, secret, "node-1")  # another identity holds the name
    node = Identity("https://k8s.test", "system:serviceaccount:wiregate:node-1")
    detail = {"issuer": node.issuer}
    first, _ = await named_store.enroll_identity(
        node, [], EnrollRequest(new_key(), "node-1"), actor="system:test", detail=detail
    )
    assert first.record.device.name == "node-1-2"
    again, removed = await named_store.enroll_identity(
        node, [], EnrollRequest(new_key(), "node-1"), actor="system:test", detail=detail
    )
    assert removed is not None and removed.device_id == first.record.device.id
    assert again.record.device.name == "node-1-2"


_OLD_NAMES = ["Web_01", "web-01", "vm", "vm", "x" * 70, "ok"]


async def test_migration_0007_makes_names_unique_labels(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: upgrade(c, "0006"))
            await conn.run_sync(_old_devices)
        async with engine.begin() as conn:
            await conn.run_sync(upgrade)
        async with engine.connect() as conn:
            rows = await conn.execute(sa.text("SELECT id, name FROM devices ORDER BY id"))
            names = [name for _, name in rows]
            version = (await conn.execute(sa.text("SELECT map_version FROM meta"))).scalar_one()
            changes = await conn.execute(sa.text("SELECT version, kind, device_id FROM "
                                                 "map_changes ORDER BY version"))  # fmt: skip
            audit = await conn.execute(sa.text("SELECT actor, target, detail FROM audit_log"))
            changed, audited = list(changes), list(audit)
        assert names == ["web-01", "web-01-2", "vm", "vm-2", "x" * 63, "ok"]
        renamed = ["dev_0", "dev_1", "dev_3", "dev_4"]
        assert version == 7 + len(renamed)
        assert changed == [(8 + i, "upsert", d) for i, d in enumerate(renamed)]
        details = {t: json.loads(d) if isinstance(d, str) else d for _, t, d in audited}
        assert details["dev_1"] == {"from": "web-01", "to": "web-01-2"}
        assert {a for a, _, _ in audited} == {"system:migration"}
        with pytest.raises(IntegrityError):  # the unique index holds from now on
            async with engine.begin() as conn:
                await conn.execute(sa.text("UPDATE devices SET name = 'vm' WHERE id = 'dev_5'"))
    finally:
        await engine.dispose()


def _old_devices(conn: sa.Connection) -> None:
    """Devices as a database at revision 0006 may hold them (names neither labels nor
    unique), the oldest first."""
    conn.execute(sa.text("INSERT INTO meta (id, map_version, ipv4_pool, ipv6_pool, ipam_cursor, "
                         "changes_floor) VALUES (1, 7, '100.64.0.0/16', 'fd7a:7767:6174::/64', "
                         "6, 0)"))  # fmt: skip
    conn.execute(sa.text("INSERT INTO identities (id, issuer, subject, created_at, disabled) "
                         "VALUES (1, 'wiregate:enrollment-key', 'key_1', 1, false)"))  # fmt: skip
    insert = sa.text(
        "INSERT INTO devices (id, name, public_key, identity_id, ip_index, ipv4, ipv6, tags, "
        "endpoints, routes, keepalive, ephemeral, token_hash, created_at) VALUES (:id, :name, "
        ":key, 1, :i, :v4, :v6, '[]', '[]', '[]', NULL, false, :token, :at)"
    )
    for i, name in enumerate(_OLD_NAMES):
        conn.execute(insert, {"id": f"dev_{i}", "name": name, "key": new_key(), "i": i + 1,
                              "v4": f"100.64.0.{i + 1}", "v6": f"fd7a:7767:6174::{i + 1}",
                              "token": f"{i:064d}", "at": 100.0 + i})  # fmt: skip
