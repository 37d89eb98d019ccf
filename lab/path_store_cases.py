"""Store cases of the path reports (gateway/store/pathreports.py), run on SQLite by
tests/unit/gateway/test_path_store.py and on PostgreSQL by
tests/service/test_path_store_postgres.py (each provides ``db_url``)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from gateway.store import EnrollRequest, KeySpec, Store
from lab.fakes import T0, FakeClock, new_key
from wiregate.errors import Conflict
from wiregate.pathwire import PathEntry

__all__ = [
    "store",
    "test_a_report_about_a_deleted_device_is_a_conflict_and_keeps_nothing",
    "test_reports_upsert_per_pair_and_go_with_either_device",
]

ENTRY = PathEntry("", 1340, True, 1, 2, "direct", None, "why", 3.0, 0.5)


@pytest.fixture
async def store(db_url: str, clock: FakeClock) -> AsyncIterator[Store]:
    s = await Store.open(db_url, clock=clock)
    yield s
    await s.close()


async def devices(store: Store, *names: str) -> list[str]:
    _, secret = await store.create_key(KeySpec(reusable=True))
    return [(await store.enroll(secret, EnrollRequest(new_key(), n))).record.device.id
            for n in names]  # fmt: skip


async def test_reports_upsert_per_pair_and_go_with_either_device(
    store: Store, clock: FakeClock
) -> None:
    a, b, c = await devices(store, "a", "b", "c")
    await store.record_paths(a, [dataclasses.replace(ENTRY, peer=b),
                                 dataclasses.replace(ENTRY, peer=c)])  # fmt: skip
    clock.now = T0 + 10
    await store.record_paths(a, [dataclasses.replace(ENTRY, peer=b, path_mtu=1420,
                                                     black_hole=False, relay="r1")])  # fmt: skip
    await store.record_paths(c, [dataclasses.replace(ENTRY, peer=a)])
    rows = {(p.reporter, p.entry.peer): p for p in await store.list_paths()}
    assert set(rows) == {(a, b), (a, c), (c, a)}
    ab = rows[(a, b)]
    assert (ab.entry.path_mtu, ab.entry.black_hole, ab.entry.relay) == (1420, False, "r1")
    assert ab.reported_at == T0 + 10 and rows[(a, c)].reported_at == T0
    assert rows[(c, a)].entry == dataclasses.replace(ENTRY, peer=a)
    assert {(p.reporter, p.entry.peer) for p in await store.list_paths(b)} == {(a, b)}
    await store.delete_device(a)
    assert await store.list_paths() == []


async def test_a_report_about_a_deleted_device_is_a_conflict_and_keeps_nothing(
    store: Store,
) -> None:
    a, b = await devices(store, "a", "b")
    await store.delete_device(b)
    with pytest.raises(Conflict):
        await store.record_paths(a, [dataclasses.replace(ENTRY, peer=b)])
    assert await store.list_paths() == []
