"""The broker over real WebSockets: full, deltas, resume, sync, revoke, endpoints, slow agents."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType, web
from aiohttp.test_utils import TestClient
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from gateway.mapping.broker import Broker, FeedChange
from gateway.mapping.netmap import NetworkState, full_map
from identity.policy import Policy
from wiregate.errors import BadInput
from wiregate.mapwire import (
    AgentEndpoints,
    Delta,
    apply_delta,
    parse_endpoint,
    read_full,
    read_map_message,
)
from wiregate.model import Device, Identity, NetMap

Connect = Callable[..., Awaitable[ClientWebSocketResponse]]


def device(i: int, *, endpoint: str = "", routes: tuple[str, ...] = ()) -> Device:
    return Device(
        id=f"d{i}",
        name=f"host{i}",
        public_key=f"{i:043d}=",
        identity=Identity("test", f"s{i}"),
        ipv4=f"100.64.0.{i + 1}",
        ipv6=f"fd7a::{i + 1:x}",
        endpoints=(endpoint,) if endpoint else (),
        routes=routes,
    )


class Harness:
    def __init__(self, broker: Broker, client: TestClient[Any, Any]) -> None:
        self.broker = broker
        self.client = client
        self.endpoints: list[tuple[str, list[str]]] = []

    async def connect(self, device_id: str, since: int | None = None) -> ClientWebSocketResponse:
        query = "" if since is None else f"?since={since}"
        return await self.client.ws_connect(f"/stream/{device_id}{query}")


@pytest.fixture
def broker() -> Broker:
    b = Broker(history=4, queue_size=8)
    b.load([device(i) for i in range(1, 4)], version=1)
    return b


@pytest.fixture
async def harness(aiohttp_client: Any, broker: Broker) -> Harness:
    async def on_endpoints(device_id: str, endpoints: AgentEndpoints) -> None:
        h.endpoints.append((device_id, endpoints))

    async def stream(request: web.Request) -> web.StreamResponse:
        since = request.query.get("since")
        device_id = request.match_info["id"]
        return await broker.serve(request, device_id, int(since) if since else None, on_endpoints)

    async def shutdown(app: web.Application) -> None:
        await broker.close()

    app = web.Application()
    app.router.add_get("/stream/{id}", stream)
    app.on_shutdown.append(shutdown)
    h = Harness(broker, await aiohttp_client(app))
    return h


async def recv(ws: ClientWebSocketResponse, timeout: float = 5.0) -> dict[str, Any]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type is WSMsgType.TEXT, msg
    data: dict[str, Any] = json.loads(msg.data)
    return data


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def scratch(broker: Broker, device_id: str) -> NetMap:
    return full_map(NetworkState(None, broker._state), device_id, broker.version)


def delta_of(msg: dict[str, Any]) -> Delta:
    delta = read_map_message(msg)
    assert isinstance(delta, Delta), msg
    return delta


async def test_full_map_on_connect(harness: Harness) -> None:
    ws = await harness.connect("d1")
    msg = await recv(ws)
    assert msg["type"] == "full" and msg["version"] == 1
    assert read_full(msg) == scratch(harness.broker, "d1")
    await until(lambda: harness.broker.connected == 1)


async def test_deltas_arrive_in_order_with_a_base_chain(harness: Harness) -> None:
    ws = await harness.connect("d1")
    current = read_full(await recv(ws))
    harness.broker.upsert(device(2, endpoint="192.0.2.2:51820"), 5)
    harness.broker.upsert(device(3, endpoint="192.0.2.3:51820"), 6)
    harness.broker.upsert(device(4), 9)
    harness.broker.upsert(replace(device(1), name="renamed"), 10)
    bases = []
    for _ in range(4):
        msg = await recv(ws)
        assert msg["type"] == "delta"
        bases.append((msg["base"], msg["version"]))
        current = apply_delta(current, delta_of(msg))
    assert bases == [(1, 5), (5, 6), (6, 9), (9, 10)]
    assert current == scratch(harness.broker, "d1")
    assert current.self_view.name == "renamed"


async def test_unaffected_agents_get_nothing_and_keep_their_version(harness: Harness) -> None:
    ws = await harness.connect("d1")
    await recv(ws)
    harness.broker.upsert(device(1), 2)  # unchanged device: nothing to say
    harness.broker.upsert(device(2, endpoint="192.0.2.2:1"), 3)
    assert (await recv(ws))["base"] == 1


async def test_resume_from_since_sends_the_missed_deltas(harness: Harness) -> None:
    ws = await harness.connect("d1")
    first = read_full(await recv(ws))
    await ws.close()
    await until(lambda: harness.broker.connected == 0)
    harness.broker.upsert(device(2, endpoint="192.0.2.2:1"), 2)
    harness.broker.upsert(device(3, endpoint="192.0.2.3:1"), 3)

    ws = await harness.connect("d1", since=1)
    a, b = await recv(ws), await recv(ws)
    assert [(m["base"], m["version"]) for m in (a, b)] == [(1, 2), (2, 3)]
    assert apply_delta(apply_delta(first, delta_of(a)), delta_of(b)) == scratch(
        harness.broker, "d1"
    )
    await ws.close()

    ws = await harness.connect("d1", since=2)
    assert (await recv(ws))["base"] == 2


async def test_sync_when_up_to_date(harness: Harness) -> None:
    ws = await harness.connect("d1")
    await recv(ws)
    harness.broker.upsert(device(2, endpoint="192.0.2.2:1"), 2)
    assert (await recv(ws))["version"] == 2
    await ws.close()
    ws = await harness.connect("d1", since=2)
    assert await recv(ws) == {"type": "sync", "version": 2}


async def test_sync_after_restart_at_the_same_version(harness: Harness) -> None:
    ws = await harness.connect("d2", since=1)  # never connected to this broker
    assert await recv(ws) == {"type": "sync", "version": 1}


async def test_full_when_history_is_gone(harness: Harness) -> None:
    ws = await harness.connect("d1")
    await recv(ws)
    await ws.close()
    for version in range(2, 8):  # history holds 4
        harness.broker.upsert(device(2, endpoint=f"192.0.2.2:{version}"), version)
    ws = await harness.connect("d1", since=1)
    msg = await recv(ws)
    assert msg["type"] == "full" and msg["version"] == 7
    await ws.close()
    ws = await harness.connect("d1", since=12345)
    assert (await recv(ws))["type"] == "full"


async def test_an_agent_away_for_longer_than_its_history_leaves_no_state(
    harness: Harness,
) -> None:
    # history holds 4: d1 can resume from the first 4 deltas it misses; past them it
    # could only get a full map, and the broker forgets it
    ws = await harness.connect("d1")
    await recv(ws)
    await ws.close()
    await until(lambda: harness.broker.connected == 0)
    for version in range(2, 6):
        harness.broker.upsert(device(2, endpoint=f"192.0.2.2:{version}"), version)
    assert "d1" in harness.broker._logs
    harness.broker.upsert(device(2, endpoint="192.0.2.2:6"), 6)
    assert "d1" not in harness.broker._logs
    ws = await harness.connect("d1", since=1)
    msg = await recv(ws)
    assert msg["type"] == "full" and msg["version"] == 6


async def test_histories_are_kept_for_connected_agents_only_once_the_others_fell_behind(
    harness: Harness,
) -> None:
    streams = {i: await harness.connect(f"d{i}") for i in (1, 2, 3)}
    for ws in streams.values():
        await recv(ws)
    await until(lambda: harness.broker.connected == 3)
    await streams.pop(1).close()
    await streams.pop(2).close()
    await until(lambda: harness.broker.connected == 1)
    for version in range(2, 10):  # a new peer for each
        harness.broker.upsert(device(10 + version), version)
        assert (await recv(streams[3]))["version"] == version
    assert set(harness.broker._logs) == {"d3"}
    assert len(harness.broker._logs["d3"].entries) == 4


async def test_a_replica_keeps_the_history_of_an_agent_away(harness: Harness) -> None:
    # it may come back from another replica, from a version this history reaches
    harness.broker.follow(lambda: None)
    ws = await harness.connect("d1")
    await recv(ws)
    await ws.close()
    await until(lambda: harness.broker.connected == 0)
    for version in range(2, 12):
        harness.broker.apply_changes(version, [FeedChange(version, f"d{10 + version}",
                                                          device(10 + version))])  # fmt: skip
    assert harness.broker._logs["d1"].version == 11
    ws = await harness.connect("d1", since=10)
    assert (await recv(ws))["base"] == 10


async def test_a_reconnected_agent_keeps_its_history(harness: Harness) -> None:
    ws = await harness.connect("d1")
    await recv(ws)
    await ws.close()
    await until(lambda: harness.broker.connected == 0)
    harness.broker.upsert(device(2, endpoint="192.0.2.2:2"), 2)
    ws = await harness.connect("d1", since=1)
    assert (await recv(ws))["base"] == 1
    for version in range(3, 12):  # connected: nothing is dropped but the oldest
        harness.broker.upsert(device(2, endpoint=f"192.0.2.2:{version}"), version)
        assert (await recv(ws))["version"] == version
    assert harness.broker._logs["d1"].version == 11


async def test_remove_revokes_the_device_and_tells_its_peers(harness: Harness) -> None:
    gone, peer = await harness.connect("d1"), await harness.connect("d2")
    await recv(gone), await recv(peer)
    harness.broker.remove("d1", 2)
    assert await recv(gone) == {"type": "revoked", "reason": "device removed"}
    assert (await gone.receive(timeout=5)).type is WSMsgType.CLOSE
    msg = await recv(peer)
    assert (msg["remove"], msg["upsert"], msg["version"]) == (["d1"], [], 2)
    await until(lambda: harness.broker.connected == 1)


async def test_unknown_device_is_told_to_retry(harness: Harness) -> None:
    ws = await harness.connect("nope")
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE and msg.data == 1013


async def test_endpoints_are_forwarded(harness: Harness) -> None:
    ws = await harness.connect("d1")
    await recv(ws)
    await ws.send_json({"type": "endpoints", "endpoints": ["192.0.2.1:51820", "[2001:db8::1]:1"]})
    await until(lambda: bool(harness.endpoints))
    assert harness.endpoints == [("d1", AgentEndpoints(["192.0.2.1:51820", "[2001:db8::1]:1"]))]


async def test_the_nat_type_comes_with_the_endpoints(harness: Harness) -> None:
    ws = await harness.connect("d1")
    await recv(ws)
    await ws.send_json({"type": "endpoints", "endpoints": [], "nat": "symmetric"})
    await until(lambda: bool(harness.endpoints))
    assert harness.endpoints == [("d1", AgentEndpoints([], "symmetric"))]


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        '{"type": "hello"}',
        '{"type": "endpoints", "endpoints": ["192.0.2.1"]}',
        '{"type": "endpoints", "endpoints": ["2001:db8::1:80"]}',
        '{"type": "endpoints", "endpoints": [], "nat": "cone"}',
        '{"type": "endpoints", "endpoints": [], "nat": 3}',
    ],
)
async def test_malformed_message_closes_with_1008(harness: Harness, bad: str) -> None:
    ws = await harness.connect("d1")
    await recv(ws)
    with capture_logs() as logs:
        await ws.send_str(bad)
        msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE and msg.data == 1008
    assert any(e["event"] == "closing agent stream: bad message" for e in logs)
    assert harness.endpoints == []


async def test_a_binary_frame_closes_with_1008(harness: Harness) -> None:
    ws = await harness.connect("d1")
    await recv(ws)
    await ws.send_bytes(b'{"type": "endpoints", "endpoints": []}')
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE and msg.data == 1008
    assert harness.endpoints == []


async def test_a_newer_stream_replaces_the_old_one(harness: Harness) -> None:
    old = await harness.connect("d1")
    await recv(old)
    new = await harness.connect("d1", since=1)
    assert (await recv(new))["type"] == "sync"
    assert (await old.receive(timeout=5)).type is WSMsgType.CLOSE
    harness.broker.upsert(device(2, endpoint="192.0.2.2:1"), 2)
    assert (await recv(new))["version"] == 2


async def test_close_says_service_restart(harness: Harness) -> None:
    ws = await harness.connect("d1")
    await recv(ws)
    await harness.broker.close()
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE and msg.data == 1012


async def test_a_stalled_agent_does_not_delay_others(harness: Harness) -> None:
    """d3 never reads; d1 keeps getting ~100 KB deltas at once; d3 is dropped, then resyncs."""
    routes = tuple(f"10.{i // 256}.{i % 256}.0/24" for i in range(6000))
    broker = harness.broker
    broker.upsert(device(2, routes=routes), 2)
    fast, stalled = await harness.connect("d1"), await harness.connect("d3")
    await recv(fast)
    await until(lambda: broker.connected == 2)
    for version in range(3, 303):
        broker.upsert(device(2, endpoint=f"192.0.2.2:{version}", routes=routes), version)
        # a writer blocked on the stalled socket would starve this receive (5 s timeout)
        msg = await recv(fast)
        assert msg["version"] == version and len(msg["upsert"][0]["allowed_ips"]) == 6002
    await until(lambda: broker.connected == 1)  # the stalled one overflowed and was dropped
    await stalled.close()
    ws = await harness.connect("d3", since=3)
    assert (await recv(ws))["type"] == "full"


@pytest.mark.parametrize(
    ("text", "normal"),
    [("192.0.2.1:51820", "192.0.2.1:51820"), ("[2001:DB8::1]:7", "[2001:db8::1]:7")],
)
def test_endpoints_are_normalized(text: str, normal: str) -> None:
    assert parse_endpoint(text) == normal


@pytest.mark.parametrize(
    "text", ["192.0.2.1:0", "192.0.2.1:65536", "[192.0.2.1]:1", "host:1", ":1", "192.0.2.1", 5]
)
def test_bad_endpoints_are_refused(text: object) -> None:
    with pytest.raises(BadInput):
        parse_endpoint(text)


async def test_load_resyncs_connected_agents(harness: Harness) -> None:
    kept, dropped = await harness.connect("d1"), await harness.connect("d3")
    await recv(kept), await recv(dropped)
    harness.broker.load([device(1), device(2), device(5)], version=40)
    msg = await recv(kept)
    assert msg["type"] == "full" and msg["version"] == 40
    assert {p["id"] for p in msg["peers"]} == {"d2", "d5"}
    assert (await recv(dropped))["type"] == "revoked"


async def test_the_pool_reaches_every_map_from_the_next_load(harness: Harness) -> None:
    broker = harness.broker
    broker.set_pool("100.64.0.0/16", "fd7a::/64")
    broker.load([device(1), device(2)], version=5)
    ws = await harness.connect("d1")
    assert read_full(await recv(ws)).self_view.pool == ("100.64.0.0/16", "fd7a::/64")
    broker.set_policy(Policy(rules=()), version=6)  # a new policy keeps it
    await recv(ws)
    assert full_map(broker._state, "d1", 6).self_view.pool == ("100.64.0.0/16", "fd7a::/64")


async def test_set_policy_sends_deltas(harness: Harness) -> None:
    broker = harness.broker
    ws = await harness.connect("d1")
    current = read_full(await recv(ws))
    broker.set_policy(Policy(rules=()), version=2)
    delta = delta_of(await recv(ws))
    assert (delta.base, delta.version, delta.upsert) == (1, 2, ())
    assert sorted(delta.remove) == ["d2", "d3"]
    current = apply_delta(current, delta)
    assert current == full_map(NetworkState(broker.policy, broker._state), "d1", 2)
    assert current.peers == {}
    broker.set_policy(Policy.allow_all(), version=3)  # and back: both peers again
    current = apply_delta(current, delta_of(await recv(ws)))
    assert sorted(current.peers) == ["d2", "d3"] and current == scratch(broker, "d1")


async def test_stale_versions_are_ignored(harness: Harness) -> None:
    harness.broker.upsert(device(2, endpoint="192.0.2.2:1"), 1)
    assert harness.broker.device("d2").endpoints == ()
    assert harness.broker.version == 1


def test_metrics_are_exported() -> None:
    text = generate_latest().decode()
    for name in (
        "wiregate_broker_connected_agents",
        "wiregate_broker_deltas_sent_total",
        "wiregate_broker_fanout_seconds_bucket",
        "wiregate_netmap_version",
    ):
        assert name in text
