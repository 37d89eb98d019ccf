"""``GET /bootstrap.sh`` serves deploy/bootstrap.sh byte for byte, from a checkout and
from the built wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.api import bootstrap
from gateway.app import create_app
from wiregate.settings import GatewaySettings

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "deploy" / "bootstrap.sh"

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]


async def _client(aiohttp_client: ClientFactory, tmp_path: Path) -> Client:
    settings = GatewaySettings(state_dir=tmp_path / "state", admin_socket=tmp_path / "gw.sock")
    return await aiohttp_client(create_app(settings))


async def test_the_gateway_serves_the_script(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await _client(aiohttp_client, tmp_path)
    resp = await client.get("/bootstrap.sh")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/x-shellscript; charset=utf-8"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert await resp.read() == SCRIPT.read_bytes()
    again = await client.get("/bootstrap.sh", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status == 304 and await again.read() == b""
    stale = await client.get("/bootstrap.sh", headers={"If-None-Match": '"other"'})
    assert stale.status == 200


async def test_no_credential_and_no_other_methods(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    assert (await client.post("/bootstrap.sh")).status == 405
    assert (await client.head("/bootstrap.sh")).status == 200


def test_the_checkout_serves_deploy_bootstrap_sh() -> None:
    assert bootstrap.script_path() == SCRIPT  # no packaged copy inside a checkout
    assert bootstrap.script_bytes() == SCRIPT.read_bytes()


def test_the_wheel_carries_the_same_bytes(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("wiregate-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("gateway/api/bootstrap.sh") == SCRIPT.read_bytes()
        assert "gateway/api/bootstrap.py" in zf.namelist()
