"""What every page shares: the :class:`WebContext` built at start, cookies and rendering.

The context is built by the app's cleanup context (so a bad key file or an
unreadable client secret stops the gateway at start, not at the first login).
With no issuer configured there is no relying party and the pages say that
single sign-on is not configured.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jinja2
from aiohttp import web

from gateway.api.common import rfc3339
from gateway.appkeys import CLOCK, SETTINGS, STORE, WEB
from gateway.web.humantime import time_tag
from gateway.web.keyfile import load_or_create_session_key
from gateway.web.sessions import PRE_LOGIN_TTL, CookieBox, PreLogin, Session, csrf_token
from identity.oidc import ClientSecret, OidcProvider, OidcRelyingParty
from wiregate.clock import Clock
from wiregate.errors import ConfigError
from wiregate.files import credential_path
from wiregate.logging import get_logger
from wiregate.settings import GatewaySettings, OidcIssuerSettings

__all__ = [
    "CALLBACK_PATH",
    "SESSION",
    "WebContext",
    "build_context",
    "clear_pre_login",
    "clear_session",
    "read_pre_login",
    "read_session",
    "render",
    "set_pre_login",
    "set_session",
    "web_state",
]

CALLBACK_PATH = "/oidc/callback"
_log = get_logger("gateway.web")
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway.web", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_TEMPLATES.filters["time"] = rfc3339
_TEMPLATES.filters["ago"] = time_tag


@dataclass(slots=True)
class WebContext:
    """The pages' configuration and state (one per app)."""

    box: CookieBox
    rp: OidcRelyingParty | None
    issuers: Mapping[str, OidcIssuerSettings]
    public_origin: str
    admin_groups: frozenset[str]
    session_lifetime: float
    secure: bool

    def cookie_name(self, base: str) -> str:
        """``__Host-`` prefixed when served over https (no Domain, Path=/, Secure)."""
        return f"__Host-{base}" if self.secure else base


SESSION = web.RequestKey("web_session", Session)  # set on a request once its cookie opened
_SESSION_COOKIE, _LOGIN_COOKIE = "wiregate_session", "wiregate_login"


async def web_state(app: web.Application) -> AsyncIterator[None]:
    """Build the :class:`WebContext` from the settings when the app starts."""
    app[WEB] = build_context(app[SETTINGS], clock=app[CLOCK])
    yield


def build_context(settings: GatewaySettings, *, clock: Clock) -> WebContext:
    """The pages' context: the cookie key, the relying party (None without issuers)."""
    origin = _origin(settings.public_url)
    rp = None
    if settings.oidc:
        if not origin:
            raise ConfigError(
                "oidc issuers are configured but public_url is not",
                hint="set public_url to what browsers use, e.g. https://gw.example.com",
            )
        providers = [_provider(i, origin + CALLBACK_PATH) for i in settings.oidc]
        rp = OidcRelyingParty(providers, clock=clock)
        _log.info("sso_configured", issuers=[i.name for i in settings.oidc], public_url=origin)
    return WebContext(
        box=CookieBox(load_or_create_session_key(settings.state_dir)),
        rp=rp,
        issuers={i.name: i for i in settings.oidc},
        public_origin=origin,
        admin_groups=frozenset(settings.admin_groups),
        session_lifetime=settings.session_lifetime,
        secure=origin.startswith("https://"),
    )


def _origin(public_url: str) -> str:
    parts = urlsplit(public_url)
    return f"{parts.scheme}://{parts.netloc}" if public_url else ""


def _provider(issuer: OidcIssuerSettings, redirect_uri: str) -> OidcProvider:
    return OidcProvider(
        name=issuer.name,
        issuer=issuer.issuer,
        client_id=issuer.client_id,
        client_secret=_client_secret(issuer),
        redirect_uri=redirect_uri,
        scopes=tuple(issuer.scopes),
        algorithms=tuple(issuer.algorithms),
        insecure_http=issuer.insecure_http,
    )


def _client_secret(issuer: OidcIssuerSettings) -> ClientSecret:
    kind, _, rest = issuer.client_secret.partition(":")
    if kind == "file":
        return ClientSecret.from_file(credential_path(rest, f"issuer {issuer.name}: client_secret"))
    value = os.environ.get(rest, "").strip()
    if not value:
        raise ConfigError(f"issuer {issuer.name}: environment variable {rest} is empty or unset")
    return ClientSecret(value)


# -- cookies -----------------------------------------------------------------------


def _set_cookie(ctx: WebContext, response: web.StreamResponse, base: str, value: str,
                max_age: float) -> None:  # fmt: skip
    response.set_cookie(ctx.cookie_name(base), value, max_age=int(max_age), path="/",
                        secure=ctx.secure, httponly=True, samesite="Lax")  # fmt: skip


def set_session(ctx: WebContext, response: web.StreamResponse, session: Session) -> None:
    """Give the browser ``session`` (it replaces any earlier one)."""
    lifetime = session.expires_at - session.issued_at
    _set_cookie(ctx, response, _SESSION_COOKIE, ctx.box.seal_session(session), lifetime)


def clear_session(ctx: WebContext, response: web.StreamResponse) -> None:
    """Make the browser forget its session."""
    _set_cookie(ctx, response, _SESSION_COOKIE, "", 0)


def set_pre_login(ctx: WebContext, response: web.StreamResponse, pre: PreLogin) -> None:
    """Keep a login in progress in its own short-lived cookie."""
    _set_cookie(ctx, response, _LOGIN_COOKIE, ctx.box.seal_pre_login(pre), PRE_LOGIN_TTL)


def clear_pre_login(ctx: WebContext, response: web.StreamResponse) -> None:
    """Forget the login in progress (it is used once)."""
    _set_cookie(ctx, response, _LOGIN_COOKIE, "", 0)


async def read_session(request: web.Request) -> Session | None:
    """The request's valid session, if any (sessions signed out on any replica are refused)."""
    ctx, now = request.app[WEB], request.app[CLOCK]()
    session = ctx.box.open_session(request.cookies.get(ctx.cookie_name(_SESSION_COOKIE)), now)
    if session is None or await request.app[STORE].session_ended(session.session_id):
        return None
    return session


def read_pre_login(request: web.Request) -> PreLogin | None:
    """The login in progress, if its cookie is valid and young enough."""
    ctx = request.app[WEB]
    value = request.cookies.get(ctx.cookie_name(_LOGIN_COOKIE))
    return ctx.box.open_pre_login(value, request.app[CLOCK]())


# -- rendering -----------------------------------------------------------------------


def render(
    request: web.Request, template: str, *, status: int = 200, **values: Any
) -> web.Response:
    """Render a page; every page knows who is signed in and their CSRF token."""
    session = request.get(SESSION)
    ctx = request.app.get(WEB)
    is_admin = bool(session and ctx and session.in_any(ctx.admin_groups))
    page = _TEMPLATES.get_template(template).render(
        session=session,
        csrf=csrf_token(session) if session else "",
        is_admin=is_admin,
        now=request.app[CLOCK](),
        **values,
    )
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8")
