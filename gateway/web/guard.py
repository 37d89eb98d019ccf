"""Every page's wrapping: security headers, HTML errors, sign-in and CSRF checks.

* :func:`page` — security headers on every answer (CSP ``default-src 'self'``,
  no framing, no referrer to other origins, no caching) and errors rendered as
  an HTML page with their status (never JSON, never a traceback; an unexpected
  failure is a logged 500 page).
* :func:`signed_in` — the session is required; without one a GET starts a
  sign-in that returns to the same page.
* :func:`form_post` — for every POST: the request must come from our own origin
  (``Origin``, else ``Referer``), a session must exist and the form's CSRF token
  must be the session's. Any failure is 403 and nothing is changed.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from gateway.appkeys import WEB
from gateway.web.context import SESSION, read_session, render
from gateway.web.sessions import Session, csrf_matches, same_origin
from gateway.web.signin import sign_in
from wiregate.errors import Forbidden, RemoteError, WiregateError
from wiregate.logging import get_logger

__all__ = ["SECURITY_HEADERS", "FormHandler", "SessionHandler", "form_post", "page", "signed_in"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SessionHandler = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]
FormHandler = Callable[[web.Request, Session, MultiDictProxy[str]], Awaitable[web.StreamResponse]]

# Referrer-Policy is same-origin, not no-referrer: under no-referrer browsers send
# "Origin: null" with form POSTs, which would defeat the same-origin check.
# Nothing reaches another origin either way.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_log = get_logger("gateway.web")
_INTERNAL = WiregateError("internal error", hint="try again; the gateway's log has the details")


def page(handler: Handler) -> Handler:
    """Security headers on the answer; errors become an HTML page with their status."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            session = await read_session(request) if WEB in request.app else None
            if session is not None:
                request[SESSION] = session
            response = await handler(request)
        except WiregateError as exc:
            response = _error_page(request, exc)
        except web.HTTPException as exc:  # e.g. 413 from aiohttp for an oversized form
            if exc.status < 400:
                raise
            response = _error_page(request, _http_error(exc))
        except Exception:
            _log.exception("page_failed", route=_route(request))
            response = _error_page(request, _INTERNAL)
        response.headers.update(SECURITY_HEADERS)
        return response

    return wrapped


def _error_page(request: web.Request, exc: WiregateError) -> web.Response:
    _log.info("page_refused", route=_route(request), status=exc.status, error=exc.code)
    return render(request, "error.html", status=exc.status, error=exc)


def _http_error(exc: web.HTTPException) -> RemoteError:
    error = RemoteError(exc.reason or "request refused", code=f"http_{exc.status}")
    error.status = exc.status
    return error


def signed_in(handler: SessionHandler) -> Handler:
    """A GET page for signed-in people; others are sent to sign in and come back."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        session = request.get(SESSION)
        if session is None:
            return await sign_in(request)
        return await handler(request, session)

    return page(wrapped)


def form_post(handler: FormHandler) -> Handler:
    """A POST from our own pages, by a signed-in person, with the right CSRF token."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        ctx = request.app[WEB]
        headers = request.headers
        if not same_origin(ctx.public_origin, headers.get("Origin"), headers.get("Referer")):
            raise _refused(request, "cross_origin", "this form was not sent from this site")
        form = await request.post()
        session = request.get(SESSION)
        if session is None:
            raise _refused(request, "no_session", "you are not signed in (or your session ended)")
        if not csrf_matches(session, form.get("csrf")):
            raise _refused(request, "bad_csrf", "the form's security token is missing or wrong")
        return await handler(request, session, _text_fields(form))

    return page(wrapped)


def _text_fields(
    form: MultiDictProxy[str | bytes | bytearray | web.FileField],
) -> MultiDictProxy[str]:
    return MultiDictProxy(MultiDict((k, v) for k, v in form.items() if isinstance(v, str)))


def _refused(request: web.Request, code: str, message: str) -> Forbidden:
    _log.warning("form_refused", route=_route(request), reason=code)
    return Forbidden(message, code=code, hint="nothing was changed; reload the page and try again")


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"
