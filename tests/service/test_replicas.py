"""Two gateway replicas (two apps, two brokers, two stores) on one real PostgreSQL.

What one replica commits reaches agents streaming from the other (change feed +
LISTEN/NOTIFY); addresses and login approvals stay unique under races between
replicas; run-once duties take a lease; both sides of a pair get the same relay.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.appkeys import BROKER, FOLLOWER, STORE
from gateway.lifecycle.sweeper import LEASE, duty_once
from gateway.mapping.broker import Broker, FeedChange
from gateway.store import EnrollRequest, KeySpec, Store
from lab.pg import PgServer
from wiregate.keys import encode_key, generate_private_key, public_from_private
from wiregate.model import Identity
from wiregate.podwire import Pod, build_pods
from wiregate.settings import GatewaySettings

ADMIN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


def new_key() -> str:
    return encode_key(public_from_private(generate_private_key()))


def settings(tmp_path: Path, name: str, url: str, **extra: Any) -> GatewaySettings:
    token = tmp_path / "admin.token"
    token.write_text(ADMIN + "\n")
    token.chmod(0o600)
    return GatewaySettings(
        state_dir=tmp_path / name,
        admin_token_file=token,
        admin_socket=tmp_path / name / "gw.sock",
        database_url=url,
        **extra,
    )


@pytest.fixture
def db_url(pg_server: PgServer) -> str:
    return pg_server.create_database()


@pytest.fixture
async def replicas(
    aiohttp_client: ClientFactory, tmp_path: Path, db_url: str
) -> AsyncIterator[tuple[Client, Client]]:
    a = await aiohttp_client(create_app(settings(tmp_path, "a", db_url)))
    b = await aiohttp_client(create_app(settings(tmp_path, "b", db_url)))
    for client in (a, b):
        await wait_for(lambda c=client: c.app[FOLLOWER].listening, 10)
    yield a, b


async def wait_for(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def enroll(
    client: Client, secret: str, name: str, routes: tuple[str, ...] = ()
) -> dict[str, Any]:
    body = {"auth_key": secret, "public_key": new_key(), "name": name, "routes": list(routes)}
    response = await client.post("/api/v1/enroll", json=body)
    assert response.status == 201, await response.text()
    result: dict[str, Any] = await response.json()
    return result


async def reusable_key(client: Client, tags: tuple[str, ...] = ()) -> str:
    body = {"reusable": True, "tags": list(tags)}
    response = await client.post("/api/v1/keys", json=body, headers=AUTH)
    assert response.status == 201, await response.text()
    secret: str = (await response.json())["secret"]
    return secret


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict[str, Any]:
    msg = await ws.receive(timeout)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    result: dict[str, Any] = json.loads(msg.data)
    return result


async def test_a_change_on_one_replica_reaches_agents_on_the_other(
    replicas: tuple[Client, Client],
) -> None:
    a, b = replicas
    secret = await reusable_key(a)
    first = await enroll(a, secret, "first")
    headers = {"Authorization": f"Bearer {first['token']}"}
    async with b.ws_connect("/api/v1/stream", headers=headers) as ws:
        full = await receive(ws)
        assert full["type"] == "full" and full["peers"] == []
        started = time.perf_counter()
        second = await enroll(a, secret, "second")  # committed on replica a
        delta = await receive(ws)
        elapsed = time.perf_counter() - started
        assert delta["type"] == "delta"
        assert [p["id"] for p in delta["upsert"]] == [second["device"]["id"]]
        assert delta["version"] == second["map_version"] == b.app[BROKER].version
        assert elapsed < 2.0
        # revoked on a: the agent streaming from b is told, and b's map drops it
        response = await a.delete(f"/api/v1/devices/{second['device']['id']}", headers=AUTH)
        assert response.status in (200, 204)
        removal = await receive(ws)
        assert removal["remove"] == [second["device"]["id"]]
    await wait_for(lambda: a.app[BROKER].version == b.app[BROKER].version == 3, 5)


async def test_revoking_a_device_closes_its_stream_on_the_other_replica(
    replicas: tuple[Client, Client],
) -> None:
    a, b = replicas
    secret = await reusable_key(a)
    device = await enroll(a, secret, "gone")
    headers = {"Authorization": f"Bearer {device['token']}"}
    async with b.ws_connect("/api/v1/stream", headers=headers) as ws:
        assert (await receive(ws))["type"] == "full"
        response = await a.delete(f"/api/v1/devices/{device['device']['id']}", headers=AUTH)
        assert response.status in (200, 204)
        revoked = await receive(ws)
        assert revoked == {"type": "revoked", "reason": "device removed"}


async def test_an_agent_resumes_on_another_replica_from_its_version(
    replicas: tuple[Client, Client],
) -> None:
    a, b = replicas
    secret = await reusable_key(a)
    device = await enroll(a, secret, "mover")
    headers = {"Authorization": f"Bearer {device['token']}"}
    async with a.ws_connect("/api/v1/stream", headers=headers) as ws:
        version = (await receive(ws))["version"]
        await enroll(a, secret, "peer")
        version = (await receive(ws))["version"]
    await wait_for(lambda: b.app[BROKER].version >= version, 5)
    async with b.ws_connect(f"/api/v1/stream?since={version}", headers=headers) as ws:
        assert await receive(ws) == {"type": "sync", "version": version}


async def test_concurrent_enrollments_across_replicas_get_distinct_addresses(
    replicas: tuple[Client, Client],
) -> None:
    a, b = replicas
    secret = await reusable_key(a)
    results = await asyncio.gather(*(enroll((a, b)[i % 2], secret, f"d{i}") for i in range(40)))
    ipv4 = [r["device"]["addresses"][0] for r in results]
    ipv6 = [r["device"]["addresses"][1] for r in results]
    assert len(set(ipv4)) == len(set(ipv6)) == 40
    assert sorted(r["map_version"] for r in results) == list(range(1, 41))
    await wait_for(lambda: a.app[BROKER].version == b.app[BROKER].version == 40, 5)
    for client in (a, b):
        assert len(list(client.app[BROKER]._state)) == 40


async def test_a_login_request_is_approved_once_across_replicas(db_url: str) -> None:
    stores = [await Store.open(db_url) for _ in range(2)]
    try:
        now = time.time()
        created = await stores[0].create_login_request(new_key(), "laptop", now)
        request_id = created.record.id
        alice = Identity("https://idp.example", "alice")
        results = await asyncio.gather(
            *(s.approve_login_request(request_id, alice, (), now) for s in stores * 3),
            return_exceptions=True,
        )
        approved = [r for r in results if not isinstance(r, BaseException)]
        assert len(approved) == 1
        assert len(await stores[1].list_devices()) == 1
    finally:
        for s in stores:
            await s.close()


async def test_single_use_key_is_used_once_across_replicas(db_url: str) -> None:
    stores = [await Store.open(db_url) for _ in range(2)]
    try:
        _, secret = await stores[0].create_key(KeySpec())
        results = await asyncio.gather(
            *(s.enroll(secret, EnrollRequest(new_key(), "x")) for s in stores * 4),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
    finally:
        for s in stores:
            await s.close()


async def test_one_replica_holds_the_sweeper_lease(
    aiohttp_client: ClientFactory, tmp_path: Path, db_url: str
) -> None:
    now = [time.time()]  # one injected clock for both replicas; the test moves it

    def clock() -> float:
        return now[0]

    a, b = [
        await aiohttp_client(create_app(settings(tmp_path, name, db_url), clock=clock))
        for name in ("a", "b")
    ]
    held = [await duty_once(a.app, "replica-a", 0.5), await duty_once(b.app, "replica-b", 0.5)]
    assert held == [True, False]
    assert await duty_once(a.app, "replica-a", 0.5)  # the holder renews
    now[0] += 1.4  # within a's lease (3 rounds of 0.5 s): b still waits
    assert not await duty_once(b.app, "replica-b", 0.5)
    now[0] += 0.2  # a's lease has run out
    assert await duty_once(b.app, "replica-b", 0.5)
    assert not await duty_once(a.app, "replica-a", 0.5)
    assert await a.app[STORE].take_lease(LEASE, "replica-b", 1.0)  # b may renew through a


async def test_ephemeral_devices_streaming_from_another_replica_are_not_swept(
    replicas: tuple[Client, Client],
) -> None:
    a, b = replicas
    response = await a.post(
        "/api/v1/keys", json={"reusable": True, "ephemeral": True}, headers=AUTH
    )
    secret = (await response.json())["secret"]
    device = await enroll(a, secret, "eph")
    headers = {"Authorization": f"Bearer {device['token']}"}
    store = a.app[STORE]
    async with b.ws_connect("/api/v1/stream", headers=headers) as ws:
        await receive(ws)
        await duty_once(b.app, "replica-b", 30)  # b records the presence of its agents
        later = time.time() + 20
        removed = await store.sweep_ephemeral(later, 30, a.app[BROKER].connected_ids())
        assert removed == []  # a does not see the stream, but its last_seen is fresh
        removed = await store.sweep_ephemeral(later + 60, 30, a.app[BROKER].connected_ids())
        assert [r.device_id for r in removed] == [device["device"]["id"]]


async def test_a_replica_catches_up_after_missing_notifications(db_url: str) -> None:
    store = await Store.open(db_url)
    other = await Store.open(db_url)
    try:
        broker = Broker()
        broker.load([], await store.map_version())
        _, secret = await other.create_key(KeySpec(reusable=True))
        first = await other.enroll(secret, EnrollRequest(new_key(), "one"))
        await other.rotate_key(first.record.device.id, new_key())
        second = await other.enroll(secret, EnrollRequest(new_key(), "two"))
        await other.delete_device(second.record.device.id)
        found = await store.changes_since(broker.version)
        assert found is not None
        head, changes = found
        assert [c.kind.value for c, _ in changes] == ["upsert", "upsert", "upsert", "remove"]
        broker.apply_changes(
            head,
            [
                FeedChange(c.version, c.device_id, None if r is None else r.device,
                           removed=c.kind.value == "remove", reason=c.reason)
                for c, r in changes
            ],
        )  # fmt: skip
        assert broker.version == head == 4
        assert [d.id for d in broker._state] == [first.record.device.id]
        assert (
            broker.device(first.record.device.id).public_key
            == (await store.get_device(first.record.device.id)).device.public_key
        )
        # pruned past: the feed says so, and a follower reloads the whole map
        assert await store.prune_changes(keep=1, relay_pairs_idle=3600) == 3
        assert await store.changes_since(0) is None
    finally:
        await store.close()
        await other.close()


async def test_both_sides_of_a_pair_get_the_same_relay_from_different_replicas(
    db_url: str,
) -> None:
    stores = [await Store.open(db_url) for _ in range(2)]
    try:
        claims = await asyncio.gather(
            stores[0].claim_relay_pair("dev_a", "dev_b", "relay-1", None),
            stores[1].claim_relay_pair("dev_b", "dev_a", "relay-2", None),
        )
        assert claims[0] == claims[1]
        winner = claims[0]
        other = "relay-2" if winner == "relay-1" else "relay-1"
        # moving the pair is compare-and-set: a stale expectation does not win
        assert await stores[0].claim_relay_pair("dev_a", "dev_b", other, "relay-x") == winner
        assert await stores[1].claim_relay_pair("dev_a", "dev_b", other, winner) == other
        assert await stores[0].relay_pair("dev_b", "dev_a") == other
    finally:
        for s in stores:
            await s.close()


POD_POLICY = """
acls:
  - {src: [tag:node], dst: [tag:node]}
  - {src: [{pods: {namespace: payments}, nodes: [tag:node]}], dst: [tag:db], ports: [tcp:5432]}
