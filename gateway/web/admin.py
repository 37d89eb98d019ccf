"""The admin page: ``GET /admin``, enrollment keys (create, revoke), and any device:
rename, set tags, expire now, revoke.

Only members of a configured admin group (``admin_groups``, matched against the
session's groups claim) get past :func:`_require_admin`; everyone else gets 403.
A new key's secret is shown once, on the page answering its creation.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from aiohttp import web
from multidict import MultiDictProxy
from pydantic import ValidationError

from gateway.api.keys import MAX_EXPIRY, TAG_PATTERN, KeyBody
from gateway.appkeys import STORE, WEB
from gateway.store import KeySpec
from gateway.web.context import render
from gateway.web.devices import (
    change_device,
    device_views,
    expire_device,
    revoke_device,
    see_other,
)
from gateway.web.guard import form_post, signed_in
from gateway.web.sessions import Session
from wiregate.errors import BadInput, Forbidden

__all__ = ["EXPIRY_CHOICES", "matches", "routes"]

routes = web.RouteTableDef()
MAX_TAGS = 32
EXPIRY_CHOICES = {"3600": "1 hour", "86400": "1 day", "604800": "7 days", "2592000": "30 days"}


def _require_admin(request: web.Request, session: Session) -> None:
    if not session.in_any(request.app[WEB].admin_groups):
        raise Forbidden(
            "this page is for administrators",
            code="not_an_admin",
            hint="ask to be added to one of the gateway's admin groups",
        )


@routes.get("/admin")
@signed_in
async def admin(request: web.Request, session: Session) -> web.StreamResponse:
    """Every device and its identity (``?q=``: those matching it), every enrollment key."""
    _require_admin(request, session)
    store = request.app[STORE]
    q = request.query.get("q", "").strip()
    devices = [d for d in device_views(request, await store.list_devices()) if matches(d, q)]
    keys = await store.list_keys()
    return render(request, "admin.html", devices=devices, keys=keys, expiry=EXPIRY_CHOICES, q=q)


def matches(device: dict[str, Any], q: str) -> bool:
    """Whether a :func:`~gateway.web.devices.device_view` matches the search ``q``: every
    word is in its name, id, a tag, its owner, an address, its agent's version or system,
    or is ``online``/``offline``."""
    state = "online" if device["online"] else "offline"
    agent = [device.get("agent_version") or "", device.get("agent_os") or ""]
    fields = [device["name"], device["id"], device["subject"], device["issuer"], state,
              *device["tags"], *device["addresses"], *agent]  # fmt: skip
    text = " ".join(fields).lower()
    return all(w in text if w not in ("online", "offline") else w == state
               for w in q.lower().split())  # fmt: skip


def _key_spec(form: MultiDictProxy[str]) -> KeySpec:
    expiry = form.get("expiry", "")
    if not expiry.isdigit() or not 0 < int(expiry) <= MAX_EXPIRY:
        raise BadInput("choose how long the key stays valid")
    fields = {
        "tags": form.get("tags", "").replace(",", " ").split(),
        "expiry": int(expiry),
        "reusable": form.get("reusable") == "on",
        "ephemeral": form.get("ephemeral") == "on",
        "description": form.get("description", "").strip(),
    }
    try:
        body = KeyBody.model_validate(fields)
    except ValidationError as exc:
        where = ", ".join(str(e["loc"][0]) for e in exc.errors(include_input=False))
        raise BadInput(f"the key's {where} is not valid", hint="tags look like tag:web") from None
    return KeySpec(tuple(dict.fromkeys(body.tags)), float(body.expiry), body.reusable,
                   body.ephemeral, body.description)  # fmt: skip


@routes.post("/admin/keys")
@form_post
async def create_key(
    request: web.Request, session: Session, form: MultiDictProxy[str]
) -> web.StreamResponse:
    """Create an enrollment key; the answer is the only place its secret appears."""
    _require_admin(request, session)
    key, secret = await request.app[STORE].create_key(_key_spec(form), actor=session.actor)
    server = request.app[WEB].public_origin or f"{request.scheme}://{request.host}"
    return render(request, "key_created.html", key=key, secret=secret, server=server)


@routes.post("/admin/keys/{id}/revoke")
@form_post
async def revoke_key(
    request: web.Request, session: Session, _form: MultiDictProxy[str]
) -> web.StreamResponse:
    """Revoke an enrollment key (devices it enrolled stay)."""
    _require_admin(request, session)
    await request.app[STORE].revoke_key(request.match_info["id"], actor=session.actor)
    return see_other("/admin")


def _back(request: web.Request, form: MultiDictProxy[str]) -> str:
    """Where a device form returns: its device's page when sent from there, else /admin."""
    if form.get("back") == "device":
        return f"/admin/devices/{quote(request.match_info['id'], safe='')}"
    return "/admin"


@routes.post("/admin/devices/{id}/revoke")
@form_post
async def revoke_any_device(
    request: web.Request, session: Session, _form: MultiDictProxy[str]
) -> web.StreamResponse:
    """Revoke any device."""
    _require_admin(request, session)
    await revoke_device(request, session, request.match_info["id"])
    return see_other("/admin")


@routes.post("/admin/devices/{id}/rename")
@form_post
async def rename_any_device(
    request: web.Request, session: Session, form: MultiDictProxy[str]
) -> web.StreamResponse:
    """Rename any device (a DNS label no other device has)."""
    _require_admin(request, session)
    name = form.get("name", "").strip()
    await change_device(request, session, request.match_info["id"], name=name)
    return see_other(_back(request, form))


@routes.post("/admin/devices/{id}/tags")
@form_post
async def tag_any_device(
    request: web.Request, session: Session, form: MultiDictProxy[str]
) -> web.StreamResponse:
    """Replace the tags of any device (space or comma separated; empty: none)."""
    _require_admin(request, session)
    tags = form.get("tags", "").replace(",", " ").split()
    if not all(re.fullmatch(TAG_PATTERN, t) for t in tags) or len(tags) > MAX_TAGS:
        raise BadInput("those are not tags", hint="tags look like tag:web, at most 32")
    await change_device(request, session, request.match_info["id"], tags=tags)
    return see_other(_back(request, form))


@routes.post("/admin/devices/{id}/expire")
@form_post
async def expire_any_device(
    request: web.Request, session: Session, _form: MultiDictProxy[str]
) -> web.StreamResponse:
    """Expire the key of any device now: its peers drop it."""
    _require_admin(request, session)
    await expire_device(request, session, request.match_info["id"])
    return see_other("/admin")
