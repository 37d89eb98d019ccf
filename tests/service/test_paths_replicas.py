"""Two gateway replicas on one PostgreSQL: a path report an agent sends on its stream
to one replica is served by the other's GET /api/v1/paths and counted in its metrics,
and goes when the reporting device is deleted through the other."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from prometheus_client import generate_latest

from gateway.api.paths import refresh
from gateway.appkeys import METRICS
from tests.service.test_replicas import (
    AUTH,
    Client,
    db_url,
    enroll,
    receive,
    replicas,
    reusable_key,
)
from wiregate.pathwire import PathEntry, build_paths

__all__ = ["db_url", "replicas"]  # the fixtures these tests take

ENTRY = PathEntry("", 1280, True, 1, 4, "direct", None, "hole punched", 2.0, 1.5)


async def served(client: Client) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = (await (await client.get("/api/v1/paths", headers=AUTH)).json())[
        "paths"
    ]
    return found


async def test_every_replica_serves_the_same_matrix(replicas: tuple[Client, Client]) -> None:
    a, b = replicas
    secret = await reusable_key(a)
    one, two = await enroll(a, secret, "one"), await enroll(a, secret, "two")
    headers = {"Authorization": f"Bearer {one['token']}"}
    async with a.ws_connect("/api/v1/stream", headers=headers) as ws:
        await receive(ws)
        await ws.send_json(build_paths([dataclasses.replace(ENTRY, peer=two["device"]["id"])]))
        for _ in range(100):
            if await served(b):
                break
            await asyncio.sleep(0.05)
    on_a, on_b = await served(a), await served(b)
    assert [{**p, "age": 0} for p in on_a] == [{**p, "age": 0} for p in on_b]  # real clocks
    assert [(p["reporter"]["name"], p["path_mtu"]) for p in on_b] == [("one", 1280)]
    await refresh(b.app)
    text = generate_latest(b.app[METRICS]).decode()
    assert "wiregate_path_black_holes 1.0" in text
    resp = await b.delete(f"/api/v1/devices/{one['device']['id']}", headers=AUTH)
    assert resp.status == 204
    assert await served(a) == []
