"""The gateway's own installation, for VMs that reach nothing else: a PEP 503 index.

With ``wheelhouse_dir`` set (a directory built by ``wiregate wheelhouse build``):

- ``GET /simple/`` and ``GET /simple/{project}/``: the simple index, each anchor with a
  ``#sha256=`` fragment;
- ``GET /wheels/{file}``: a wheel the index lists (nothing else: no other file of the
  directory, no path outside it);
- ``GET /wheels/requirements-{platform}.txt``: every package pinned, with ``--hash``
  lines, for ``x86_64`` or ``aarch64``; deploy/bootstrap.sh installs with it and
  ``--require-hashes``.

Like ``/bootstrap.sh`` these hold no secret and need no credential. Without
``wheelhouse_dir`` every one of them answers 404 with a hint.
"""

from __future__ import annotations

import hashlib
from importlib import metadata

from aiohttp import web

from gateway.appkeys import SETTINGS, WHEELHOUSE
from gateway.packages import Wheelhouse, load_wheelhouse, normalize
from wiregate.errors import NotFound
from wiregate.logging import get_logger

__all__ = ["routes", "setup"]

routes = web.RouteTableDef()
_log = get_logger("gateway.api.packages")
_NO_STORE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def setup(app: web.Application) -> None:
    """Load the wheelhouse's index when ``wheelhouse_dir`` is set (ConfigError if broken)."""
    directory = app[SETTINGS].wheelhouse_dir
    if directory is None:
        return
    house = load_wheelhouse(directory)
    app[WHEELHOUSE] = house
    served = house.version_of("wiregate")
    try:
        running: str | None = metadata.version("wiregate")
    except metadata.PackageNotFoundError:
        running = None
    _log.info("wheelhouse_loaded", directory=str(directory), wheels=len(house.wheels),
              platforms=list(house.platforms), wiregate=served)  # fmt: skip
    if served is None or (running is not None and served != running):
        _log.warning("wheelhouse_version_differs", gateway=running, wheelhouse=served)


def _house(request: web.Request) -> Wheelhouse:
    house = request.app.get(WHEELHOUSE)
    if house is None:
        raise NotFound(
            "this gateway serves no wheelhouse",
            hint="build one with `wiregate wheelhouse build --out DIR` and set the gateway's "
            "wheelhouse_dir (WIREGATE_WHEELHOUSE_DIR) to DIR",
        )
    return house


def _text(request: web.Request, body: str, content_type: str) -> web.Response:
    """A generated page with a content ETag, answering If-None-Match with 304."""
    data = body.encode("utf-8")
    headers = {"ETag": '"' + hashlib.sha256(data).hexdigest()[:32] + '"', **_NO_STORE}
    if request.headers.get("If-None-Match") == headers["ETag"]:
        return web.Response(status=304, headers=headers)
    return web.Response(body=data, content_type=content_type, charset="utf-8", headers=headers)


@routes.get("/simple/")
async def simple_root(request: web.Request) -> web.Response:
    """Every project of the wheelhouse."""
    return _text(request, _house(request).root_page(), "text/html")


@routes.get("/simple/{project}/")
async def simple_project(request: web.Request) -> web.StreamResponse:
    """The wheels of one project; a name that is not normalized redirects to the one that is."""
    house = _house(request)
    asked = request.match_info["project"]
    project = normalize(asked)
    page = house.project_page(project)
    if page is None:
        raise NotFound(f"no project {asked!r} in this gateway's wheelhouse")
    if project != asked:
        raise web.HTTPMovedPermanently(f"/simple/{project}/")
    return _text(request, page, "text/html")


@routes.get("/wheels/requirements-{platform}.txt")
async def requirements(request: web.Request) -> web.Response:
    """The pinned, hashed requirements of one platform (``uname -m``: x86_64, aarch64)."""
    house = _house(request)
    platform = request.match_info["platform"]
    text = house.requirements(platform)
    if text is None:
        raise NotFound(
            f"this gateway's wheelhouse has no wheels for {platform!r}",
            hint=f"it has: {', '.join(house.platforms) or 'none'}; rebuild it with "
            f"`wiregate wheelhouse build --platform {platform}`",
        )
    return _text(request, text, "text/plain")


@routes.get("/wheels/{file}")
async def wheel(request: web.Request) -> web.StreamResponse:
    """A wheel the index lists; any other name is 404 (the name is looked up, never joined)."""
    house = _house(request)
    name = request.match_info["file"]
    path = house.path_of(name)
    if path is None or not path.is_file():
        raise NotFound(f"no wheel {name!r} in this gateway's wheelhouse")
    headers = {"Content-Type": "application/octet-stream", **_NO_STORE}
    return web.FileResponse(path, headers=headers)
