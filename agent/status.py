"""The agent's local status endpoint: HTTP on a unix socket (0600) read by ``wiregate status``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from wiregate.errors import Unavailable

__all__ = ["fetch_status", "serve_status"]


class _HasStatus(Protocol):
    def status(self) -> dict[str, Any]: ...


async def serve_status(
    path: Path, agent: _HasStatus, routes: Iterable[web.RouteDef] = ()
) -> web.AppRunner:
    """Serve ``GET /status`` (and ``routes``: the control channel, :mod:`agent.control`)
    on the unix socket ``path``; return the runner to clean up."""

    async def handler(_: web.Request) -> web.Response:
        return web.json_response(agent.status())

    app = web.Application()
    app.router.add_get("/status", handler)
    app.router.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    path.unlink(missing_ok=True)
    old = os.umask(0o177)
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old)
    return runner


async def fetch_status(path: Path) -> dict[str, Any]:
    """Ask a running agent for its status."""
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as http,
            http.get("http://agent/status", timeout=aiohttp.ClientTimeout(total=10)) as resp,
        ):
            return dict(await resp.json())
    except (aiohttp.ClientError, OSError) as exc:
        raise Unavailable(
            f"no agent answers on {path}", hint="is `wiregate agent` running with this --run-dir?"
        ) from exc
