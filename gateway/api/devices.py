"""Admin routes for devices: list (with presence), show, rename and retag, expire, delete;
and ``GET /api/v1/devices/self/whois`` (device token): who owns a device its caller sees.

A device is *online* when its agent holds a map stream: on this gateway, or, with
replicas, on any of them. Each replica records the presence of the agents streaming
from it (``last_seen``, refreshed every ``expiry_sweep_interval``), so another
replica's agent counts as online while its ``last_seen`` is within two intervals;
an agent that went away shows offline on every replica two intervals later at most.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from aiohttp import web
from multidict import MultiMapping
from pydantic import Field, model_validator

from gateway.api.common import (
    StrictModel,
    admin_actor,
    bearer_token,
    device_json,
    read_json,
    require_admin,
)
from gateway.api.keys import Tag
from gateway.appkeys import BROKER, CLOCK, SETTINGS, STORE
from gateway.store import DeviceRecord
from gateway.store.names import LABEL_PATTERN
from gateway.store.records import ADMIN_ISSUER, ENROLLMENT_ISSUER
from wiregate.errors import BadInput, NotFound, Unauthorized
from wiregate.logging import get_logger
from wiregate.model import Identity
from wiregate.settings import GatewaySettings

__all__ = ["DeviceUpdate", "online_test", "owner_json", "routes"]

routes = web.RouteTableDef()
_log = get_logger("gateway.api.devices")
_BOOLS = {"true": True, "false": False}


class DeviceUpdate(StrictModel):
    """``PATCH /api/v1/devices/{id}`` body: a new name, new tags, or both."""

    name: Annotated[str, Field(pattern=LABEL_PATTERN)] | None = None
    tags: Annotated[list[Tag], Field(max_length=32)] | None = None

    @model_validator(mode="after")
    def _something(self) -> DeviceUpdate:
        if self.name is None and self.tags is None:
            raise ValueError("give name, tags or both")
        return self


def online_test(app: web.Application) -> Callable[[DeviceRecord], bool]:
    """Whether a device is online now (see the module docstring)."""
    local = app[BROKER].connected_ids()
    interval = app[SETTINGS].expiry_sweep_interval
    if not app[BROKER].following or interval <= 0:
        return lambda record: record.device.id in local
    since = app[CLOCK]() - 2 * interval

    def online(record: DeviceRecord) -> bool:
        seen = record.last_seen
        return record.device.id in local or (seen is not None and seen >= since)

    return online


def _listed(record: DeviceRecord, online: Callable[[DeviceRecord], bool]) -> dict[str, Any]:
    return {**device_json(record), "online": online(record)}


def _filters(query: MultiMapping[str]) -> list[Callable[[dict[str, Any]], bool]]:
    """The list's query filters: ``tag``, ``online`` (true/false), ``owner`` (a subject)."""
    unknown = set(query) - {"tag", "online", "owner"}
    if unknown:
        raise BadInput(f"unknown filter {sorted(unknown)[0]!r}", hint="filters: tag, online, owner")
    found: list[Callable[[dict[str, Any]], bool]] = []
    tags = set(query.getall("tag", []))
    if tags:
        found.append(lambda d: tags <= set(d["tags"]))
    if "online" in query:
        wanted = _BOOLS.get(query["online"])
        if wanted is None:
            raise BadInput("online must be true or false")
        found.append(lambda d: d["online"] is wanted)
    if "owner" in query:
        owner = query["owner"]
        found.append(lambda d: d["identity"]["subject"] == owner)
    return found


@routes.get("/api/v1/devices")
async def list_devices(request: web.Request) -> web.Response:
    """Every enrolled device with its tags, owner, presence and last seen; filtered by
    ``?tag=``, ``?online=`` and ``?owner=`` when given."""
    require_admin(request)
    filters = _filters(request.query)
    online = online_test(request.app)
    listed = [_listed(r, online) for r in await request.app[STORE].list_devices()]
    return web.json_response({"devices": [d for d in listed if all(f(d) for f in filters)]})


@routes.get("/api/v1/devices/{id}")
async def get_device(request: web.Request) -> web.Response:
    """One device by id."""
    require_admin(request)
    record = await request.app[STORE].get_device(request.match_info["id"])
    return web.json_response(_listed(record, online_test(request.app)))


