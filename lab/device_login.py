"""Device login through the gateway's API: start a request, approve it, poll it."""

from __future__ import annotations

from typing import Any

import aiohttp

from lab.api_client import AUTH, Client
from lab.fakes import new_key

APPROVER = {"issuer": "https://idp.example", "subject": "alice", "tags": ["tag:laptop"]}


async def start(client: Client, **extra: Any) -> dict[str, Any]:
    body = {"public_key": new_key(), "name": "laptop-1", **extra}
    resp = await client.post("/api/v1/login/requests", json=body)
    assert resp.status == 201, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


async def poll(client: Client, token: str) -> dict[str, Any]:
    resp = await client.post("/api/v1/login/poll", json={"poll_token": token})
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


async def approve(client: Client, code: str, **body: Any) -> aiohttp.ClientResponse:
    path = f"/api/v1/login/requests/{code}/approve"
    return await client.post(path, json={**APPROVER, **body}, headers=AUTH)
