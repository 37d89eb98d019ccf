"""Device login routes (``wiregate login``): create a request, poll it, approve or deny it.

The device creates a request and polls with its poll token; an approver names
the request by its user code. Approval is admin-only here; the SSO web page
calls :meth:`~gateway.store.Store.approve_login_request` with the signed-in
identity. Every user-code lookup is charged first to the buckets of
:mod:`gateway.api.limits` (per identity, per source, global), so guessing codes
is bounded and a refused guess changes nothing; so is every new request (per
source, with a fair share of the pending cap). User codes
and poll tokens are never logged (log lines name the request id).
"""

from __future__ import annotations

from typing import Annotated, Any

from aiohttp import web
from pydantic import Field

from gateway.api.common import (
    StrictModel,
    admin_actor,
    device_json,
    read_json,
    rfc3339,
)
from gateway.api.enroll import NAME_PATTERN
from gateway.api.keys import Tag
from gateway.api.limits import charge_guess, charge_login_request
from gateway.appkeys import BROKER, CLOCK, SETTINGS, STORE
from gateway.store import LoginRecord
from identity.device_login import format_user_code
from wiregate.model import Identity

__all__ = ["ApproveBody", "LoginBody", "PollBody", "login_json", "routes"]

routes = web.RouteTableDef()
VERIFICATION_PATH = "/login"


class LoginBody(StrictModel):
    """``POST /api/v1/login/requests`` request body."""

    public_key: Annotated[str, Field(max_length=64)]
    name: Annotated[str, Field(pattern=NAME_PATTERN)]


class PollBody(StrictModel):
    """``POST /api/v1/login/poll`` request body."""

    poll_token: Annotated[str, Field(min_length=1, max_length=128)]


class ApproveBody(StrictModel):
    """``POST /api/v1/login/requests/{user_code}/approve`` body: who approves, which tags."""

    issuer: Annotated[str, Field(min_length=1, max_length=512)]
    subject: Annotated[str, Field(min_length=1, max_length=512)]
    tags: Annotated[list[Tag], Field(max_length=32)] = []


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
    """Approve a pending request for an identity: its device is enrolled."""
    actor = admin_actor(request)
    body = await read_json(request, ApproveBody)
    found = await _lookup(request, actor)
    store, now = request.app[STORE], request.app[CLOCK]()
    approved = await store.approve_login_request(
        found.id,
        Identity(body.issuer, body.subject),
        body.tags,
        now,
        keepalive=request.app[SETTINGS].default_keepalive,
        actor=actor,
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
