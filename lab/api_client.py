"""Helpers for driving the gateway's HTTP API in-process (aiohttp's test client)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.appkeys import STORE
from gateway.mapping.broker import Broker
from identity.policy import Policy
from lab.fakes import new_key
from wiregate.model import Device
from wiregate.settings import GatewaySettings

ADMIN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


class RecordingBroker(Broker):
    """The real broker, also recording what the API tells it."""

    def __init__(self, policy: Policy | None = None) -> None:
        super().__init__(policy)
        self.events: list[tuple[str, str, int]] = []
        self.reasons: list[str] = []
        self.closed = False

    def upsert(self, device: Device, version: int) -> None:
        self.events.append(("upsert", device.id, version))
        super().upsert(device, version)

    def remove(self, device_id: str, version: int, reason: str = "device removed") -> None:
        self.events.append(("remove", device_id, version))
        self.reasons.append(reason)
        super().remove(device_id, version, reason)

    async def close(self) -> None:
        self.closed = True
        await super().close()


def make_settings(tmp_path: Path, *, token: bool = True, **kw: Any) -> GatewaySettings:
    token_file = None
    if token:
        token_file = tmp_path / "admin.token"
        token_file.write_text(ADMIN + "\n")
        token_file.chmod(0o600)
    return GatewaySettings(
        state_dir=tmp_path / "state",
        admin_token_file=token_file,
        admin_socket=tmp_path / "run" / "gw.sock",
        max_body_bytes=4096,
        **kw,
    )


async def snapshot(client: Client) -> tuple[int, list[tuple[int, bool]], int]:
    """What a refused request must not change: devices, key uses, map version."""
    store = client.app[STORE]
    keys = [(k.used_count, k.revoked) for k in await store.list_keys()]
    return len(await store.list_devices()), keys, await store.map_version()


async def create_key(client: Client, **body: Any) -> dict[str, Any]:
    resp = await client.post("/api/v1/keys", json=body, headers=AUTH)
    assert resp.status == 201, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


async def enroll(client: Client, secret: str, **extra: Any) -> aiohttp.ClientResponse:
    body = {"auth_key": secret, "public_key": new_key(), "name": "vm-1", **extra}
    return await client.post("/api/v1/enroll", json=body)


async def assert_refused(client: Client, resp: aiohttp.ClientResponse, status: int) -> None:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) <= {"error", "message", "hint"} and body["error"] and body["message"]
