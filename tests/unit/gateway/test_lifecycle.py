"""A device's life after enrollment, through the API with a fake clock: identities
revoked and disabled, key expiry, ephemeral devices, abandoned logins, rotation."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.appkeys import BROKER, STORE
from gateway.lifecycle.sweeper import sweep_once
from gateway.store.store import MIN_ROTATION_INTERVAL
from lab.api_client import AUTH, Client, RecordingBroker, create_key
from lab.device_login import approve, poll, start
from lab.fakes import T0, FakeClock, new_key

DAY = 86400.0
ROTATE = "/api/v1/devices/self/rotate"


async def enroll(client: Client, secret: str, name: str = "vm") -> dict[str, Any]:
    body = {"auth_key": secret, "public_key": new_key(), "name": name}
    resp = await client.post("/api/v1/enroll", json=body)
    assert resp.status == 201, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


async def login_device(client: Client, subject: str = "alice") -> dict[str, Any]:
    created = await start(client)
    resp = await approve(client, created["user_code"], subject=subject)
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = await poll(client, created["poll_token"])
    return data


async def identity_id(client: Client, issuer: str, subject: str) -> int:
    query = {"issuer": issuer, "subject": subject}
    resp = await client.get("/api/v1/identities", params=query, headers=AUTH)
    assert resp.status == 200, await resp.text()
    return int((await resp.json())["identities"][0]["id"])


async def device_ids(client: Client) -> set[str]:
    return {r.device.id for r in await client.app[STORE].list_devices()}


async def audit_actions(client: Client) -> list[tuple[str, str]]:
    resp = await client.get("/api/v1/audit", headers=AUTH)
    return [(e["actor"], e["action"]) for e in reversed((await resp.json())["events"])]


async def test_revoke_identity_removes_all_its_devices(
    client: Client, broker: RecordingBroker
) -> None:
    a, b = await login_device(client), await login_device(client)
    other = await login_device(client, subject="bob")
    ident = await identity_id(client, "https://idp.example", "alice")
    resp = await client.delete(f"/api/v1/identities/{ident}", headers=AUTH)
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    assert set(data["removed"]) == {a["device"]["id"], b["device"]["id"]}
    assert data["identity"]["devices"] == 0 and not data["identity"]["disabled"]
    assert await device_ids(client) == {other["device"]["id"]}
    removed = [e for e in broker.events if e[0] == "remove"]
    assert {e[1] for e in removed} == set(data["removed"])
    assert [e[2] for e in removed] == sorted(e[2] for e in removed)  # in version order
    assert broker.reasons == ["identity revoked", "identity revoked"]
    assert ("admin:token", "identity.revoke") in await audit_actions(client)
    # a revoked identity may log in again
    assert (await login_device(client))["status"] == "approved"


async def test_disabled_identity_cannot_get_devices_until_enabled(
    client: Client, broker: RecordingBroker
) -> None:
    first = await login_device(client)
    ident = await identity_id(client, "https://idp.example", "alice")
    resp = await client.post(f"/api/v1/identities/{ident}/disable", headers=AUTH)
    data = await resp.json()
    assert data["removed"] == [first["device"]["id"]] and data["identity"]["disabled"]
    assert broker.reasons == ["identity disabled"]
    created = await start(client)
    refused = await approve(client, created["user_code"])
    assert refused.status == 403 and (await refused.json())["error"] == "identity_disabled"
    assert await device_ids(client) == set()
    enabled = await client.post(f"/api/v1/identities/{ident}/enable", headers=AUTH)
    assert (await enabled.json())["identity"]["disabled"] is False
    assert (await approve(client, created["user_code"])).status == 200


async def test_enabling_an_identity_keeps_its_devices(client: Client) -> None:
    device = await login_device(client)
    ident = await identity_id(client, "https://idp.example", "alice")
    resp = await client.post(f"/api/v1/identities/{ident}/enable", headers=AUTH)
    assert (await resp.json())["removed"] == []
    assert await device_ids(client) == {device["device"]["id"]}


async def test_disabled_enrollment_key_identity_refuses_enrollment(client: Client) -> None:
    key = await create_key(client, reusable=True)
    await enroll(client, key["secret"])
    ident = await identity_id(client, "wiregate:enrollment-key", key["key"]["id"])
    await client.post(f"/api/v1/identities/{ident}/disable", headers=AUTH)
    body = {"auth_key": key["secret"], "public_key": new_key(), "name": "vm2"}
    assert (await client.post("/api/v1/enroll", json=body)).status == 403


async def test_identity_routes_are_admin_only(client: Client) -> None:
    assert (await client.get("/api/v1/identities")).status == 401
    assert (await client.delete("/api/v1/identities/1")).status == 401
    assert (await client.delete("/api/v1/identities/x", headers=AUTH)).status == 400
    assert (await client.delete("/api/v1/identities/999", headers=AUTH)).status == 404


async def test_people_keys_expire_nodes_keys_do_not_unless_the_key_says(
    client: Client, clock: FakeClock, broker: RecordingBroker
) -> None:
    person = await login_device(client)
    assert person["device"]["expires_at"] is not None  # 180 days by default
    node = await enroll(client, (await create_key(client))["secret"])
    assert node["device"]["expires_at"] is None
    short = await create_key(client, device_key_expiry=3600)
    assert short["key"]["device_key_expiry"] == 3600
    brief = await enroll(client, short["secret"], "brief")
    assert brief["device"]["expires_at"] == "2023-11-14T23:13:20Z"  # T0 + 1 h
    clock.now = T0 + 3599
    assert await sweep_once(client.app) == []
    clock.now = T0 + 3600
    (removal,) = await sweep_once(client.app)
    assert removal.device_id == brief["device"]["id"] and removal.reason == "key expired"
    assert broker.reasons == ["key expired"]
    clock.now = T0 + 180 * DAY
    (removal,) = await sweep_once(client.app)
    assert removal.device_id == person["device"]["id"]
    assert await device_ids(client) == {node["device"]["id"]}
    actions = await audit_actions(client)
    assert actions.count(("system:expiry", "device.delete")) == 2


async def test_ephemeral_devices_are_swept_after_the_timeout(
    client: Client, clock: FakeClock
) -> None:
    eph = await create_key(client, ephemeral=True, reusable=True)
    a = await enroll(client, eph["secret"], "a")
    steady = await enroll(client, (await create_key(client))["secret"], "steady")
    clock.now = T0 + 299
    assert await sweep_once(client.app) == []
    clock.now = T0 + 300  # never connected: counted from enrollment (5 min default)
    (removal,) = await sweep_once(client.app)
    assert removal.device_id == a["device"]["id"] and removal.reason == "ephemeral device gone"
    assert await device_ids(client) == {steady["device"]["id"]}
    assert ("system:ephemeral", "device.delete") in await audit_actions(client)


async def test_a_connected_ephemeral_device_stays_and_goes_after_it_leaves(
    client: Client, clock: FakeClock
) -> None:
    eph = await create_key(client, ephemeral=True)
    a = await enroll(client, eph["secret"], "a")
    headers = {"Authorization": f"Bearer {a['token']}"}
    async with client.ws_connect("/api/v1/stream", headers=headers) as ws:
        await ws.receive_json()
        clock.now = T0 + 1000
        assert await sweep_once(client.app) == []  # connected: never swept
    for _ in range(200):  # the handler records the departure after the socket closes
        record = await client.app[STORE].get_device(a["device"]["id"])
        if record.last_seen == T0 + 1000:
            break
        await asyncio.sleep(0.01)
    assert record.last_seen == T0 + 1000
    clock.now = T0 + 1299
    assert await sweep_once(client.app) == []
    clock.now = T0 + 1300
    assert [r.device_id for r in await sweep_once(client.app)] == [a["device"]["id"]]


async def test_approved_login_never_collected_is_removed_after_expiry(
    client: Client, clock: FakeClock
) -> None:
    created = await start(client)
    resp = await approve(client, created["user_code"])
    device_id = (await resp.json())["device"]["id"]
    collected = await login_device(client, subject="bob")
    clock.now = T0 + created["expires_in"] - 1
    assert await sweep_once(client.app) == []
    clock.now = T0 + created["expires_in"]
    (removal,) = await sweep_once(client.app)
    assert removal.device_id == device_id and removal.reason == "login never completed"
    assert await device_ids(client) == {collected["device"]["id"]}
    assert ("system:login-expiry", "device.delete") in await audit_actions(client)


async def test_rotation_replaces_the_key_in_one_version(
    client: Client, clock: FakeClock, broker: RecordingBroker
) -> None:
    person = await login_device(client)
    device, token = person["device"], person["token"]
    headers = {"Authorization": f"Bearer {token}"}
    clock.now = T0 + 100 * DAY
    new = new_key()
    resp = await client.post(
        "/api/v1/devices/self/rotate", json={"public_key": new}, headers=headers
    )
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    rotated = data["device"]
    assert rotated["public_key"] == new and rotated["addresses"] == device["addresses"]
    assert rotated["key_rotated_at"] is not None
    # the same lifetime (180 days) from the rotation
    record = await client.app[STORE].get_device(device["id"])
    assert record.device.expires_at == T0 + 280 * DAY
    assert record.device.previous_public_key == device["public_key"]
    assert broker.events[-1] == ("upsert", device["id"], data["map_version"])
    self_view = client.app[BROKER].device(device["id"]).to_self()
    assert self_view.public_key == new and self_view.previous_public_key == device["public_key"]
    # the old key cannot come back, nor can a rotation follow at once
    clock.now += MIN_ROTATION_INTERVAL
    again = {"public_key": device["public_key"]}
    conflict = await client.post(ROTATE, json=again, headers=headers)
    assert conflict.status == 409
    clock.now += 1
    soon = await client.post(ROTATE, json={"public_key": new_key()},
                             headers=headers)  # fmt: skip
    assert soon.status == 200
    clock.now += 1
    too_soon = await client.post(ROTATE, json={"public_key": new_key()},
                                 headers=headers)  # fmt: skip
    assert too_soon.status == 409
    assert (await too_soon.json())["error"] == "rotated_recently"
    assert ("device:" + device["id"], "device.rotate") in await audit_actions(client)


async def test_rotation_needs_the_device_token(client: Client) -> None:
    body = {"public_key": new_key()}
    assert (await client.post(ROTATE, json=body)).status == 401
    bad = {"Authorization": "Bearer nope"}
    assert (await client.post(ROTATE, json=body, headers=bad)).status == 401


async def test_identities_need_issuer_and_subject_together(client: Client) -> None:
    await login_device(client)
    await login_device(client, subject="bob")
    for query in ({"issuer": "x"}, {"issuer": "https://idp.example"}, {"subject": "alice"}):
        resp = await client.get("/api/v1/identities", params=query, headers=AUTH)
        assert resp.status == 400, query
        body = await resp.json()
        assert "identities" not in body
        assert body["message"] == (
            "give issuer and subject together (one identity), or neither (all)"
        )
    resp = await client.get("/api/v1/identities", headers=AUTH)
    assert {i["subject"] for i in (await resp.json())["identities"]} == {"alice", "bob"}
    assert await identity_id(client, "https://idp.example", "bob") > 0
