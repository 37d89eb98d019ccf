"""Operator tools of the admin API: rename and retag a device (a map change every peer
receives), expire it now, list devices with presence, list pending logins, approve a
login as a named administrator. Peers are read from real map streams (WebSockets)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.api.devices import online_test
from gateway.app import create_app
from gateway.appkeys import BROKER, CLOCK, SETTINGS, STORE
from gateway.mapping.broker import Broker
from gateway.store import DeviceRecord
from lab.api_client import (
    AUTH,
    Client,
    ClientFactory,
    RecordingBroker,
    assert_refused,
    create_key,
    enroll,
    make_settings,
    snapshot,
)
from lab.device_login import start
from lab.fakes import T0, FakeClock
from tests.unit.gateway.test_api import _documented, _request_errors, _served
from wiregate.model import Device, Identity

Stream = aiohttp.ClientWebSocketResponse


async def enrolled(client: Client, secret: str, name: str) -> dict[str, Any]:
    resp = await enroll(client, secret, name=name)
    assert resp.status == 201, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


@asynccontextmanager
async def stream(client: Client, device: dict[str, Any]) -> AsyncIterator[Stream]:
    """A device's map stream, its full map already read."""
    bearer = {"Authorization": f"Bearer {device['token']}"}
    async with client.ws_connect("/api/v1/stream", headers=bearer) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "full"
        yield ws


def peers_after(delta: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    assert delta["type"] == "delta", delta
    return {p["id"]: p["name"] for p in delta["upsert"]}, list(delta["remove"])


async def audit_events(client: Client) -> list[dict[str, Any]]:
    resp = await client.get("/api/v1/audit", headers=AUTH)
    events: list[dict[str, Any]] = (await resp.json())["events"]
    return events


async def patch(client: Client, device_id: str, body: Any) -> aiohttp.ClientResponse:
    return await client.patch(f"/api/v1/devices/{device_id}", json=body, headers=AUTH)


# -- rename ----------------------------------------------------------------------------


async def test_a_rename_reaches_every_peer_and_is_audited(
    client: Client, broker: RecordingBroker
) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    a, b = await enrolled(client, secret, "a"), await enrolled(client, secret, "b")
    a_id = a["device"]["id"]
    async with stream(client, b) as ws_b, stream(client, a) as ws_a:
        resp = await patch(client, a_id, {"name": "db-main"})
        assert resp.status == 200, await resp.text()
        data = await resp.json()
        assert data["device"]["name"] == "db-main" and data["map_version"] == 3
        assert peers_after(await ws_b.receive_json(timeout=5)) == ({a_id: "db-main"}, [])
        own = await ws_a.receive_json(timeout=5)
        assert own["self"]["name"] == "db-main" and own["version"] == 3
    assert broker.events[-1] == ("upsert", a_id, 3)
    shown = await (await client.get(f"/api/v1/devices/{a_id}", headers=AUTH)).json()
    assert shown["name"] == "db-main"
    events = await audit_events(client)
    renamed = [e for e in events if e["action"] == "device.rename"]
    assert [(e["actor"], e["target"], e["detail"]) for e in renamed] == [
        ("admin:token", a_id, {"from": "a", "to": "db-main"})
    ]


BAD_UPDATES: list[tuple[str, Any, int, str]] = [
    ("upper case", {"name": "DB"}, 400, "invalid_field"),
    ("leading hyphen", {"name": "-db"}, 400, "invalid_field"),
    ("trailing hyphen", {"name": "db-"}, 400, "invalid_field"),
    ("underscore", {"name": "db_main"}, 400, "invalid_field"),
    ("dot", {"name": "db.main"}, 400, "invalid_field"),
    ("empty", {"name": ""}, 400, "invalid_field"),
    ("64 characters", {"name": "d" * 64}, 400, "invalid_field"),
    ("not a string", {"name": 5}, 400, "invalid_field"),
    ("nothing to change", {}, 400, "invalid_field"),
    ("null name alone", {"name": None}, 400, "invalid_field"),
    ("unknown field", {"name": "db", "ipv4": "100.64.0.9"}, 400, "invalid_field"),
    ("bad tag", {"tags": ["db"]}, 400, "invalid_field"),
    ("tags not a list", {"tags": "tag:db"}, 400, "invalid_field"),
    ("taken name", {"name": "b", "tags": ["tag:x"]}, 409, "name_taken"),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "code"), BAD_UPDATES, ids=[c[0] for c in BAD_UPDATES]
)
async def test_refused_updates_change_nothing(
    client: Client, broker: RecordingBroker, case: str, body: Any, status: int, code: str
) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    a = await enrolled(client, secret, "a")
    await enrolled(client, secret, "b")
    before, events = await snapshot(client), list(broker.events)
    resp = await patch(client, a["device"]["id"], body)
    await assert_refused(client, resp, status)
    assert (await resp.json())["error"] == code
    assert await snapshot(client) == before and broker.events == events
    names = sorted(r.device.name for r in await client.app[STORE].list_devices())
    assert names == ["a", "b"]
    assert (await client.app[STORE].get_device(a["device"]["id"])).device.tags == ()


