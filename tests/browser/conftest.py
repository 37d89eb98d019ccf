"""Browser tests: real Chromium (Playwright) driving a real gateway and a real OpenID Provider.

For the whole session: one OpenID Provider (tests/idp, started by
:func:`tests.integration.conftest.start_idp` with this gateway's redirect URI
registered through ``WIREGATE_IDP_REDIRECT_URIS``), one ``wiregate gateway``
process with SSO configured (admin group ``wiregate-admins``), one headless
Chromium driven by Playwright's async API on the session's event loop (the
sync API would leave its loop running under every later asyncio test). Each
test gets fresh browser contexts, so its own cookies.

In the test IdP any login works; ids starting with ``admin`` are admins.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from tests.integration.conftest import CLIENT_SECRETS, RunningIdp, start_idp

CHROMIUM = "/usr/bin/chromium"
ADMIN_TOKEN = "browser-test-admin-token-0123456789"


@dataclass
class Gateway:
    """A running ``wiregate gateway`` process with SSO configured."""

    url: str
    state_dir: Path
    process: subprocess.Popen[bytes]
    log: Path

    def api(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> tuple[int, Any]:
        """Call the JSON API; ``token`` is a device or admin bearer token."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        return status, json.loads(raw) if raw else None

    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Call an admin route with the admin bearer token."""
        return self.api(method, path, body, token=ADMIN_TOKEN)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def gateway_port() -> int:
    return _free_port()


@pytest.fixture(scope="session")
def sso_idp(gateway_port: int) -> Iterator[RunningIdp]:
    """The OpenID Provider, with the gateway's exact redirect URI registered."""
    redirect = f"http://127.0.0.1:{gateway_port}/oidc/callback"
    with pytest.MonkeyPatch.context() as patch:  # only the provider's process sees it
        patch.setenv("WIREGATE_IDP_REDIRECT_URIS", redirect)
        running = start_idp()
    try:
        yield running
    finally:
        running.stop()


def _config(tmp: Path, port: int, idp: RunningIdp) -> Path:
    secret = tmp / "client-secret"
    secret.write_text(CLIENT_SECRETS["wiregate"] + "\n")
    secret.chmod(0o600)
    token = tmp / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    token.chmod(0o600)
    config = tmp / "gateway.toml"
    config.write_text(f"""
[gateway]
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:{_free_port()}"
admin_socket = "{tmp / "gw.sock"}"
admin_token_file = "{token}"
state_dir = "{tmp / "state"}"
public_url = "http://127.0.0.1:{port}"
admin_groups = ["wiregate-admins"]

[[gateway.oidc]]
name = "corp"
issuer = "{idp.issuer}"
client_id = "wiregate"
client_secret = "file:{secret}"
scopes = ["openid", "email", "profile", "groups"]
insecure_http = true
""")
    return config


def _wait_live(gw: Gateway) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if gw.process.poll() is not None:
            break
        try:
            if gw.api("GET", "/livez")[0] == 200:
                return
        except OSError:
            time.sleep(0.1)
    gw.process.kill()
    pytest.fail("the gateway did not start:\n" + gw.log.read_text()[-3000:])


@pytest.fixture(scope="session")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, gateway_port: int, sso_idp: RunningIdp
) -> Iterator[Gateway]:
    """``wiregate gateway`` with SSO at the test IdP, on a loopback port."""
    tmp = tmp_path_factory.mktemp("sso-gateway")
    config = _config(tmp, gateway_port, sso_idp)
    wiregate = shutil.which("wiregate", path=str(Path(sys.executable).parent))
    assert wiregate is not None, "the wiregate console script is not installed in the venv"
    log = tmp / "gateway.log"
    with log.open("wb") as out:
        env = {**os.environ, "WIREGATE_LOG_FORMAT": "json"}
        process = subprocess.Popen(
            [wiregate, "gateway", "--config", str(config)], stdout=out, stderr=out, env=env
        )
    gw = Gateway(f"http://127.0.0.1:{gateway_port}", tmp / "state", process, log)
    _wait_live(gw)
    try:
        yield gw
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the session (on the session's event loop)."""
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest_asyncio.fixture(loop_scope="session")
async def new_context(browser: Browser) -> AsyncIterator[Callable[[], Awaitable[BrowserContext]]]:
    """Makes fresh browser profiles (no cookies), closed after the test."""
    made: list[BrowserContext] = []

    async def make() -> BrowserContext:
        ctx = await browser.new_context()
        ctx.set_default_timeout(15_000)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        await ctx.close()


@pytest_asyncio.fixture(loop_scope="session")
async def context(new_context: Callable[[], Awaitable[BrowserContext]]) -> BrowserContext:
    """A fresh browser profile (no cookies) for one test."""
    return await new_context()


@pytest_asyncio.fixture(loop_scope="session")
async def page(context: BrowserContext) -> Page:
    return await context.new_page()
