"""The gateway's REST API under ``/api/v1``, plus ``/livez`` and ``/readyz``."""

from __future__ import annotations

from aiohttp import web

from gateway.api import (
    audit,
    bootstrap,
    devices,
    enroll,
    keys,
    lifecycle,
    login,
    openapi,
    packages,
    paths,
    policy,
    relay,
    report,
    stream,
)
from gateway.api.common import error_middleware
from gateway.appkeys import DRAINING, STORE
from wiregate.logging import get_logger

__all__ = ["error_middleware", "setup_routes"]

health = web.RouteTableDef()
_log = get_logger("gateway.api")


@health.get("/livez")
async def livez(_request: web.Request) -> web.Response:
    """The process is up and serving."""
    return web.json_response({"status": "ok"})


@health.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """The store answers ``SELECT 1`` and its schema is at the newest migration, and the
    gateway is not shutting down."""
    if request.app[DRAINING].is_set():
        return web.json_response({"status": "draining"}, status=503)
    try:
        ready = await request.app[STORE].ready()
    except Exception as exc:  # a broken database is "not ready", not a crash
        _log.warning("readyz_failed", error=exc.__class__.__name__)
        ready = False
    return web.json_response(
        {"status": "ok" if ready else "unavailable"}, status=200 if ready else 503
    )


def setup_routes(app: web.Application) -> None:
    """Register every API route on ``app``."""
    tables = (
        health,
        enroll.routes,
        devices.routes,
        keys.routes,
        login.routes,
        relay.routes,
        audit.routes,
        lifecycle.routes,
        openapi.routes,
        bootstrap.routes,
        packages.routes,
        policy.routes,
        paths.routes,
        report.routes,
        stream.routes,
    )
    for table in tables:
        app.router.add_routes(table)
    relay.setup(app)
    packages.setup(app)
    paths.setup(app)