@routes.patch("/api/v1/devices/{id}")
async def update_device(request: web.Request) -> web.Response:
    """Rename a device and/or replace its tags: one map change every peer receives."""
    actor = admin_actor(request)
    body = await read_json(request, DeviceUpdate)
    tags = None if body.tags is None else tuple(body.tags)
    record, version = await request.app[STORE].update_device(
        request.match_info["id"], name=body.name, tags=tags, actor=actor
    )
    request.app[BROKER].upsert(record.device, version)
    _log.info("device_updated", device_id=record.device.id, version=version)
    return web.json_response({"device": device_json(record), "map_version": version})


@routes.post("/api/v1/devices/{id}/expire")
async def expire_device(request: web.Request) -> web.Response:
    """Expire a device's key now: peers drop it, its agent is told its key expired."""
    actor = admin_actor(request)
    removal = await request.app[STORE].expire_device(request.match_info["id"], actor=actor)
    request.app[BROKER].remove(removal.device_id, removal.version, removal.reason)
    _log.info("device_expired", device_id=removal.device_id, version=removal.version)
    payload = {"device_id": removal.device_id, "reason": removal.reason}
    return web.json_response({**payload, "map_version": removal.version})


@routes.delete("/api/v1/devices/{id}")
async def delete_device(request: web.Request) -> web.Response:
    """Delete a device: its peers drop it and its own stream is told it was revoked."""
    actor = admin_actor(request)
    device_id = request.match_info["id"]
    version = await request.app[STORE].delete_device(device_id, actor=actor)
    request.app[BROKER].remove(device_id, version)
    _log.info("device_deleted", device_id=device_id, version=version)
    return web.Response(status=204)


# -- whois (device token) -------------------------------------------------------------


def owner_json(
    identity: Identity,
    settings: GatewaySettings,
    email: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Who owns a device: its (issuer, subject), what kind of owner that is (``person``,
    ``workload``, ``enrollment-key``, or ``identity`` when the issuer is not configured
    here any more), the configured issuer's name (``via``), and a person's verified
    ``email`` and display ``name`` when known (null otherwise)."""
    issuer, subject = identity.issuer, identity.subject
    kind, via = "identity", None
    if issuer == ENROLLMENT_ISSUER:
        kind = "enrollment-key"
    elif issuer == ADMIN_ISSUER:
        kind, via = "person", "approved by an administrator"
    else:
        bare = issuer.rstrip("/")
        sso = [o.name for o in settings.oidc if o.issuer.rstrip("/") == bare]
        workload = [w for w in settings.workload_issuers if w.issuer.rstrip("/") == bare]
        serviceaccount = subject.startswith("system:serviceaccount:")
        if workload and (not sso or serviceaccount):
            kind, via = "workload", workload[0].name
        elif sso:
            kind, via = "person", sso[0]
    profile = {"email": email, "name": name}
    return {"issuer": issuer, "subject": subject, "kind": kind, "via": via, **profile}


@routes.get("/api/v1/devices/self/whois")
async def whois(request: web.Request) -> web.Response:
    """``?device=ID``: the device (the caller, or one of its peers) with its owner and tags
    (``wiregate whois``). A device the caller does not peer with is not found, like a
    missing one."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("a device bearer token is required", code="invalid_token")
    record = await request.app[STORE].device_by_token(token)
    if set(request.query) != {"device"}:
        raise BadInput("give device=ID, and nothing else")
    broker = request.app[BROKER]
    target_id = request.query["device"]
    try:
        caller, target = broker.device(record.device.id), broker.device(target_id)
    except NotFound:
        raise NotFound(f"no device {target_id!r} among this device's peers") from None
    if target.id != caller.id and not broker.may_peer(caller, target):
        raise NotFound(f"no device {target_id!r} among this device's peers")
    device = {"id": target.id, "name": target.name, "tags": list(target.tags)}
    try:
        known = await request.app[STORE].get_identity(target.identity)
    except NotFound:  # removed since the broker's change: no profile to show
        email = name = None
    else:
        email, name = known.email, known.name
    owner = owner_json(target.identity, request.app[SETTINGS], email, name)
    return web.json_response({"device": device, "owner": owner})
