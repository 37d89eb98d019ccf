"""The admin page: ``GET /admin``, enrollment keys (create, revoke), revoking any device.

Only members of a configured admin group (``admin_groups``, matched against the
session's groups claim) get past :func:`_require_admin`; everyone else gets 403.
A new key's secret is shown once, on the page answering its creation.
"""

from __future__ import annotations

from aiohttp import web
from multidict import MultiDictProxy
from pydantic import ValidationError

from gateway.api.keys import MAX_EXPIRY, KeyBody
from gateway.appkeys import CLOCK, STORE, WEB
from gateway.store import KeySpec
from gateway.web.context import render
from gateway.web.devices import device_view, revoke_device, see_other
from gateway.web.guard import form_post, signed_in
from gateway.web.sessions import Session
from wiregate.errors import BadInput, Forbidden

__all__ = ["EXPIRY_CHOICES", "routes"]

routes = web.RouteTableDef()
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
    """Every device and its identity, every enrollment key."""
    _require_admin(request, session)
    store, now = request.app[STORE], request.app[CLOCK]()
    devices = [device_view(r, now) for r in await store.list_devices()]
    keys = await store.list_keys()
    return render(request, "admin.html", devices=devices, keys=keys, expiry=EXPIRY_CHOICES)


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
    return render(request, "key_created.html", key=key, secret=secret)


@routes.post("/admin/keys/{id}/revoke")
@form_post
async def revoke_key(
    request: web.Request, session: Session, _form: MultiDictProxy[str]
) -> web.StreamResponse:
    """Revoke an enrollment key (devices it enrolled stay)."""
    _require_admin(request, session)
    await request.app[STORE].revoke_key(request.match_info["id"], actor=session.actor)
    return see_other("/admin")


@routes.post("/admin/devices/{id}/revoke")
@form_post
async def revoke_any_device(
    request: web.Request, session: Session, _form: MultiDictProxy[str]
) -> web.StreamResponse:
    """Revoke any device."""
    _require_admin(request, session)
    await revoke_device(request, session, request.match_info["id"])
    return see_other("/admin")
