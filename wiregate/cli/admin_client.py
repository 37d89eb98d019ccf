"""A small client for the gateway's admin API, over its unix socket or over TCP with a token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from wiregate.errors import ConfigError, Unavailable, from_api_response

__all__ = ["AdminClient"]


class AdminClient:
    """Calls ``/api/v1`` admin routes; raises :class:`RemoteError` with the gateway's message."""

    def __init__(
        self,
        *,
        socket: Path | None = None,
        server: str | None = None,
        token_file: Path | None = None,
    ) -> None:
        self._socket = socket
        self._base = (server or "http://gateway").rstrip("/")
        self._headers: dict[str, str] = {}
        if server and token_file is not None:
            try:
                token = token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read admin token file {token_file}") from exc
            self._headers["Authorization"] = f"Bearer {token}"

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        connector = aiohttp.UnixConnector(path=str(self._socket)) if self._socket else None
        where = str(self._socket) if self._socket else self._base
        try:
            async with (
                aiohttp.ClientSession(connector=connector, headers=self._headers) as http,
                http.request(method, self._base + path, json=body) as resp,
            ):
                data = await resp.json(content_type=None) if resp.status != 204 else None
                if resp.status >= 400:
                    raise from_api_response(resp.status, data)
                return data
        except (aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"cannot reach the gateway admin API at {where}: {exc}") from exc
