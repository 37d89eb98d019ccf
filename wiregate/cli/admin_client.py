"""A small client for the gateway's admin API, over its unix socket or over TCP with a token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from wiregate.errors import ConfigError, Unavailable, from_api_response
from wiregate.files import credential_path
from wiregate.tls import client_context, tls_refusal

__all__ = ["AdminClient"]


class AdminClient:
    """Calls ``/api/v1`` admin routes; raises :class:`RemoteError` with the gateway's message."""

    def __init__(
        self,
        *,
        socket: Path | None = None,
        server: str | None = None,
        token_file: Path | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self._socket = socket
        self._ca_file = ca_file  # HTTPS to `server`: trusted besides the system's CAs
        self._base = (server or "http://gateway").rstrip("/")
        self._headers: dict[str, str] = {}
        if server and token_file is not None:
            token_file = credential_path(token_file, "admin token file")
            try:
                token = token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read admin token file {token_file}") from exc
            self._headers["Authorization"] = f"Bearer {token}"

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        connector: aiohttp.BaseConnector = (
            aiohttp.UnixConnector(path=str(self._socket))
            if self._socket
            else aiohttp.TCPConnector(ssl=client_context(self._ca_file))
        )
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
            refusal = tls_refusal(where, exc)
            if refusal is not None:
                raise Unavailable(refusal, code="tls") from exc
            hint = (
                "is the gateway running there? give the gateway's --config FILE or --socket PATH"
                if self._socket
                else "is the gateway running at that URL?"
            )
            raise Unavailable(
                f"cannot reach the gateway admin API at {where}: {exc}", hint=hint
            ) from exc
