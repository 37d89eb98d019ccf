"""An endpoint inside the tunnel address pools is never a peer's endpoint (issue: an
outside probe; what is sent there would go back into the tunnel): refused at
enrollment, left out of a stream's ``endpoints`` report."""

from __future__ import annotations

import asyncio

import pytest

from gateway.api.enroll import in_pools, tunnel_pools
from gateway.appkeys import SETTINGS, STORE
from lab.api_client import Client, RecordingBroker, assert_refused, create_key, enroll, snapshot

IN_POOLS = ["100.64.0.9:51820", "100.64.255.1:1", "[fd7a:7767:6174::9]:51820"]


@pytest.mark.parametrize("endpoint", IN_POOLS)
async def test_enrolling_with_an_endpoint_in_the_pool_is_refused(
    client: Client, endpoint: str
) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    before = await snapshot(client)
    resp = await enroll(client, secret, endpoints=["198.51.100.4:51820", endpoint])
    await assert_refused(client, resp, 400)
    assert "tunnel address pool" in (await resp.json())["message"]
    assert await snapshot(client) == before


async def test_a_stream_report_leaves_pool_endpoints_out(
    client: Client, broker: RecordingBroker
) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    data = await (await enroll(client, secret)).json()
    device_id = data["device"]["id"]
    bearer = {"Authorization": f"Bearer {data['token']}"}
    async with client.ws_connect("/api/v1/stream", headers=bearer) as ws:
        assert (await ws.receive_json())["type"] == "full"
        sent = ["100.64.0.9:51820", "198.51.100.4:51820", "[fd7a:7767:6174::2]:51820"]
        await ws.send_json({"type": "endpoints", "endpoints": sent})
        for _ in range(200):
            if broker.events and broker.events[-1][1] == device_id:
                break
            await asyncio.sleep(0.01)
    record = await client.app[STORE].get_device(device_id)
    assert record.device.endpoints == ("198.51.100.4:51820",)


def test_in_pools(client: Client) -> None:
    pools = tunnel_pools(client.app[SETTINGS])
    assert all(in_pools(e, pools) for e in IN_POOLS)
    outside = ["100.65.0.1:51820", "100.63.255.255:51820", "[fd7a:7767:6175::1]:51820"]
    assert not any(in_pools(e, pools) for e in outside)
