"""Abuse limits and key history the Store keeps for every replica, on every SQL dialect.

A test module imports these tests and provides ``db_url`` for its dialect:
tests/unit/gateway/test_limits_store.py on SQLite, tests/service/test_limits_postgres.py
on a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.store import EnrollRequest, KeySpec, Store
from gateway.store import logins as logins_module
from gateway.store.limits import Bucket, RateLimited
from lab.fakes import FakeClock, new_key
from wiregate.errors import Conflict, NotFound
from wiregate.model import Identity

__all__ = [
    "store",
    "test_a_bucket_is_shared_by_two_stores_and_never_overspent",
    "test_a_deleted_devices_key_is_never_registered_again",
    "test_a_full_pending_cap_gives_way_to_a_lighter_source",
    "test_a_refused_charge_spends_nothing",
    "test_a_rotated_away_key_is_never_registered_again",
    "test_a_signed_out_session_is_refused_by_every_store",
    "test_concurrent_enrollments_share_commits_and_a_refused_one_changes_nothing",
    "test_one_source_cannot_hold_more_than_its_share_of_pending_logins",
]

TEN = Bucket("test.ten", 10, 1.0, "too many", "wait")
ONE = Bucket("test.one", 1, 1 / 60, "too many (one)", "wait")


@pytest.fixture
async def store(db_url: str, clock: FakeClock) -> AsyncIterator[Store]:
    s = await Store.open(db_url, clock=clock)
    yield s
    await s.close()


async def _enroll(store: Store, key: str, name: str = "dev") -> str:
    _, secret = await store.create_key(KeySpec())
    return (await store.enroll(secret, EnrollRequest(key, name))).record.device.id


async def _refused(store: Store, key: str) -> None:
    _, secret = await store.create_key(KeySpec())
    with pytest.raises(Conflict) as info:
        await store.enroll(secret, EnrollRequest(key, "again"))
    assert info.value.code == "duplicate_public_key"
    with pytest.raises(Conflict) as info:
        await store.create_login_request(key, "again", store._clock())
    assert info.value.code == "duplicate_public_key"


async def test_a_rotated_away_key_is_never_registered_again(store: Store, clock: FakeClock) -> None:
    first, second, third = new_key(), new_key(), new_key()
    device = await _enroll(store, first)
    await store.rotate_key(device, second)
    clock.advance(10)
    await store.rotate_key(device, third)
    versions = await store.map_version()
    for old in (first, second):
        await _refused(store, old)
    clock.advance(10)
    with pytest.raises(Conflict) as info:
        await store.rotate_key(device, first)
    assert info.value.code == "duplicate_public_key"
    assert await store.map_version() == versions
    assert len(await store.list_devices()) == 1


async def test_a_deleted_devices_key_is_never_registered_again(
    store: Store, clock: FakeClock
) -> None:
    gone, other = new_key(), new_key()
    device = await _enroll(store, gone, "gone")
    keeper = await _enroll(store, other, "keeper")
    await store.delete_device(device)
    await _refused(store, gone)
    with pytest.raises(Conflict):
        await store.rotate_key(keeper, gone)
    identity = Identity("https://issuer.example", "node-1")
    with pytest.raises(Conflict):
        await store.enroll_identity(identity, (), EnrollRequest(gone, "n"), actor="t", detail={})
    assert [r.device.id for r in await store.list_devices()] == [keeper]


async def test_a_refused_charge_spends_nothing(store: Store) -> None:
    await store.charge([(ONE, "x")])
    for _ in range(3):  # TEN is charged first, then ONE refuses: TEN's token comes back
        with pytest.raises(RateLimited):
            await store.charge([(TEN, "x"), (ONE, "x")])
    for _ in range(10):
        await store.charge([(TEN, "x")])
    with pytest.raises(RateLimited) as info:
        await store.charge([(TEN, "x")])
    assert info.value.status == 429 and info.value.message == "too many"
    await store.charge([(TEN, "y")])  # another key, another bucket


async def test_a_bucket_is_shared_by_two_stores_and_never_overspent(
    store: Store, db_url: str, clock: FakeClock
) -> None:
    other = await Store.open(db_url, clock=clock)
    try:
        results = await asyncio.gather(
            *(s.charge([(TEN, "shared")]) for s in [store, other] * 15), return_exceptions=True
        )
        assert sum(r is None for r in results) == 10
        assert all(r is None or isinstance(r, RateLimited) for r in results)
        clock.advance(2.0)  # 1 token/s: two more, on either store
        await other.charge([(TEN, "shared")])
        await store.charge([(TEN, "shared")])
        with pytest.raises(RateLimited):
            await store.charge([(TEN, "shared")])
    finally:
        await other.close()


async def test_a_signed_out_session_is_refused_by_every_store(
    store: Store, db_url: str, clock: FakeClock
) -> None:
    other = await Store.open(db_url, clock=clock)
    try:
        assert not await other.session_ended("sid-1")
        await store.end_session("sid-1", clock() + 60)
        await store.end_session("sid-1", clock() + 60)  # twice: still once
        assert await other.session_ended("sid-1") and not await other.session_ended("sid-2")
    finally:
        await other.close()


async def test_one_source_cannot_hold_more_than_its_share_of_pending_logins(
    store: Store, clock: FakeClock
) -> None:
    for _ in range(logins_module.PER_SOURCE):
        await store.create_login_request(new_key(), "l", clock(), source="192.0.2.1")
    with pytest.raises(RateLimited) as info:
        await store.create_login_request(new_key(), "l", clock(), source="192.0.2.1")
    assert info.value.code == "too_many_logins"
    await store.create_login_request(new_key(), "l", clock(), source="192.0.2.2")


async def test_a_full_pending_cap_gives_way_to_a_lighter_source(
    store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logins_module, "MAX_PENDING", 12)
    flood = []
    for i in range(12):  # three sources fill the cap, four requests each
        clock.advance(1)
        source = f"10.0.0.{i % 3}"
        created = await store.create_login_request(new_key(), "f", clock(), source=source)
        flood.append(created.user_code)
    clock.advance(1)
    mine = await store.create_login_request(new_key(), "me", clock(), source="192.0.2.7")
    # the oldest request of a heaviest source (10.0.0.0 holds 4) expired to make room
    assert await _pending(store, flood, clock()) == flood[1:]
    assert await _pending(store, [mine.user_code], clock()) == [mine.user_code]
    await store.create_login_request(new_key(), "me2", clock(), source="192.0.2.8")
    assert await _pending(store, flood, clock()) == flood[2:]  # 10.0.0.1 gave way then
    # 10.0.0.0 holds 3, the heaviest 4: asking again would only take another's place
    with pytest.raises(RateLimited) as info:
        await store.create_login_request(new_key(), "f", clock(), source="10.0.0.0")
    assert info.value.code == "too_many_logins"


async def _pending(store: Store, codes: list[str], now: float) -> list[str]:
    found = []
    for code in codes:
        try:
            await store.find_login_request(code, now)
        except NotFound:
            continue
        found.append(code)
    return found


async def test_concurrent_enrollments_share_commits_and_a_refused_one_changes_nothing(
    store: Store,
) -> None:
    used = new_key()
    await _enroll(store, used, "first")
    keys = [new_key() for _ in range(19)]
    keys[7] = used  # one of the batch is refused; the others must not notice
    identity = Identity("https://issuer.example", "w")
    results = await asyncio.gather(
        *(store.enroll_identity(identity, (), EnrollRequest(k, f"w{i}"), actor="t", detail={})
          for i, k in enumerate(keys)),
        return_exceptions=True,
    )  # fmt: skip
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], Conflict)
    assert refused[0].code == "duplicate_public_key"
    versions = sorted(r[0].version for r in results if not isinstance(r, BaseException))
    assert versions == list(range(2, 20)) and await store.map_version() == 19
    devices = await store.list_devices()
    assert len(devices) == 19 and len({d.device.ipv4 for d in devices}) == 19
