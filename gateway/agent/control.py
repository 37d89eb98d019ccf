"""The agent's connection to the gateway: enrollment (REST) and the map stream (WebSocket)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from gateway.agent.state import Enrollment
from gateway.errors import ConfigError, RemoteError, Unauthorized, Unavailable, WiregateError

__all__ = ["ControlClient", "read_auth_key"]

_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)


def read_auth_key(spec: str) -> str:
    """Resolve an enrollment key given as ``file:PATH``, ``env:VAR`` or (from env/config) itself."""
    if spec.startswith("file:"):
        path = Path(spec[5:])
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read enrollment key file {path}: {exc.strerror}") from exc
    elif spec.startswith("env:"):
        value = os.environ.get(spec[4:], "").strip()
    else:
        value = spec.strip()
    if not value:
        raise ConfigError(
            "no enrollment key", hint="pass --auth-key file:PATH or set WIREGATE_AUTH_KEY"
        )
    return value


class ControlClient:
    """Talks to one gateway base URL (``http(s)://host:port``)."""

    def __init__(self, server: str, session: aiohttp.ClientSession) -> None:
        self.server = server.rstrip("/")
        self.session = session

    async def enroll(
        self, auth_key: str, public_key: str, name: str, endpoints: list[str], routes: list[str]
    ) -> Enrollment:
        body = {
            "auth_key": auth_key,
            "public_key": public_key,
            "name": name,
            "endpoints": endpoints,
            "routes": routes,
        }
        data = await self._post("/api/v1/enroll", body)
        device = data["device"]
        return Enrollment(
            device_id=str(device["id"]),
            name=str(device["name"]),
            addresses=tuple(str(a) for a in device["addresses"]),
            token=str(data["token"]),
        )

    async def stream(self, token: str, since: int | None) -> AsyncIterator[tuple[Any, Any]]:
        """Open the map stream; yield ``(message, websocket)`` for each JSON message."""
        url = self.server + "/api/v1/stream"
        params = {} if since is None else {"since": str(since)}
        headers = {"Authorization": f"Bearer {token}"}
        try:
            ws = await self.session.ws_connect(url, params=params, headers=headers, heartbeat=20)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise Unauthorized("the gateway no longer accepts this device's token") from exc
            raise Unavailable(f"stream refused by the gateway (HTTP {exc.status})") from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise Unavailable(f"cannot reach the gateway at {self.server}: {exc}") from exc
        async with ws:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                yield json.loads(msg.data), ws

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self.session.post(self.server + path, json=body, timeout=_TIMEOUT) as resp:
                data = await resp.json(content_type=None)
                if resp.status >= 400:
                    raise _api_error(resp.status, data)
                return dict(data)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise Unavailable(f"cannot reach the gateway at {self.server}: {exc}") from exc


def _api_error(status: int, data: Any) -> WiregateError:
    message = data.get("message", "request refused") if isinstance(data, dict) else str(data)
    hint = data.get("hint") if isinstance(data, dict) else None
    if status == 401:
        return Unauthorized(message, hint=hint)
    err = RemoteError(message, hint=hint)
    err.status = status
    return err
