"""My devices: ``GET /devices``, ``POST /devices/{id}/rename`` and ``/devices/{id}/revoke``.

A person sees and changes only the devices enrolled for their own (issuer,
subject); another's device is "not found", exactly like a missing one. A rename
bumps the map (peers see names; a name is a DNS label no other device has); a
revocation is the admin API's DELETE: the store deletes the device and the broker
tells its peers and its own agent. The store records each change in the audit log
as ``oidc:<iss>#<sub>``. The admin page (:mod:`gateway.web.admin`) changes any
device through the same functions: rename, set tags, expire now, revoke.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy

from gateway.api.devices import online_test
from gateway.appkeys import BROKER, CLOCK, STORE
from gateway.store import DeviceRecord
from gateway.web.context import render
from gateway.web.guard import form_post, signed_in
from gateway.web.sessions import Session
from wiregate.errors import NotFound
from wiregate.keys import fingerprint

__all__ = [
    "change_device",
    "device_view",
    "device_views",
    "expire_device",
    "revoke_device",
    "routes",
    "see_other",
]

routes = web.RouteTableDef()


def see_other(path: str) -> web.Response:
    """Post/redirect/get: send the browser to ``path``."""
    return web.Response(status=303, headers={"Location": path})


def device_view(record: DeviceRecord, now: float, online: bool = False) -> dict[str, Any]:
    """What the pages show of a device."""
    d = record.device
    return {
        "id": d.id,
        "name": d.name,
        "issuer": d.identity.issuer,
        "subject": d.identity.subject,
        "addresses": (d.ipv4, d.ipv6),
        "fingerprint": fingerprint(d.public_key),
        "created_at": d.created_at,
        "key_age_days": max(0.0, now - d.created_at) / 86400,
        "expires_at": d.expires_at,
        "last_seen": record.last_seen,
        "tags": d.tags,
        "online": online,
        "agent_version": record.agent_version,
        "agent_os": record.agent_os,
    }


def device_views(request: web.Request, records: Sequence[DeviceRecord]) -> list[dict[str, Any]]:
    """:func:`device_view` of each record, with its presence (see
    :func:`gateway.api.devices.online_test`)."""
    now, online = request.app[CLOCK](), online_test(request.app)
    return [device_view(r, now, online(r)) for r in records]


async def change_device(
    request: web.Request,
    session: Session,
    device_id: str,
    *,
    name: str | None = None,
    tags: Sequence[str] | None = None,
) -> None:
    """Rename a device and/or set its tags as the admin API's PATCH does (a map change)."""
    store = request.app[STORE]
    changed, version = await store.update_device(
        device_id, name=name, tags=tags, actor=session.actor
    )
    request.app[BROKER].upsert(changed.device, version)


async def expire_device(request: web.Request, session: Session, device_id: str) -> None:
    """Expire a device's key now, as the admin API does: its peers drop it."""
    removal = await request.app[STORE].expire_device(device_id, actor=session.actor)
    request.app[BROKER].remove(removal.device_id, removal.version, removal.reason)


async def revoke_device(request: web.Request, session: Session, device_id: str) -> None:
    """Delete a device as the admin API does: its peers drop it, its agent tears down."""
    version = await request.app[STORE].delete_device(device_id, actor=session.actor)
    request.app[BROKER].remove(device_id, version)


async def _own_device(request: web.Request, session: Session) -> DeviceRecord:
    try:
        record = await request.app[STORE].get_device(request.match_info["id"])
    except NotFound:
        record = None
    if record is None or record.device.identity != session.identity:
        raise NotFound("you have no such device", hint="see your devices at /devices")
    return record


@routes.get("/devices")
@signed_in
async def my_devices(request: web.Request, session: Session) -> web.StreamResponse:
    """The signed-in person's devices, with rename and revoke forms."""
    records = await request.app[STORE].devices_of(session.identity)
    return render(request, "devices.html", devices=device_views(request, records))


@routes.post("/devices/{id}/rename")
@form_post
async def rename(
    request: web.Request, session: Session, form: MultiDictProxy[str]
) -> web.StreamResponse:
    """Rename one of my devices."""
    record = await _own_device(request, session)
    name = form.get("name", "").strip()  # the store refuses a name that is not a free label
    await change_device(request, session, record.device.id, name=name)
    return see_other("/devices")


@routes.post("/devices/{id}/revoke")
@form_post
async def revoke(
    request: web.Request, session: Session, _form: MultiDictProxy[str]
) -> web.StreamResponse:
    """Revoke one of my devices: it leaves the network and its token stops working."""
    record = await _own_device(request, session)
    await revoke_device(request, session, record.device.id)
    return see_other("/devices")
