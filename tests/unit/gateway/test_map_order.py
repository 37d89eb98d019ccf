"""Map changes reach every agent in version order, whatever order their handlers
publish them in (the real store on SQLite, the real stream handler, real WebSockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import ClientWebSocketResponse

from gateway.appkeys import STORE
from gateway.mapping.broker import Broker, FeedChange
from gateway.mapping.follower import Follower
from gateway.store import EnrollRequest, KeySpec, Store
from gateway.store.records import DeviceRecord
from lab.api_client import Client, RecordingBroker, create_key, enroll
from lab.fakes import new_key
from wiregate.model import Device, Identity


async def enroll_three(client: Client) -> list[dict[str, Any]]:
    secret = (await create_key(client, reusable=True))["secret"]
    enrolled = []
    for name in ("a1", "a2", "a3"):
        resp = await enroll(client, secret, name=name)
        assert resp.status == 201, await resp.text()
        enrolled.append(await resp.json())
    return enrolled


async def open_stream(client: Client, data: dict[str, Any]) -> ClientWebSocketResponse:
    headers = {"Authorization": f"Bearer {data['token']}"}
    ws = await client.ws_connect("/api/v1/stream", headers=headers)
    assert (await ws.receive_json())["type"] == "full"
    return ws


async def deltas_until(ws: ClientWebSocketResponse, version: int) -> list[dict[str, Any]]:
    """The deltas ``ws`` receives up to the one at ``version``."""
    received: list[dict[str, Any]] = []
    while not received or received[-1]["version"] < version:
        msg = json.loads(await asyncio.wait_for(ws.receive_str(), 5))
        assert msg["type"] == "delta", msg
        received.append(msg)
    return received


def peer_endpoints(deltas: Sequence[dict[str, Any]], device_id: str) -> list[str]:
    """The endpoints of ``device_id`` in the last delta that carried it."""
    found: list[str] = []
    for delta in deltas:
        for peer in delta["upsert"]:
            if peer["id"] == device_id:
                found = peer["endpoints"]
    return found


def hold_after_commit(store: Store, held: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Make ``held``'s next endpoint write wait, committed, before its handler
    publishes it; the events say it committed and let it go on."""
    committed, release = asyncio.Event(), asyncio.Event()
    real = store.set_endpoints

    async def set_endpoints(
        device_id: str,
        endpoints: Sequence[str],
        nat: str | None = None,
        routes: Sequence[str] | None = None,
        agent: tuple[str, str] | None = None,
    ) -> tuple[DeviceRecord, int] | None:
        changed = await real(device_id, endpoints, nat, routes, agent)
        if device_id == held and not release.is_set():
            committed.set()
            await release.wait()
        return changed

    store.set_endpoints = set_endpoints  # type: ignore[method-assign]
    return committed, release


async def test_an_endpoint_report_published_after_a_later_change_reaches_every_peer(
    client: Client, broker: RecordingBroker
) -> None:
    a1, a2, a3 = await enroll_three(client)
    ids = [d["device"]["id"] for d in (a1, a2, a3)]
    s1, s2, s3 = [await open_stream(client, d) for d in (a1, a2, a3)]
    store = client.app[STORE]
    start = await store.map_version()
    committed, release = hold_after_commit(store, ids[0])

    await s1.send_json({"type": "endpoints", "endpoints": ["192.0.2.1:51820"], "nat": "eim"})
    await asyncio.wait_for(committed.wait(), 5)  # a1's report is committed at start + 1 ...
    await s2.send_json({"type": "endpoints", "endpoints": ["192.0.2.2:51820"]})
    await asyncio.wait_for(_until(lambda: len(broker.events) >= 4), 5)  # ... a2's published
    release.set()  # ... and only then a1's

    seen = await deltas_until(s3, start + 2)
    assert [(d["base"], d["version"]) for d in seen] == [(start, start + 1), (start + 1, start + 2)]
    assert peer_endpoints(seen, ids[0]) == ["192.0.2.1:51820"]
    assert peer_endpoints(seen, ids[1]) == ["192.0.2.2:51820"]
    assert broker.device(ids[0]).endpoints == ("192.0.2.1:51820",)
    assert broker.device(ids[0]).nat == "eim"
    assert broker.version == start + 2
    for ws in (s1, s2, s3):
        await ws.close()


