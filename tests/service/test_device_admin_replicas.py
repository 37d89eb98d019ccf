"""Device renames and expiries made on one replica reach agents streaming from another,
and every replica reports as online the agents streaming from any (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gateway.app import create_app
from gateway.appkeys import BROKER, FOLLOWER, STORE
from gateway.lifecycle.sweeper import duty_once
from tests.service.test_replicas import (
    AUTH,
    Client,
    ClientFactory,
    db_url,
    enroll,
    receive,
    replicas,
    reusable_key,
    settings,
    wait_for,
)

__all__ = ["db_url", "replicas"]  # the fixtures these tests take


async def test_rename_and_expire_on_one_replica_reach_the_other(
    replicas: tuple[Client, Client],
) -> None:
    a, b = replicas
    secret = await reusable_key(a)
    watcher, changed = await enroll(a, secret, "watcher"), await enroll(a, secret, "web")
    changed_id = changed["device"]["id"]
    headers = {"Authorization": f"Bearer {watcher['token']}"}
    async with b.ws_connect("/api/v1/stream", headers=headers) as ws:
        full = await receive(ws)
        assert {p["id"]: p["name"] for p in full["peers"]} == {changed_id: "web"}
        listed = await (await a.get("/api/v1/devices?online=true", headers=AUTH)).json()
        assert [d["name"] for d in listed["devices"]] == ["watcher"]  # streaming from b
        resp = await a.patch(f"/api/v1/devices/{changed_id}", json={"name": "db-main"},
                             headers=AUTH)  # fmt: skip
        assert resp.status == 200, await resp.text()
        delta = await receive(ws)
        assert {p["id"]: p["name"] for p in delta["upsert"]} == {changed_id: "db-main"}
        assert delta["version"] == (await resp.json())["map_version"]
        taken = await b.patch(f"/api/v1/devices/{watcher['device']['id']}",
                              json={"name": "db-main"}, headers=AUTH)  # fmt: skip
        assert taken.status == 409 and (await taken.json())["error"] == "name_taken"
        resp = await a.post(f"/api/v1/devices/{changed_id}/expire", headers=AUTH)
        assert resp.status == 200, await resp.text()
        removal = await receive(ws)
        assert removal["remove"] == [changed_id]


async def test_presence_on_another_replica_is_seen_and_ends_within_two_intervals(
    aiohttp_client: ClientFactory, tmp_path: Path, db_url: str
) -> None:
    now = [time.time()]  # one injected clock for both replicas; the test moves it

    def clock() -> float:
        return now[0]

    a, b = [
        await aiohttp_client(create_app(settings(tmp_path, name, db_url), clock=clock))
        for name in ("a", "b")
    ]
    await wait_for(lambda: a.app[FOLLOWER].listening and b.app[FOLLOWER].listening, 10)
    device = await enroll(a, await reusable_key(a), "roamer")
    device_id = device["device"]["id"]

    async def online_on(client: Client) -> bool:
        found = await (await client.get(f"/api/v1/devices/{device_id}", headers=AUTH)).json()
        return bool(found["online"])

    headers = {"Authorization": f"Bearer {device['token']}"}
    async with b.ws_connect("/api/v1/stream", headers=headers) as ws:
        await receive(ws)
        assert await online_on(a)  # streaming from b: a reads b's record of it
        now[0] += 50  # b refreshes its agents' presence every interval (30 s)
        await duty_once(b.app, "replica-b", 30)
        now[0] += 50
        assert await online_on(a)
    await wait_for(lambda: device_id not in b.app[BROKER].connected_ids(), 10)
    for _ in range(100):  # b records the time the stream ended
        if (await a.app[STORE].get_device(device_id)).last_seen == now[0]:
            break
        await asyncio.sleep(0.05)
    now[0] += 59
    assert await online_on(a)  # at most two intervals stale ...
    now[0] += 2
    assert not await online_on(a)  # ... then offline on every replica
    assert not await online_on(b)
