"""What an agent says with its endpoints besides them: its advertised routes after
enrollment (validated as at enrollment, stored and audited at one map version; a route
another device carries, or one in the tunnel pool, refuses the report and changes
nothing), and its version and operating system (kept for admins, no map change)."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.appkeys import STORE
from lab.api_client import AUTH, Client, RecordingBroker, create_key, enroll
from wiregate.mapwire import build_endpoints

ENDPOINTS = ["198.51.100.4:51820"]


async def send(client: Client, broker: RecordingBroker, token: str, message: Any) -> bool:
    """Send ``message`` on the device's stream; whether the broker was told of a change."""
    before = len(broker.events)
    bearer = {"Authorization": f"Bearer {token}"}
    async with client.ws_connect("/api/v1/stream", headers=bearer) as ws:
        assert (await ws.receive_json())["type"] == "full"
        await ws.send_json(message)
        for _ in range(50):
            if len(broker.events) > before:
                return True
            await asyncio.sleep(0.01)
    return False


async def test_routes_sent_with_the_endpoints_replace_the_enrolled_ones(
    client: Client, broker: RecordingBroker
) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    node = await (await enroll(client, secret, name="n1", routes=["10.244.1.0/24"])).json()
    other = await (await enroll(client, secret, name="n2", routes=["10.244.2.0/24"])).json()
    node_id, store = node["device"]["id"], client.app[STORE]

    new = ["10.244.1.0/24", "10.244.3.0/24", "192.0.2.10/32"]
    assert await send(client, broker, node["token"], build_endpoints(ENDPOINTS, None, new))
    record = await store.get_device(node_id)
    assert record.device.routes == tuple(new) and record.device.endpoints == tuple(ENDPOINTS)
    audited = [r for r in await store.list_audit() if r.action == "device.routes"]
    assert [(r.actor, r.target) for r in audited] == [(f"device:{node_id}", node_id)]
    assert audited[0].detail == {"from": "10.244.1.0/24", "to": " ".join(new)}
    assert broker.device(node_id).routes == tuple(new)

    # refused whole: another device's prefix, the tunnel pool, not a CIDR
    for bad in (["10.244.2.0/25"], ["100.64.9.0/24"], ["10.244.1.1/24"]):
        sent = build_endpoints(["198.51.100.5:51820"], None, [*new, *bad])
        assert not await send(client, broker, node["token"], sent)
        assert (await store.get_device(node_id)).device.routes == tuple(new)
    assert (await store.get_device(other["device"]["id"])).device.routes == ("10.244.2.0/24",)

    # without "routes" the routes stay; with an empty list they go
    assert await send(client, broker, node["token"], build_endpoints(["198.51.100.6:51820"]))
    assert (await store.get_device(node_id)).device.routes == tuple(new)
    assert await send(client, broker, node["token"], build_endpoints(ENDPOINTS, None, []))
    assert (await store.get_device(node_id)).device.routes == ()


async def test_the_agents_version_and_system_are_kept_for_admins(
    client: Client, broker: RecordingBroker
) -> None:
    secret = (await create_key(client))["secret"]
    vm = await (await enroll(client, secret, name="vm1")).json()
    sent = build_endpoints(ENDPOINTS, "eim", [], ("0.1.0", "Debian GNU/Linux 12 (Linux 6.1.0)"))
    assert await send(client, broker, vm["token"], sent)
    record = await client.app[STORE].get_device(vm["device"]["id"])
    assert (record.agent_version, record.agent_os) == ("0.1.0", "Debian GNU/Linux 12 (Linux 6.1.0)")
    listed = await (await client.get(f"/api/v1/devices/{vm['device']['id']}", headers=AUTH)).json()
    assert listed["agent"] == {"version": "0.1.0", "os": "Debian GNU/Linux 12 (Linux 6.1.0)"}
    # not a map change: the same report again tells the broker nothing
    assert not await send(client, broker, vm["token"], sent)
