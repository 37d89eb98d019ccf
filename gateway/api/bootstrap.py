"""``GET /bootstrap.sh``: the VM bootstrap script, byte for byte as it ships.

The script is ``deploy/bootstrap.sh`` in the repository; the wheel carries the
same file as ``gateway/api/bootstrap.sh`` (hatch ``force-include``), so the
gateway serves it both from a checkout and when installed. It holds no secret
and is the same for everyone, so it needs no credential: a VM runs

    curl -fsSL https://GATEWAY/bootstrap.sh | sudo sh -s -- --server https://GATEWAY \\
        --auth-key file:/root/wiregate.key
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from aiohttp import web

from wiregate.errors import ConfigError

__all__ = ["CONTENT_TYPE", "routes", "script_bytes", "script_path"]

routes = web.RouteTableDef()
CONTENT_TYPE = "text/x-shellscript"
_PACKAGED = Path(__file__).with_name("bootstrap.sh")
_CHECKOUT = Path(__file__).resolve().parents[2] / "deploy" / "bootstrap.sh"


def script_path() -> Path:
    """The packaged copy when installed from a wheel, else the checkout's deploy/bootstrap.sh."""
    for path in (_PACKAGED, _CHECKOUT):
        if path.is_file():
            return path
    raise ConfigError(
        "bootstrap.sh is missing from this installation",
        hint="reinstall wiregate from its wheel (it ships gateway/api/bootstrap.sh)",
    )


@functools.cache
def script_bytes() -> bytes:
    """The script's bytes, read once per process."""
    return script_path().read_bytes()


@functools.cache
def _etag() -> str:
    return '"' + hashlib.sha256(script_bytes()).hexdigest()[:32] + '"'


@routes.get("/bootstrap.sh")
async def bootstrap_script(request: web.Request) -> web.Response:
    """The VM bootstrap script (``text/x-shellscript``), with an ETag for caches."""
    headers = {"ETag": _etag(), "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if request.headers.get("If-None-Match") == headers["ETag"]:
        return web.Response(status=304, headers=headers)
    return web.Response(
        body=script_bytes(), content_type=CONTENT_TYPE, charset="utf-8", headers=headers
    )
