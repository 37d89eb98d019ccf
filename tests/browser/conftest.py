"""Browser tests: real Chromium (Playwright) driving a real gateway and a real OpenID Provider.

For the whole session: one OpenID Provider (tests/idp, started by
:func:`lab.idp.start_idp` with this gateway's redirect URI
registered through ``WIREGATE_IDP_REDIRECT_URIS``), one ``wiregate gateway``
process with SSO configured (admin group ``wiregate-admins``), one headless
Chromium driven by Playwright's async API on the session's event loop (the
sync API would leave its loop running under every later asyncio test). Each
test gets fresh browser contexts, so its own cookies.

In the test IdP any login works; ids starting with ``admin`` are admins.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from lab.gateway_process import Gateway, stop, wait_live, write_config
from lab.idp import CLIENT_SECRETS, RunningIdp, free_port, start_idp

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def gateway_port() -> int:
    return free_port()


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
    return write_config(
        tmp,
        port,
        free_port(),
        f"""admin_groups = ["wiregate-admins"]

[[gateway.oidc]]
name = "corp"
issuer = "{idp.issuer}"
client_id = "wiregate"
client_secret = "file:{secret}"
scopes = ["openid", "email", "profile", "groups"]
insecure_http = true
""",
    )


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
    try:
        wait_live(gw)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield gw
    finally:
        stop(process)


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