routes:
  - {tags: [tag:node], allow: [10.244.0.0/16]}
"""


async def test_pods_reported_at_one_replica_reach_a_vm_on_the_other(
    aiohttp_client: ClientFactory, tmp_path: Path, db_url: str
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POD_POLICY)
    a, b = [await aiohttp_client(create_app(settings(tmp_path, n, db_url, policy_file=policy)))
            for n in ("a", "b")]  # fmt: skip
    node = await enroll(a, await reusable_key(a, ("tag:node",)), "node", ("10.244.1.0/24",))
    db = await enroll(a, await reusable_key(a, ("tag:db",)), "db")
    ledger = Pod("payments", "ledger-1", ("10.244.1.5",), "default", ())
    vm_auth = {"Authorization": f"Bearer {db['token']}"}
    node_auth = {"Authorization": f"Bearer {node['token']}"}
    async with b.ws_connect("/api/v1/stream", headers=vm_auth) as vm:
        assert (await receive(vm))["type"] == "full"
        async with a.ws_connect("/api/v1/stream", headers=node_auth) as node_ws:
            assert (await receive(node_ws))["type"] == "full"
            await node_ws.send_json(build_pods(True, [ledger]))
            delta = await receive(vm)
            assert delta["upsert"][0]["pods_from"] == {"10.244.1.5": ["tcp:5432"]}
            assert delta["version"] == b.app[BROKER].version
    await a.app[BROKER].close()  # a replica started now reads the pods from the store
    c = await aiohttp_client(create_app(settings(tmp_path, "c", db_url, policy_file=policy)))
    async with c.ws_connect("/api/v1/stream", headers=vm_auth) as vm:
        full = await receive(vm)
        assert full["peers"][0]["pods_from"] == {"10.244.1.5": ["tcp:5432"]}
