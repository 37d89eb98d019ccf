"""The gateway's single sign-on web pages (server-rendered, no JavaScript).

``/login`` (sign in, then approve or deny a ``wiregate login`` request by its
code), ``/oidc/callback``, ``/devices`` (my devices: rename, revoke), ``/admin``
(admin groups only: every device, enrollment keys), ``/admin/paths`` (admin groups
only: the fragmentation heatmap and each pair's path), ``/admin/report`` (admin
groups only: the evidence report, printable, and its JSON), the console's views
(admin groups only: ``/admin/devices/{id}``, ``/admin/relays``, ``/admin/audit``,
``/admin/policy`` with a draft check, ``/admin/logins``; see
:mod:`~gateway.web.console`) and ``POST /logout``. They are not part of the JSON API
under ``/api/v1`` and not in its OpenAPI document: :data:`PAGES` lists them.

Modules: :mod:`~gateway.web.sessions` (sealed cookies, CSRF tokens; pure),
:mod:`~gateway.web.keyfile` (the cookie key), :mod:`~gateway.web.context`
(configuration, cookies, rendering), :mod:`~gateway.web.guard` (headers,
sign-in and CSRF checks), :mod:`~gateway.web.humantime` ("3 min ago" with the exact
UTC time in a tooltip), and one module of routes per page.
"""

from __future__ import annotations

from aiohttp import web

from gateway.web import admin, approve, auth, console, devices, paths, report
from gateway.web.context import web_state

__all__ = ["PAGES", "setup"]

_TABLES = (auth.routes, approve.routes, devices.routes, admin.routes, paths.routes,
           report.routes, console.routes)  # fmt: skip
PAGES = frozenset(
    (route.method.lower(), route.path)
    for table in _TABLES
    for route in table
    if isinstance(route, web.RouteDef)
)


def setup(app: web.Application) -> None:
    """Register the pages on ``app``; their context is built when the app starts."""
    for table in _TABLES:
        app.router.add_routes(table)
    app.cleanup_ctx.append(web_state)
