"""Routes for a device's life after enrollment: identities (revoke, disable, enable)
the agent's own key rotation (``POST /api/v1/devices/self/rotate``) and its logout
(``POST /api/v1/devices/self/logout``).

Every removal is pushed to the broker before the response is sent, so an
admin call that returns has already queued the ``remove`` for every viewer and
the ``revoked`` for the device's own stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from aiohttp import web
from pydantic import Field

from gateway.api.common import (
    StrictModel,
    admin_actor,
    bearer_token,
    device_json,
    read_json,
    require_admin,
    rfc3339,
)
from gateway.appkeys import BROKER, STORE
from gateway.mapping.broker import Broker
from gateway.store import IdentityRecord, Removal
from wiregate.errors import BadInput, Unauthorized
from wiregate.logging import get_logger
from wiregate.model import Identity

__all__ = ["RotateBody", "identity_json", "publish_removals", "routes"]

routes = web.RouteTableDef()
_log = get_logger("gateway.api.lifecycle")


class RotateBody(StrictModel):
    """``POST /api/v1/devices/self/rotate`` body: the device's next public key."""

    public_key: Annotated[str, Field(max_length=64)]


def identity_json(record: IdentityRecord) -> dict[str, Any]:
    """The API's IDENTITY object."""
    return {
        "id": record.id,
        "issuer": record.identity.issuer,
        "subject": record.identity.subject,
        "created_at": rfc3339(record.created_at),
        "disabled": record.disabled,
        "devices": record.devices,
    }


def publish_removals(broker: Broker, removals: Sequence[Removal]) -> None:
    """Tell the broker about deleted devices, in version order (agents are told why)."""
    for removal in sorted(removals, key=lambda r: r.version):
        broker.remove(removal.device_id, removal.version, removal.reason)


def _identity_id(request: web.Request) -> int:
    text = request.match_info["id"]
    if not (text.isascii() and text.isdigit() and len(text) <= 12):
        raise BadInput("an identity id is an integer")
    return int(text)


@routes.get("/api/v1/identities")
async def list_identities(request: web.Request) -> web.Response:
    """Every identity (``?issuer=&subject=`` narrows to one), with device counts."""
    require_admin(request)
    issuer, subject = request.query.get("issuer"), request.query.get("subject")
    if (issuer is None) != (subject is None):
        raise BadInput("give issuer and subject together (one identity), or neither (all)")
    store = request.app[STORE]
    if issuer is not None and subject is not None:
        records = [await store.get_identity(Identity(issuer, subject))]
    else:
        records = await store.list_identities()
    return web.json_response({"identities": [identity_json(r) for r in records]})


async def _change(request: web.Request, disabled: bool | None) -> web.Response:
    actor = admin_actor(request)
    ref, store = _identity_id(request), request.app[STORE]
    if disabled is None:
        removals = await store.revoke_identity(ref, actor=actor)
    else:
        removals = await store.set_identity_disabled(ref, disabled, actor=actor)
    publish_removals(request.app[BROKER], removals)
    record = await store.get_identity(ref)
    versions = [r.version for r in removals]
    payload = {
        "identity": identity_json(record),
        "removed": [r.device_id for r in removals],
        "map_version": max(versions) if versions else None,
    }
    return web.json_response(payload)


@routes.delete("/api/v1/identities/{id}")
async def revoke_identity(request: web.Request) -> web.Response:
    """Revoke an identity: every device it owns leaves every map and is told ``revoked``."""
    return await _change(request, None)


@routes.post("/api/v1/identities/{id}/disable")
async def disable_identity(request: web.Request) -> web.Response:
    """Disable an identity: its devices go, and no login or enrollment adds one."""
    return await _change(request, True)


@routes.post("/api/v1/identities/{id}/enable")
async def enable_identity(request: web.Request) -> web.Response:
    """Enable a disabled identity again (its removed devices enroll anew)."""
    return await _change(request, False)


@routes.post("/api/v1/devices/self/rotate")
async def rotate(request: web.Request) -> web.Response:
    """The calling device's next key replaces its key, in one map version.

    Every peer's entry for the device carries the new key with the same allowed
    IPs, and the device's own ``self`` carries it too: its agent switches then.
    """
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("a device bearer token is required", code="invalid_token")
    store = request.app[STORE]
    caller = await store.device_by_token(token)
    body = await read_json(request, RotateBody)
    record, version = await store.rotate_key(caller.device.id, body.public_key)
    request.app[BROKER].upsert(record.device, version)
    _log.info("device_rotated", device_id=record.device.id, version=version)
    return web.json_response({"device": device_json(record), "map_version": version})


@routes.post("/api/v1/devices/self/logout")
async def logout(request: web.Request) -> web.Response:
    """The calling device deletes itself (``wiregate logout``): its peers drop it, its
    addresses return to the pool and its token stops working."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("a device bearer token is required", code="invalid_token")
    store = request.app[STORE]
    caller = await store.device_by_token(token)
    device_id = caller.device.id
    version = await store.delete_device(device_id, actor=f"device:{device_id}")
    request.app[BROKER].remove(device_id, version, "logged out")
    _log.info("device_logged_out", device_id=device_id, version=version)
    return web.json_response({"device_id": device_id, "map_version": version})
