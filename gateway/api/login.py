"""Device login routes (``wiregate login``): create a request, poll it, approve or deny it.

The device creates a request and polls with its poll token; an approver names
the request by its user code. Approval is admin-only here; the SSO web page
calls :meth:`~gateway.store.Store.approve_login_request` with the signed-in
identity. An administrator approves either for an identity given in full
(``issuer``, ``subject``) or as a named administrator (``as``: NAME): the device
then belongs to the identity (``wiregate:admin``, NAME) unless an identity is also
given, and the audit log names the approver (``admin:socket#NAME``,
``admin:token#NAME``). The pending requests can be listed (``GET``), without
their codes: only a code's hash is stored, and the code on the device's screen is
what proves an approval is for that device.

Every user-code lookup is charged first to the buckets of :mod:`gateway.api.limits`
(per identity, per source, global), so guessing codes is bounded and a refused
guess changes nothing; so is every new request (per source, with a fair share of
the pending cap). User codes and poll tokens are never logged (log lines name the
request id).
"""

from __future__ import annotations

from typing import Annotated, Any

from aiohttp import web
from pydantic import Field, model_validator

from gateway.api.common import (
    StrictModel,
    admin_actor,
    device_json,
    read_json,
    require_admin,
    rfc3339,
)
from gateway.api.enroll import NAME_PATTERN
from gateway.api.keys import Tag
from gateway.api.limits import charge_guess, charge_login_request
from gateway.appkeys import BROKER, CLOCK, SETTINGS, STORE
from gateway.store import LoginRecord
from gateway.store.records import ADMIN_ISSUER
from identity.device_login import format_user_code
from wiregate.model import Identity

__all__ = ["ADMIN_NAME_PATTERN", "ApproveBody", "LoginBody", "PollBody", "login_json", "routes"]

routes = web.RouteTableDef()
VERIFICATION_PATH = "/login"
ADMIN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$"


class LoginBody(StrictModel):
    """``POST /api/v1/login/requests`` request body."""

    public_key: Annotated[str, Field(max_length=64)]
    name: Annotated[str, Field(pattern=NAME_PATTERN)]


class PollBody(StrictModel):
    """``POST /api/v1/login/poll`` request body."""

    poll_token: Annotated[str, Field(min_length=1, max_length=128)]


class ApproveBody(StrictModel):
    """``POST /api/v1/login/requests/{user_code}/approve`` body: for whom, as whom, which
    tags. ``issuer`` and ``subject`` come together; ``as`` alone binds the device to
    (``wiregate:admin``, NAME)."""

    issuer: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    subject: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    approver: Annotated[str, Field(pattern=ADMIN_NAME_PATTERN)] | None = Field(
        default=None, alias="as"
    )
    tags: Annotated[list[Tag], Field(max_length=32)] = []

    @model_validator(mode="after")
    def _someone(self) -> ApproveBody:
        if (self.issuer is None) != (self.subject is None):
            raise ValueError("give issuer and subject together")
        if self.issuer is None and self.approver is None:
            raise ValueError("give the identity (issuer, subject), as NAME, or both")
        return self

    def owner(self) -> Identity:
        """The identity the approved device belongs to."""
        if self.issuer is not None and self.subject is not None:
            return Identity(self.issuer, self.subject)
        assert self.approver is not None
        return Identity(ADMIN_ISSUER, self.approver)


def login_json(record: LoginRecord) -> dict[str, Any]:
    """The API's LOGIN object: what an approver checks before approving."""
    return {
        "request_id": record.id,
        "name": record.name,
        "public_key": record.public_key,
        "fingerprint": record.fingerprint,
        "status": record.status,
        "created_at": rfc3339(record.created_at),
        "expires_at": rfc3339(record.expires_at),
    }


@routes.post("/api/v1/login/requests")
async def create_request(request: web.Request) -> web.Response:
    """Start a device login; the response is the only place the code and poll token appear."""
    body = await read_json(request, LoginBody)
    source = await charge_login_request(request)
    now = request.app[CLOCK]()
    store = request.app[STORE]
    created = await store.create_login_request(body.public_key, body.name, now, source=source)
    user_code = format_user_code(created.user_code)
    origin = request.app[SETTINGS].public_url or str(request.url.origin())  # what browsers use
    uri = origin + VERIFICATION_PATH
    payload = {
        "request_id": created.record.id,
        "user_code": user_code,
        "verification_uri": uri,
        "verification_uri_complete": f"{uri}?code={user_code}",
        "poll_token": created.poll_token,
        "interval": created.interval,
        "expires_in": round(created.record.expires_at - now),
    }
    return web.json_response(payload, status=201)


@routes.get("/api/v1/login/requests")
async def list_requests(request: web.Request) -> web.Response:
    """The login requests waiting for approval, oldest first (never their codes)."""
    require_admin(request)
    pending = await request.app[STORE].pending_login_requests(request.app[CLOCK]())
    return web.json_response({"requests": [login_json(r) for r in pending]})


@routes.post("/api/v1/login/poll")
async def poll(request: web.Request) -> web.Response:
    """The device's poll; ``approved`` carries its device and token, exactly once."""
    body = await read_json(request, PollBody)
    answer = await request.app[STORE].poll_login_request(body.poll_token, request.app[CLOCK]())
    payload: dict[str, Any] = {"status": answer.status, "interval": answer.interval}
    if answer.record is not None and answer.token is not None:
        payload.update(device=device_json(answer.record), token=answer.token)
    return web.json_response(payload)


@routes.get("/api/v1/login/requests/{user_code}")
async def show_request(request: web.Request) -> web.Response:
    """The pending request a code names: the device's name and key fingerprint."""
    return web.json_response(login_json(await _lookup(request, admin_actor(request))))


@routes.post("/api/v1/login/requests/{user_code}/approve")
async def approve(request: web.Request) -> web.Response:
    """Approve a pending request for an identity (or as a named administrator): its
    device is enrolled."""
    actor = admin_actor(request)
    body = await read_json(request, ApproveBody)
    found = await _lookup(request, actor)
    store, now = request.app[STORE], request.app[CLOCK]()
    approver = None if body.approver is None else Identity(ADMIN_ISSUER, body.approver)
    approved = await store.approve_login_request(
        found.id,
        body.owner(),
        body.tags,
        now,
        keepalive=request.app[SETTINGS].default_keepalive,
        actor=actor if body.approver is None else f"{actor}#{body.approver}",
        approver=approver,
    )
    request.app[BROKER].upsert(approved.record.device, approved.version)
    payload = {"login": login_json(approved.login), "device": device_json(approved.record)}
    return web.json_response({**payload, "map_version": approved.version})


@routes.post("/api/v1/login/requests/{user_code}/deny")
async def deny(request: web.Request) -> web.Response:
    """Deny a pending request; the device's next poll says ``denied``."""
    actor = admin_actor(request)
    found = await _lookup(request, actor)
    now = request.app[CLOCK]()
    denied = await request.app[STORE].deny_login_request(found.id, now, actor=actor)
    return web.json_response(login_json(denied))


async def _lookup(request: web.Request, actor: str) -> LoginRecord:
    await charge_guess(request, actor, admin=True)
    now = request.app[CLOCK]()
    return await request.app[STORE].find_login_request(request.match_info["user_code"], now)
