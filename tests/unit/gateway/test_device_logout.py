"""``POST /api/v1/devices/self/logout``: a device deletes itself with its own token."""

from __future__ import annotations

from gateway.appkeys import STORE
from lab.api_client import AUTH, Client, RecordingBroker, create_key
from lab.fakes import new_key

LOGOUT = "/api/v1/devices/self/logout"


async def test_logout_deletes_only_the_calling_device(
    client: Client, broker: RecordingBroker
) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    enrolled = []
    for name in ("a", "b"):
        body = {"auth_key": secret, "public_key": new_key(), "name": name}
        resp = await client.post("/api/v1/enroll", json=body)
        assert resp.status == 201, await resp.text()
        enrolled.append(await resp.json())
    a, b = enrolled
    headers = {"Authorization": f"Bearer {a['token']}"}
    resp = await client.post(LOGOUT, json={}, headers=headers)
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    assert doc["device_id"] == a["device"]["id"]
    assert broker.events[-1] == ("remove", a["device"]["id"], doc["map_version"])
    assert broker.reasons[-1] == "logged out"
    left = {r.device.id for r in await client.app[STORE].list_devices()}
    assert left == {b["device"]["id"]}
    audit = await (await client.get("/api/v1/audit", headers=AUTH)).json()
    assert any(
        e["actor"] == f"device:{a['device']['id']}" and e["action"] == "device.delete"
        for e in audit["events"]
    )
    # the token is gone with the device: a second logout is refused
    again = await client.post(LOGOUT, json={}, headers=headers)
    assert again.status == 401


async def test_logout_needs_a_device_token(client: Client) -> None:
    assert (await client.post(LOGOUT, json={})).status == 401
    bad = {"Authorization": "Bearer not-a-token"}
    assert (await client.post(LOGOUT, json={}, headers=bad)).status == 401
    # the admin token is not a device token
    assert (await client.post(LOGOUT, json={}, headers=AUTH)).status == 401
