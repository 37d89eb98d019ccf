"""Signing in and out: ``GET /login``, ``GET /oidc/callback``, ``POST /logout``.

Signing in (:mod:`gateway.web.signin`) sends the browser to the IdP
(authorization code + PKCE S256); the callback checks the login in progress,
makes a brand-new session (new id, new CSRF secret: nothing of an earlier
cookie is reused) and sends the browser back where the login began.
"""

from __future__ import annotations

from importlib.resources import files

from aiohttp import web

from gateway.appkeys import CLOCK, STORE, WEB
from gateway.web.approve import approval_page
from gateway.web.context import (
    CALLBACK_PATH,
    SESSION,
    clear_pre_login,
    clear_session,
    read_pre_login,
    render,
    set_session,
)
from gateway.web.guard import form_post, page, signed_in
from gateway.web.sessions import PreLogin, Session, new_session
from wiregate.errors import Unauthorized, WiregateError
from wiregate.logging import get_logger

__all__ = ["routes"]

routes = web.RouteTableDef()
_log = get_logger("gateway.web.auth")
_CSS = files("gateway.web").joinpath("static/wiregate.css").read_bytes()


@routes.get("/login")
@signed_in
async def login(request: web.Request, _session: Session) -> web.StreamResponse:
    """Signed in: the approval page of ``user_code`` (or ``code``), or a form to type one."""
    code = request.query.get("user_code") or request.query.get("code")
    if not code:
        return render(request, "code_form.html", error=None)
    return await approval_page(request, code)


@routes.get(CALLBACK_PATH)
@page
async def callback(request: web.Request) -> web.StreamResponse:
    """The IdP's redirect back: check it, start a new session, return where the login began."""
    ctx = request.app[WEB]
    if ctx.rp is None:
        return render(request, "not_configured.html", status=503)
    pre = read_pre_login(request)
    try:
        if pre is None:
            raise Unauthorized(
                "this sign-in is unknown here or took too long",
                code="login_expired",
                hint="open the page you wanted again to start a new sign-in",
            )
        session = await _complete(request, pre)
    except WiregateError as exc:
        response = render(request, "error.html", status=exc.status, error=exc)
    else:
        response = web.Response(status=303, headers={"Location": pre.return_to})
        set_session(ctx, response, session)
    clear_pre_login(ctx, response)  # a login in progress is used once, whatever happened
    return response


async def _complete(request: web.Request, pre: PreLogin) -> Session:
    ctx = request.app[WEB]
    assert ctx.rp is not None
    if len(set(request.query.keys())) != len(request.query):
        raise Unauthorized("sign-in refused: repeated parameters", code="invalid_request")
    claims = await ctx.rp.complete_login(pre.start.provider, dict(request.query), pre.start)
    issuer = ctx.issuers[pre.start.provider]
    session = new_session(
        claims,
        groups_claim=issuer.groups_claim,
        lifetime=ctx.session_lifetime,
        now=request.app[CLOCK](),
        keep_first=ctx.admin_groups,
    )
    _log.info("web_signed_in", provider=issuer.name, issuer=session.issuer,
              subject=session.subject, session_id=session.session_id[:8])  # fmt: skip
    return session


@routes.post("/logout")
@form_post
async def logout(request: web.Request, session: Session, _form: object) -> web.StreamResponse:
    """Sign out: this session is refused by every replica from now on and the browser
    forgets it."""
    ctx = request.app[WEB]
    await request.app[STORE].end_session(session.session_id, session.expires_at)
    request.pop(SESSION)
    response = render(request, "signed_out.html")
    clear_session(ctx, response)
    return response


@routes.get("/static/wiregate.css")
@page
async def stylesheet(_request: web.Request) -> web.StreamResponse:
    """The pages' only stylesheet."""
    return web.Response(body=_CSS, content_type="text/css")
