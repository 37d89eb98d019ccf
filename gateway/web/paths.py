"""The fragmentation heatmap: ``GET /admin/paths`` (devices by devices, colour = path MTU,
black holes marked, grouped by tag) and ``GET /admin/paths/{reporter}/{peer}`` (one
pair: direct or relayed, relay, why, handshake age, RTT, the probe's counts).

Admin groups only, as :mod:`gateway.web.admin`. Server-rendered, no script: the
matrix is a table whose cells carry a class per MTU band
(:func:`gateway.pathmatrix.band`), coloured by the stylesheet.
"""

from __future__ import annotations

from aiohttp import web

from gateway.api.paths import fleet_pairs
from gateway.pathmatrix import MTU_BUCKETS, STALE_AFTER, Matrix, band
from gateway.web.admin import _require_admin as require_admin_page
from gateway.web.context import render
from gateway.web.guard import signed_in
from gateway.web.sessions import Session
from wiregate.errors import NotFound

__all__ = ["routes"]

routes = web.RouteTableDef()
MAX_DRAWN = 200  # devices in one matrix (40 000 cells); ?tag= draws one group's
_LEGEND = (
    [(f"≤ {b}", band(b, False)) for b in MTU_BUCKETS]
    + [(f"> {MTU_BUCKETS[-1]}", "mtu-inf"), ("not probed", "unknown"), ("black hole", "black-hole")]
)  # fmt: skip


@routes.get("/admin/paths")
@signed_in
async def heatmap(request: web.Request, session: Session) -> web.StreamResponse:
    """The matrix of every device's path to each peer (``?tag=``: devices with that tag)."""
    require_admin_page(request, session)
    tag = request.query.get("tag", "")
    nodes, pairs = await fleet_pairs(request.app)
    shown = sorted((n for n in nodes.values() if not tag or tag in n.tags), key=lambda n: n.id)
    drawn = {n.id for n in shown[:MAX_DRAWN]}
    pairs = [p for p in pairs if p.reporter.id in drawn and p.peer.id in drawn]
    matrix = Matrix.build((n for n in shown if n.id in drawn), pairs)
    holes = [p for p in pairs if p.entry.black_hole]
    return render(request, "paths.html", matrix=matrix, holes=holes, legend=_LEGEND,
                  stale_after=STALE_AFTER, tag=tag, left_out=len(shown) - len(drawn),
                  tags=sorted({t for n in nodes.values() for t in n.tags}))  # fmt: skip


@routes.get("/admin/paths/{reporter}/{peer}")
@signed_in
async def pair(request: web.Request, session: Session) -> web.StreamResponse:
    """One pair, both directions as far as reported."""
    require_admin_page(request, session)
    reporter, peer = request.match_info["reporter"], request.match_info["peer"]
    _, pairs = await fleet_pairs(request.app, reporter)
    found = {(p.reporter.id, p.peer.id): p for p in pairs}
    there, back = found.get((reporter, peer)), found.get((peer, reporter))
    if there is None and back is None:
        raise NotFound("no path reported between these devices")
    return render(request, "path_pair.html", views=[v for v in (there, back) if v is not None])
