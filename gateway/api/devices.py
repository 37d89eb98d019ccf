"""Admin routes for devices: list, show, delete."""

from __future__ import annotations

from aiohttp import web

from gateway.api.common import admin_actor, device_json, require_admin
from gateway.appkeys import BROKER, STORE
from wiregate.logging import get_logger

__all__ = ["routes"]

routes = web.RouteTableDef()
_log = get_logger("gateway.api.devices")


@routes.get("/api/v1/devices")
async def list_devices(request: web.Request) -> web.Response:
    """Every enrolled device."""
    require_admin(request)
    records = await request.app[STORE].list_devices()
    return web.json_response({"devices": [device_json(r) for r in records]})


@routes.get("/api/v1/devices/{id}")
async def get_device(request: web.Request) -> web.Response:
    """One device by id."""
    require_admin(request)
    record = await request.app[STORE].get_device(request.match_info["id"])
    return web.json_response(device_json(record))


@routes.delete("/api/v1/devices/{id}")
async def delete_device(request: web.Request) -> web.Response:
    """Delete a device: its peers drop it and its own stream is told it was revoked."""
    actor = admin_actor(request)
    device_id = request.match_info["id"]
    version = await request.app[STORE].delete_device(device_id, actor=actor)
    request.app[BROKER].remove(device_id, version)
    _log.info("device_deleted", device_id=device_id, version=version)
    return web.Response(status=204)
