"""What the Store must do on every SQL dialect: round trips, versions, races, restarts.

A test module imports these tests (and the ``store`` fixture) and provides ``db_url``
for its dialect: tests/unit/gateway/test_store.py on SQLite,
tests/service/test_store_postgres.py on a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.mapping.ipam import Pool
from gateway.store import EnrollRequest, KeySpec, Store
from lab.fakes import T0, FakeClock, new_key
from wiregate.errors import ConfigError, Conflict, NotFound, Unauthorized
from wiregate.model import Identity

__all__ = [  # what a test module imports: the tests, and the fixtures they take
    "store",
    "test_a_batch_keeps_the_records_of_its_writes_that_succeeded",
    "test_a_retried_enrollment_is_refused_once_the_device_connected_or_later",
    "test_an_enrollment_whose_answer_was_lost_may_be_asked_again",
    "test_changed_pool_is_refused_on_open",
    "test_duplicate_public_key_rolls_back_key_use",
    "test_enroll_round_trip",
    "test_fifty_concurrent_enrollments_get_distinct_addresses",
    "test_map_version_bumps_once_per_map_change",
    "test_refused_enrollment_changes_nothing",
    "test_released_address_reused_after_wrap_and_exhaustion",
    "test_restart_keeps_devices_addresses_and_cursor",
    "test_revoked_key_refused",
    "test_single_use_key_race_across_two_stores",
    "test_single_use_key_races_have_one_winner",
    "test_unknown_device_and_token",
]

SMALL = Pool.parse("10.9.0.0/29", "fd00:9::/120")  # 6 addresses


@pytest.fixture
async def store(db_url: str, clock: FakeClock) -> AsyncIterator[Store]:
    s = await Store.open(db_url, clock=clock)
    yield s
    await s.close()


async def used_count(store: Store) -> list[int]:
    return [k.used_count for k in await store.list_keys()]


async def test_enroll_round_trip(store: Store, clock: FakeClock) -> None:
    key, secret = await store.create_key(KeySpec(tags=("tag:vm",), description="ci"))
    assert key.expires_at == T0 + 3600 and key.used_count == 0
    clock.now = T0 + 5
    req = EnrollRequest(new_key(), "vm-1", ("192.0.2.1:51820",), ("10.1.0.0/24",), 25)
    enrolled = await store.enroll(secret, req)
    device = enrolled.record.device
    assert (device.ipv4, device.ipv6) == ("100.64.0.1", "fd7a:7767:6174::1")
    assert device.tags == ("tag:vm",) and device.keepalive == 25
    assert device.identity.issuer == "wiregate:enrollment-key"
    assert device.identity.subject == key.id
    assert device.created_at == T0 + 5 and enrolled.version == 1
    assert await store.get_device(device.id) == enrolled.record
    assert await store.device_by_token(enrolled.token) == enrolled.record
    assert await store.list_devices() == [enrolled.record]
    assert await used_count(store) == [1]


async def test_map_version_bumps_once_per_map_change(store: Store) -> None:
    _, secret = await store.create_key(KeySpec(reusable=True))
    assert await store.map_version() == 0  # creating a key does not change the map
    enrolled = await store.enroll(secret, EnrollRequest(new_key(), "a"))
    changed = await store.set_endpoints(enrolled.record.device.id, ["192.0.2.1:1"])
    assert changed is not None and changed[1] == 2
    assert changed[0].device.endpoints == ("192.0.2.1:1",)
    assert await store.set_endpoints(enrolled.record.device.id, ["192.0.2.1:1"]) is None
    await store.touch(enrolled.record.device.id)
    assert await store.map_version() == 2
    assert await store.delete_device(enrolled.record.device.id) == 3
    assert await store.map_version() == 3


async def test_refused_enrollment_changes_nothing(store: Store, clock: FakeClock) -> None:
    _, secret = await store.create_key(KeySpec(expiry=10))
    pk = new_key()
    with pytest.raises(Unauthorized):
        await store.enroll("wgk_" + "A" * 43, EnrollRequest(pk, "a"))
    clock.now = T0 + 10
    with pytest.raises(Unauthorized):
        await store.enroll(secret, EnrollRequest(pk, "a"))
    assert await store.map_version() == 0
    assert await store.list_devices() == []
    assert await used_count(store) == [0]


async def test_revoked_key_refused(store: Store) -> None:
    key, secret = await store.create_key(KeySpec(reusable=True))
    await store.revoke_key(key.id)
    with pytest.raises(Unauthorized):
        await store.enroll(secret, EnrollRequest(new_key(), "a"))
    assert (await store.list_keys())[0].revoked
    with pytest.raises(NotFound):
        await store.revoke_key("key_nope")


async def test_duplicate_public_key_rolls_back_key_use(store: Store) -> None:
    _, first = await store.create_key(KeySpec())
    _, second = await store.create_key(KeySpec())
    pk = new_key()
    await store.enroll(first, EnrollRequest(pk, "a"))
    with pytest.raises(Conflict) as info:
        await store.enroll(second, EnrollRequest(pk, "b"))
    assert info.value.code == "duplicate_public_key"
    assert sorted(await used_count(store)) == [0, 1]
    assert await store.map_version() == 1


async def test_single_use_key_races_have_one_winner(store: Store) -> None:
    _, secret = await store.create_key(KeySpec())
    results = await asyncio.gather(
        *(store.enroll(secret, EnrollRequest(new_key(), f"d{i}")) for i in range(10)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, Unauthorized) for r in results if isinstance(r, BaseException))
    assert await used_count(store) == [1]
    assert len(await store.list_devices()) == 1


async def test_single_use_key_race_across_two_stores(db_url: str) -> None:
    a = await Store.open(db_url)
    b = await Store.open(db_url)
    try:
        _, secret = await a.create_key(KeySpec())
        results = await asyncio.gather(
            *(s.enroll(secret, EnrollRequest(new_key(), "x")) for s in (a, b, a, b)),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        assert len(await b.list_devices()) == 1
    finally:
        await a.close()
        await b.close()


async def test_fifty_concurrent_enrollments_get_distinct_addresses(store: Store) -> None:
    _, secret = await store.create_key(KeySpec(reusable=True))
    results = await asyncio.gather(
        *(store.enroll(secret, EnrollRequest(new_key(), f"d{i}")) for i in range(50))
    )
    assert len({r.record.device.ipv4 for r in results}) == 50
    assert len({r.record.device.ipv6 for r in results}) == 50
    assert sorted(r.version for r in results) == list(range(1, 51))
    assert await used_count(store) == [50]


async def test_restart_keeps_devices_addresses_and_cursor(db_url: str) -> None:
    s = await Store.open(db_url, pool=SMALL)
    _, secret = await s.create_key(KeySpec(reusable=True))
    first = await s.enroll(secret, EnrollRequest(new_key(), "a"))
    second = await s.enroll(secret, EnrollRequest(new_key(), "b"))
    await s.delete_device(first.record.device.id)
    await s.close()
    s = await Store.open(db_url, pool=SMALL)
    try:
        assert await s.list_devices() == [second.record]
        assert await s.map_version() == 3
        third = await s.enroll(secret, EnrollRequest(new_key(), "c"))
        assert third.record.device.ipv4 == "10.9.0.3"  # not the released 10.9.0.1
    finally:
        await s.close()


async def test_released_address_reused_after_wrap_and_exhaustion(db_url: str) -> None:
    s = await Store.open(db_url, pool=SMALL)
    try:
        _, secret = await s.create_key(KeySpec(reusable=True))
        devices = [await s.enroll(secret, EnrollRequest(new_key(), f"d{i}")) for i in range(6)]
        with pytest.raises(Conflict) as info:
            await s.enroll(secret, EnrollRequest(new_key(), "full"))
        assert info.value.code == "pool_exhausted"
        assert await used_count(s) == [6]
        await s.delete_device(devices[1].record.device.id)
        again = await s.enroll(secret, EnrollRequest(new_key(), "again"))
        assert again.record.device.ipv4 == "10.9.0.2"
    finally:
        await s.close()


async def test_changed_pool_is_refused_on_open(db_url: str) -> None:
    s = await Store.open(db_url, pool=SMALL)
    await s.close()
    with pytest.raises(ConfigError):
        await Store.open(db_url)


async def test_unknown_device_and_token(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.get_device("dev_nope")
    with pytest.raises(NotFound):
        await store.delete_device("dev_nope")
    with pytest.raises(Unauthorized):
        await store.device_by_token("wgd_nope")
    assert await store.map_version() == 0


async def test_an_enrollment_whose_answer_was_lost_may_be_asked_again(
    store: Store, clock: FakeClock
) -> None:
    _, secret = await store.create_key(KeySpec())  # single use: consumed by the first
    request = EnrollRequest(new_key(), "vm-1")
    first = await store.enroll(secret, request)
    clock.now += 30
    again = await store.enroll(secret, request)  # the agent never got the first answer
    assert again.record.device.id == first.record.device.id
    assert again.record.device.ipv4 == first.record.device.ipv4
    assert again.token != first.token
    assert again.version == first.version  # the map did not change
    assert (await store.device_by_token(again.token)).device.id == first.record.device.id
    with pytest.raises(Unauthorized):
        await store.device_by_token(first.token)  # the lost token stops working
    assert await used_count(store) == [1]
    assert [e.action for e in await store.list_audit()][:1] == ["device.enroll_retry"]


async def test_a_retried_enrollment_is_refused_once_the_device_connected_or_later(
    store: Store, clock: FakeClock
) -> None:
    _, secret = await store.create_key(KeySpec(reusable=True))
    request = EnrollRequest(new_key(), "vm-1")
    first = await store.enroll(secret, request)
    await store.touch(first.record.device.id)  # its agent opened the stream
    with pytest.raises(Conflict):
        await store.enroll(secret, request)
    late = EnrollRequest(new_key(), "vm-2")
    await store.enroll(secret, late)
    clock.now += 601
    with pytest.raises(Conflict):
        await store.enroll(secret, late)
    _, other = await store.create_key(KeySpec(reusable=True))
    third = EnrollRequest(new_key(), "vm-3")
    await store.enroll(secret, third)
    with pytest.raises(Conflict):  # another key cannot take the device over
        await store.enroll(other, third)
    assert len(await store.list_devices()) == 3


async def test_a_batch_keeps_the_records_of_its_writes_that_succeeded(store: Store) -> None:
    taken = new_key()
    _, secret = await store.create_key(KeySpec())
    await store.enroll(secret, EnrollRequest(taken, "first"))  # version 1
    keys = [new_key(), new_key(), taken, new_key(), new_key()]  # the third is refused
    results = await asyncio.gather(
        *(store.enroll_identity(Identity("https://ci", f"w{i}"), ("tag:ci",),
                                EnrollRequest(key, f"w{i}"), actor="ci", detail={})
          for i, key in enumerate(keys)),
        return_exceptions=True,
    )  # fmt: skip
    refused = results.pop(2)
    assert isinstance(refused, Conflict) and refused.code == "duplicate_public_key"
    enrolled = [r[0] for r in results if not isinstance(r, BaseException)]
    assert sorted(e.version for e in enrolled) == [2, 3, 4, 5]
    assert await store.map_version() == 5
    found = await store.changes_since(0)
    assert found is not None
    head, changes = found
    assert head == 5 and [c.version for c, _ in changes] == [1, 2, 3, 4, 5]
    by_version = {e.version: e.record.device.id for e in enrolled}
    assert {c.version: c.device_id for c, _ in changes if c.version > 1} == by_version
    audited = [(a.action, a.target) for a in await store.list_audit() if a.actor == "ci"]
    assert sorted(audited) == sorted(("device.enroll", d) for d in by_version.values())
    assert len(await store.list_identities()) == 5  # the refused one's was rolled back