async def test_update_needs_the_admin_and_a_device(client: Client) -> None:
    await assert_refused(client, await client.patch("/api/v1/devices/dev_x", json={"name": "x"}),
                         401)  # fmt: skip
    await assert_refused(client, await patch(client, "dev_nope", {"name": "x"}), 404)
    await assert_refused(client, await client.post("/api/v1/devices/dev_x/expire"), 401)
    await assert_refused(
        client, await client.post("/api/v1/devices/dev_nope/expire", headers=AUTH), 404
    )


async def test_an_enrollment_asking_for_a_taken_name_gets_a_suffix(client: Client) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    names = [(await enrolled(client, secret, "web"))["device"]["name"] for _ in range(3)]
    assert names == ["web", "web-2", "web-3"]
    assert (await enrolled(client, secret, "Web_01.Prod"))["device"]["name"] == "web-01-prod"


# -- tags --------------------------------------------------------------------------------


@pytest.fixture
async def policy_client(aiohttp_client: ClientFactory, tmp_path: Path, clock: FakeClock) -> Client:
    """A gateway whose policy lets tag:web and tag:db peer, and nothing else."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"acls": [{"src": ["tag:web"], "dst": ["tag:db"]}]}))
    settings = make_settings(tmp_path, policy_file=policy)
    app = create_app(settings, broker_factory=RecordingBroker, clock=clock)
    return await aiohttp_client(app)


async def test_new_tags_gain_and_lose_peers_through_the_policy(policy_client: Client) -> None:
    client = policy_client
    web_key = (await create_key(client, tags=["tag:web"]))["secret"]
    other_key = (await create_key(client, tags=["tag:other"]))["secret"]
    web, other = await enrolled(client, web_key, "web"), await enrolled(client, other_key, "x")
    web_id, other_id = web["device"]["id"], other["device"]["id"]
    async with stream(client, other) as ws_x, stream(client, web) as ws_web:
        resp = await patch(client, other_id, {"tags": ["tag:db"]})
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["device"]["tags"] == ["tag:db"]
        gained = await ws_x.receive_json(timeout=5)
        assert peers_after(gained) == ({web_id: "web"}, [])
        assert gained["self"]["tags"] == ["tag:db"]
        assert peers_after(await ws_web.receive_json(timeout=5)) == ({other_id: "x"}, [])
        resp = await patch(client, other_id, {"tags": []})
        assert resp.status == 200, await resp.text()
        assert peers_after(await ws_x.receive_json(timeout=5)) == ({}, [web_id])
        assert peers_after(await ws_web.receive_json(timeout=5)) == ({}, [other_id])
    events = await audit_events(client)
    tagged = [e["detail"] for e in events if e["action"] == "device.tags"]
    assert tagged == [{"from": "tag:db", "to": ""}, {"from": "tag:other", "to": "tag:db"}]


# -- expire ------------------------------------------------------------------------------


async def test_expire_now_drops_the_device_from_every_peer(
    client: Client, broker: RecordingBroker
) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    a, b = await enrolled(client, secret, "a"), await enrolled(client, secret, "b")
    a_id = a["device"]["id"]
    async with stream(client, b) as ws_b, stream(client, a) as ws_a:
        resp = await client.post(f"/api/v1/devices/{a_id}/expire", headers=AUTH)
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"device_id": a_id, "reason": "key expired", "map_version": 3}
        assert peers_after(await ws_b.receive_json(timeout=5)) == ({}, [a_id])
        assert await ws_a.receive_json(timeout=5) == {"type": "revoked", "reason": "key expired"}
    assert broker.events[-1] == ("remove", a_id, 3) and broker.reasons[-1] == "key expired"
    await assert_refused(client, await client.get(f"/api/v1/devices/{a_id}", headers=AUTH), 404)
    resp = await client.get("/api/v1/stream", headers={"Authorization": f"Bearer {a['token']}"})
    await assert_refused(client, resp, 401)
    events = await audit_events(client)
    assert ("admin:token", "device.expire", a_id) in {
        (e["actor"], e["action"], e["target"]) for e in events
    }


# -- list --------------------------------------------------------------------------------


async def test_the_list_shows_tags_owner_presence_and_filters(client: Client) -> None:
    key = await create_key(client, tags=["tag:web"], reusable=True)
    a = await enrolled(client, key["secret"], "a")
    b = await enrolled(client, key["secret"], "b")
    a_id, b_id = a["device"]["id"], b["device"]["id"]

    async def listed(query: str = "") -> dict[str, dict[str, Any]]:
        resp = await client.get(f"/api/v1/devices{query}", headers=AUTH)
        assert resp.status == 200, await resp.text()
        return {d["id"]: d for d in (await resp.json())["devices"]}

    async with stream(client, a):
        found = await listed()
        assert found[a_id]["online"] is True and found[b_id]["online"] is False
        assert found[a_id]["last_seen"] == "2023-11-14T22:13:20Z"
        assert found[b_id]["last_seen"] is None
        assert found[a_id]["tags"] == ["tag:web"]
        assert found[a_id]["identity"]["subject"] == key["key"]["id"]
        assert set(await listed("?online=true")) == {a_id}
        assert set(await listed("?online=false")) == {b_id}
        assert set(await listed("?tag=tag:web&owner=" + key["key"]["id"])) == {a_id, b_id}
        assert await listed("?tag=tag:db") == {}
        assert await listed("?owner=someone-else") == {}
        one = await (await client.get(f"/api/v1/devices/{a_id}", headers=AUTH)).json()
        assert one["online"] is True
    for bad in ("?online=yes", "?colour=red"):
        await assert_refused(client, await client.get(f"/api/v1/devices{bad}", headers=AUTH), 400)


def record(device_id: str, last_seen: float | None) -> DeviceRecord:
    device = Device(device_id, device_id, "k", Identity("i", "s"), "100.64.0.1", "fd::1")
    return DeviceRecord(device, last_seen)


def test_with_replicas_presence_recorded_lately_counts_as_online(tmp_path: Path) -> None:
    app = web.Application()
    app[BROKER] = broker = Broker()
    app[SETTINGS] = make_settings(tmp_path, expiry_sweep_interval=30.0)
    app[CLOCK] = lambda: T0
    alone = online_test(app)
    assert not alone(record("dev_a", T0))  # alone, only streams to this gateway count
    broker.follow(lambda: None)  # a replica: the others record their agents' presence
    online = online_test(app)
    assert online(record("dev_a", T0 - 60)) and online(record("dev_b", T0 - 1))
    assert not online(record("dev_c", T0 - 61)) and not online(record("dev_d", None))


# -- logins ------------------------------------------------------------------------------


async def test_pending_logins_are_listed_without_their_codes(client: Client) -> None:
    await assert_refused(client, await client.get("/api/v1/login/requests"), 401)
    first, second = await start(client), await start(client, name="laptop-2")
    resp = await client.get("/api/v1/login/requests", headers=AUTH)
    assert resp.status == 200
    text = await resp.text()
    listed = json.loads(text)["requests"]
    assert [r["request_id"] for r in listed] == [first["request_id"], second["request_id"]]
    assert [r["name"] for r in listed] == ["laptop-1", "laptop-2"]
    assert all(r["status"] == "pending" and r["fingerprint"] for r in listed)
    for created in (first, second):
        assert created["user_code"] not in text and created["poll_token"] not in text


async def test_a_login_approved_as_a_named_admin(client: Client, broker: RecordingBroker) -> None:
    created = await start(client)
    code = created["user_code"]
    path = f"/api/v1/login/requests/{code}/approve"
    resp = await client.post(path, json={"as": "alice", "tags": ["tag:laptop"]}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    device = (await resp.json())["device"]
    assert device["identity"] == {"issuer": "wiregate:admin", "subject": "alice"}
    assert device["tags"] == ["tag:laptop"] and device["name"] == "laptop-1"
    assert broker.events[-1][:2] == ("upsert", device["id"])
    events = await audit_events(client)
    approvals = [(e["actor"], e["detail"]["subject"]) for e in events
                 if e["action"] == "login.approve"]  # fmt: skip
    assert approvals == [("admin:token#alice", "alice")]
    listed = await (await client.get("/api/v1/login/requests", headers=AUTH)).json()
    assert listed == {"requests": []}


async def test_a_named_admin_may_approve_for_another_identity(client: Client) -> None:
    code = (await start(client))["user_code"]
    body = {"as": "alice", "issuer": "https://idp.example", "subject": "bob"}
    resp = await client.post(f"/api/v1/login/requests/{code}/approve", json=body, headers=AUTH)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["device"]["identity"]["subject"] == "bob"
    events = await audit_events(client)
    actors = [e["actor"] for e in events if e["action"] == "login.approve"]
    assert actors == ["admin:token#alice"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"tags": ["tag:laptop"]},
        {"issuer": "https://idp.example"},
        {"subject": "bob", "as": "alice"},
        {"as": "alice smith"},
        {"as": ""},
        {"as": "a" * 129},
        {"as": 7},
        {"approver": "alice"},
    ],
)
async def test_refused_approvals_change_nothing(client: Client, body: dict[str, Any]) -> None:
    code = (await start(client))["user_code"]
    before = await snapshot(client)
    resp = await client.post(f"/api/v1/login/requests/{code}/approve", json=body, headers=AUTH)
    await assert_refused(client, resp, 400)
    assert await snapshot(client) == before
    listed = await (await client.get("/api/v1/login/requests", headers=AUTH)).json()
    assert [r["status"] for r in listed["requests"]] == ["pending"]


# -- the OpenAPI document ----------------------------------------------------------------


async def test_the_new_routes_answer_as_the_openapi_document_says(client: Client) -> None:
    served = await _served(client)
    secret = (await create_key(client, reusable=True))["secret"]
    a, b = await enrolled(client, secret, "a"), await enrolled(client, secret, "b")
    one, many = "/api/v1/devices/{id}", "/api/v1/devices"
    a_path = f"/api/v1/devices/{a['device']['id']}"
    for body, status in [
        ({"name": "db-1", "tags": ["tag:db"]}, 200),
        ({"name": "b"}, 409),
        ({"name": "Bad"}, 400),
        ({}, 400),
    ]:
        assert bool(_request_errors(served, "patch", one, body)) == (status == 400), body
        resp = await client.patch(a_path, json=body, headers=AUTH)
        assert resp.status == status
        await _documented(served, "patch", one, resp)
    await _documented(served, "get", one, await client.get(a_path, headers=AUTH))
    await _documented(served, "get", many, await client.get(many, headers=AUTH))
    resp = await client.get(many + "?online=maybe", headers=AUTH)
    assert resp.status == 400
    await _documented(served, "get", many, resp)
    expire = "/api/v1/devices/{id}/expire"
    for path, status in [(f"{a_path}/expire", 200), (f"{a_path}/expire", 404)]:
        resp = await client.post(path, headers=AUTH)
        assert resp.status == status
        await _documented(served, "post", expire, resp)
    await start(client)
    logins = "/api/v1/login/requests"
    listed = await _documented(served, "get", logins, await client.get(logins, headers=AUTH))
    assert len(listed["requests"]) == 1
    approve = "/api/v1/login/requests/{user_code}/approve"
    for body in ({"as": "alice"}, {"as": "alice", "issuer": "i", "subject": "s", "tags": []}):
        assert not _request_errors(served, "post", approve, body)
    for body in ({}, {"issuer": "i"}, {"tags": []}, {"as": "a b"}):
        assert _request_errors(served, "post", approve, body), body
    assert b["device"]["name"] == "b"