async def test_a_committed_change_never_published_is_read_from_the_feed(
    client: Client, broker: RecordingBroker
) -> None:
    a1, a2, a3 = await enroll_three(client)
    ids = [d["device"]["id"] for d in (a1, a2, a3)]
    s3 = await open_stream(client, a3)
    store = client.app[STORE]
    start = await store.map_version()
    # committed, but its publisher failed before handing it to the broker
    assert await store.set_endpoints(ids[0], ["192.0.2.1:51820"]) is not None
    s2 = await open_stream(client, a2)
    await s2.send_json({"type": "endpoints", "endpoints": ["192.0.2.2:51820"]})

    seen = await deltas_until(s3, start + 2)
    assert [d["version"] for d in seen] == [start + 1, start + 2]
    assert peer_endpoints(seen, ids[0]) == ["192.0.2.1:51820"]
    assert peer_endpoints(seen, ids[1]) == ["192.0.2.2:51820"]
    for ws in (s2, s3):
        await ws.close()


async def test_a_retried_enrollment_does_not_take_the_version_of_another_change(
    client: Client, broker: RecordingBroker
) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    first = await (await enroll(client, secret, name="a1")).json()
    a2 = await (await enroll(client, secret, name="a2")).json()
    store = client.app[STORE]
    start = await store.map_version()
    # a2's report is committed at start + 1, not yet published, when a1's enrollment
    # (its answer lost) is retried: the retry answers with the store's version
    changed = await store.set_endpoints(a2["device"]["id"], ["192.0.2.2:51820"])
    assert changed is not None
    retry = await enroll(client, secret, name="a1", public_key=first["device"]["public_key"])
    assert retry.status == 201, await retry.text()
    assert (await retry.json())["device"]["id"] == first["device"]["id"]
    record, version = changed
    broker.upsert(record.device, version)
    assert broker.device(record.device.id).endpoints == ("192.0.2.2:51820",)
    assert broker.version == start + 1


def test_a_change_ahead_of_a_missing_version_waits_for_it() -> None:
    reads: list[int] = []
    broker = Broker()
    broker.load([device(1), device(2)], version=7)
    broker.fill_gaps(lambda: reads.append(broker.version))

    broker.upsert(device(2, "192.0.2.2:1"), 9)
    assert (broker.version, broker.device("d2").endpoints, reads) == (7, (), [7])
    broker.upsert(device(1, "192.0.2.1:1"), 8)
    assert broker.version == 9
    assert broker.device("d1").endpoints == ("192.0.2.1:1",)
    assert broker.device("d2").endpoints == ("192.0.2.2:1",)


def test_the_feed_fills_a_gap_and_settles_the_changes_held() -> None:
    broker = Broker()
    broker.load([device(1), device(2), device(3)], version=7)
    broker.fill_gaps(lambda: None)
    broker.upsert(device(3, "192.0.2.3:1"), 10)
    broker.upsert(device(2, "192.0.2.2:1"), 9)
    # the feed read: version 8 had nothing to publish, 9 is there with a newer record
    broker.apply_changes(9, [FeedChange(9, "d2", device(2, "192.0.2.2:2"))])
    assert broker.version == 10
    assert broker.device("d2").endpoints == ("192.0.2.2:2",)
    assert broker.device("d3").endpoints == ("192.0.2.3:1",)
    broker.upsert(device(2, "192.0.2.2:1"), 9)  # its own publisher, late: already applied
    assert broker.device("d2").endpoints == ("192.0.2.2:2",)


def device(i: int, endpoint: str = "") -> Device:
    return Device(
        id=f"d{i}",
        name=f"host{i}",
        public_key=f"{i:043d}=",
        identity=Identity("test", f"s{i}"),
        ipv4=f"100.64.0.{i + 1}",
        ipv6=f"fd7a::{i + 1:x}",
        endpoints=(endpoint,) if endpoint else (),
    )


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


async def test_alone_a_whole_map_reload_never_takes_the_broker_back(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'g.db'}")
    try:
        _key, secret = await store.create_key(KeySpec(reusable=True))
        a1 = (await store.enroll(secret, EnrollRequest(new_key(), "a1"))).record.device
        broker = Broker()
        broker.load([a1], await store.map_version())
        follower = Follower(store, broker, listen_dsn=None, replica=False)
        broker.fill_gaps(follower.wake)
        start = broker.version
        # committed, not published yet; the feed is pruned past the broker's version
        first = await store.set_endpoints(a1.id, ["192.0.2.1:1"])
        assert first is not None
        assert await store.prune_changes(keep=0, relay_pairs_idle=3600) > 0
        real = store.list_devices

        async def list_devices() -> list[DeviceRecord]:
            # while the reload reads, the handlers publish this change and the next
            broker.upsert(first[0].device, first[1])
            second = await store.set_endpoints(a1.id, ["192.0.2.1:2"])
            assert second is not None
            broker.upsert(second[0].device, second[1])
            return await real()

        store.list_devices = list_devices  # type: ignore[method-assign]
        await follower.catch_up()
        assert broker.version == start + 2
        assert broker.device(a1.id).endpoints == ("192.0.2.1:2",)
    finally:
        await store.close()
