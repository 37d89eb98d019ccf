"""Approving a device login: the approval page, ``POST /login/approve`` and ``/login/deny``.

The page shows the device's name and its key fingerprint (the person compares
it with what ``wiregate login`` printed) before anything is approved. Every
lookup of a typed code is charged first to the signed-in person's, the source's
and the global bucket of :mod:`gateway.api.limits`, so guessing codes through
the pages is bounded exactly as through the API. An
approval enrolls the device for the signed-in (issuer, subject), with the tags
and groups the policy file's rules give that person (nothing else: the page
offers no tags).
The store records each decision in the audit log as ``oidc:<iss>#<sub>``.
"""

from __future__ import annotations

from aiohttp import web
from multidict import MultiDictProxy

from gateway.api.limits import charge_guess
from gateway.appkeys import BROKER, CLOCK, POLICY, SETTINGS, STORE, WEB
from gateway.store import LoginRecord
from gateway.web.context import SESSION, render
from gateway.web.guard import form_post
from gateway.web.sessions import Session
from identity.device_login import format_user_code, normalize_user_code
from identity.principals import grant_for, stored_tags
from wiregate.errors import BadInput, NotFound

__all__ = ["approval_page", "routes"]

routes = web.RouteTableDef()


async def approval_page(request: web.Request, typed: str) -> web.StreamResponse:
    """The pending request ``typed`` names, to approve or deny; the code form otherwise."""
    try:
        found = await _lookup(request, typed)
    except (BadInput, NotFound) as exc:
        return render(request, "code_form.html", status=exc.status, error=exc)
    code = format_user_code(normalize_user_code(typed))
    return render(request, "approve.html", login=found, user_code=code)


async def _lookup(request: web.Request, typed: str) -> LoginRecord:
    await charge_guess(request, request[SESSION].actor, admin=False)
    now = request.app[CLOCK]()
    return await request.app[STORE].find_login_request(typed, now)


def _policy_tags(request: web.Request, session: Session) -> tuple[str, ...]:
    """What the policy file grants this person (tag rules, ``group:NAME``), from the session.

    The session holds the verified subset of the ID token: ``sub``, the email
    only when verified, and the groups claim under its configured name.
    """
    issuer = next((i for i in request.app[WEB].issuers.values() if i.issuer == session.issuer),
                  None)  # fmt: skip
    verified: dict[str, str | tuple[str, ...]] = {"sub": session.subject}
    verified[issuer.groups_claim if issuer is not None else "groups"] = session.groups
    if session.email is not None:
        verified["email"] = session.email
    return stored_tags(grant_for(request.app[POLICY].document, session.issuer, verified))


@routes.post("/login/approve")
@form_post
async def approve(
    request: web.Request, session: Session, form: MultiDictProxy[str]
) -> web.StreamResponse:
    """Enroll the device of a pending request for the signed-in identity."""
    found = await _lookup(request, form.get("user_code", ""))
    store, now = request.app[STORE], request.app[CLOCK]()
    keepalive = request.app[SETTINGS].default_keepalive
    tags = _policy_tags(request, session)
    approved = await store.approve_login_request(
        found.id, session.identity, tags, now, keepalive=keepalive, actor=session.actor
    )
    await store.set_identity_profile(session.identity, session.email, session.name)
    request.app[BROKER].upsert(approved.record.device, approved.version)
    return render(request, "done.html", title="Device approved", login=found, approved=True)


@routes.post("/login/deny")
@form_post
async def deny(
    request: web.Request, session: Session, form: MultiDictProxy[str]
) -> web.StreamResponse:
    """Deny a pending request; the device's next poll says ``denied``."""
    found = await _lookup(request, form.get("user_code", ""))
    now = request.app[CLOCK]()
    await request.app[STORE].deny_login_request(found.id, now, actor=session.actor)
    return render(request, "done.html", title="Device denied", login=found, approved=False)
