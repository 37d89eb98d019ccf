"""Admin routes for enrollment keys: create (the secret is shown once), list, revoke."""

from __future__ import annotations

from typing import Annotated

from aiohttp import web
from pydantic import Field

from gateway.api.common import StrictModel, admin_actor, key_json, read_json, require_admin
from gateway.appkeys import STORE
from gateway.store import KeySpec

__all__ = ["MAX_EXPIRY", "TAG_PATTERN", "KeyBody", "routes"]

routes = web.RouteTableDef()
TAG_PATTERN = r"^tag:[a-z0-9][a-z0-9-]{0,62}$"
MAX_EXPIRY = 90 * 24 * 3600
MAX_DEVICE_KEY_EXPIRY = 10 * 365 * 24 * 3600
Tag = Annotated[str, Field(pattern=TAG_PATTERN)]


class KeyBody(StrictModel):
    """``POST /api/v1/keys`` request body."""

    tags: Annotated[list[Tag], Field(max_length=32)] = []
    expiry: Annotated[int, Field(ge=1, le=MAX_EXPIRY)] = 3600
    reusable: bool = False
    ephemeral: bool = False
    description: Annotated[str, Field(max_length=255)] = ""
    device_key_expiry: Annotated[int, Field(ge=60, le=MAX_DEVICE_KEY_EXPIRY)] | None = None


@routes.post("/api/v1/keys")
async def create_key(request: web.Request) -> web.Response:
    """Create an enrollment key; the response is the only place its secret appears."""
    actor = admin_actor(request)
    body = await read_json(request, KeyBody)
    spec = KeySpec(
        tags=tuple(dict.fromkeys(body.tags)),
        expiry=float(body.expiry),
        reusable=body.reusable,
        ephemeral=body.ephemeral,
        description=body.description,
        device_key_expiry=None if body.device_key_expiry is None else float(body.device_key_expiry),
    )
    key, secret = await request.app[STORE].create_key(spec, actor=actor)
    return web.json_response({"key": key_json(key), "secret": secret}, status=201)


@routes.get("/api/v1/keys")
async def list_keys(request: web.Request) -> web.Response:
    """Every enrollment key, revoked and expired ones included."""
    require_admin(request)
    keys = await request.app[STORE].list_keys()
    return web.json_response({"keys": [key_json(k) for k in keys]})


@routes.delete("/api/v1/keys/{id}")
async def revoke_key(request: web.Request) -> web.Response:
    """Revoke an enrollment key; devices it enrolled are not affected."""
    actor = admin_actor(request)
    await request.app[STORE].revoke_key(request.match_info["id"], actor=actor)
    return web.Response(status=204)
