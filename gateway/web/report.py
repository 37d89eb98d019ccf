"""The evidence report in the admin console: ``GET /admin/report`` (printable: a print
stylesheet, no script) and ``GET /admin/report.json`` (the same JSON as
``GET /api/v1/report``, for a signed-in administrator).

Admin groups only, as :mod:`gateway.web.admin`. The period comes from the same
parameters as the API; the page's form sends dates (``YYYY-MM-DD``), read as UTC days
(``until``: the end of that day).
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from multidict import MultiDict

from gateway.api.report import report_for
from gateway.web.admin import _require_admin as require_admin_page
from gateway.web.context import render
from gateway.web.guard import signed_in
from gateway.web.sessions import Session

__all__ = ["query_of", "routes"]

routes = web.RouteTableDef()
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def query_of(request: web.Request) -> MultiDict[str]:
    """The API's query from the page's: a bare date is a UTC day (``until``: its end)."""
    out: MultiDict[str] = MultiDict()
    for name, value in request.query.items():
        if not value:
            continue  # an empty form field: the default
        if _DAY.fullmatch(value) and name == "since":
            value = f"{value}T00:00:00Z"
        elif _DAY.fullmatch(value) and name == "until":
            value = f"{value}T23:59:59Z"
        out.add(name, value)
    return out


async def _report(request: web.Request, session: Session) -> dict[str, Any]:
    require_admin_page(request, session)
    return await report_for(request.app, query_of(request))


@routes.get("/admin/report")
@signed_in
async def report_page(request: web.Request, session: Session) -> web.StreamResponse:
    """The report of a period (default: the last 30 days), as a printable page."""
    report = await _report(request, session)
    since, until = request.query.get("since", ""), request.query.get("until", "")
    return render(request, "report.html", report=report, request_query=request.query_string,
                  since=since, until=until)  # fmt: skip


@routes.get("/admin/report.json")
@signed_in
async def report_json_page(request: web.Request, session: Session) -> web.StreamResponse:
    """The same report as JSON (what ``GET /api/v1/report`` answers)."""
    return web.json_response(await _report(request, session))
