"""The SSO pages in real Chromium: device approval, my devices, admin, CSRF.

Every sign-in goes through the real OpenID Provider's login and consent pages
(oidc-provider's development interactions); the device side uses the JSON API
exactly as ``wiregate login`` does (create a request, poll it).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest
from playwright.sync_api import BrowserContext, Page

from gateway.web.keyfile import load_or_create_session_key
from gateway.web.sessions import CookieBox
from gateway.wgkey import encode_key, fingerprint, generate_private_key, public_from_private
from identity.enrollment import KEY_PREFIX
from tests.browser.conftest import Gateway
from tests.integration.conftest import RunningIdp

pytestmark = pytest.mark.timeout(120)


def new_public_key() -> str:
    return encode_key(public_from_private(generate_private_key()))


def start_login(gateway: Gateway, name: str) -> dict[str, Any]:
    """What ``wiregate login`` does first: create a login request."""
    status, started = gateway.api(
        "POST", "/api/v1/login/requests", {"public_key": new_public_key(), "name": name}
    )
    assert status == 201, started
    return started


def poll(gateway: Gateway, started: dict[str, Any]) -> dict[str, Any]:
    status, answer = gateway.api(
        "POST", "/api/v1/login/poll", {"poll_token": started["poll_token"]}
    )
    assert status == 200, answer
    return answer


def idp_sign_in(page: Page, idp: RunningIdp, gateway: Gateway, login: str) -> None:
    """At the IdP's development pages: log in as ``login``, consent, back at the gateway."""
    page.wait_for_url(idp.issuer + "/**")
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", "any")
    page.click("button[type=submit]")
    page.click("button:has-text('Continue')")  # consent to openid email profile groups
    page.wait_for_url(gateway.url + "/**")


def sign_in_at(page: Page, idp: RunningIdp, gateway: Gateway, path: str, login: str) -> None:
    page.goto(gateway.url + path)
    idp_sign_in(page, idp, gateway, login)
    assert page.url == gateway.url + path


class StreamWatcher(threading.Thread):
    """An agent's map stream, read in the background until it is told ``revoked``."""

    def __init__(self, gateway: Gateway, token: str) -> None:
        super().__init__(daemon=True)
        self.url = gateway.url.replace("http://", "ws://") + "/api/v1/stream"
        self.token = token
        self.messages: list[dict[str, Any]] = []
        self.connected = threading.Event()

    def run(self) -> None:
        asyncio.run(self._watch())

    async def _watch(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        timeout = aiohttp.ClientWSTimeout(30)
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(self.url, headers=headers, timeout=timeout) as ws,
        ):
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                self.messages.append(json.loads(msg.data))
                self.connected.set()
                if self.messages[-1].get("type") == "revoked":
                    break


def stream_status(gateway: Gateway, token: str) -> int:
    """The HTTP status of opening the stream with ``token`` (101 when it opens)."""

    async def attempt() -> int:
        url = gateway.url.replace("http://", "ws://") + "/api/v1/stream"
        async with aiohttp.ClientSession() as session:
            try:
                ws = await session.ws_connect(url, headers={"Authorization": f"Bearer {token}"})
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status
            await ws.close()
            return 101

    with ThreadPoolExecutor(1) as pool:  # Playwright's loop runs in this thread
        return pool.submit(asyncio.run, attempt()).result(timeout=15)


# -- (a) wiregate login approved in the browser ------------------------------------------


def test_device_login_approved_in_the_browser(
    gateway: Gateway, sso_idp: RunningIdp, page: Page
) -> None:
    started = start_login(gateway, "laptop-alice")
    page.goto(started["verification_uri_complete"])
    idp_sign_in(page, sso_idp, gateway, "alice")
    assert page.url == started["verification_uri_complete"]
    status, shown = gateway.admin("GET", f"/api/v1/login/requests/{started['user_code']}")
    assert status == 200 and shown["status"] == "pending"  # nothing approved by looking
    assert page.text_content("#device-name") == "laptop-alice"
    assert page.text_content("#fingerprint").strip() == shown["fingerprint"]  # type: ignore[union-attr]
    assert shown["fingerprint"] == fingerprint(shown["public_key"])
    page.click("#approve")
    assert page.text_content("#result") == "Device approved"
    answer = poll(gateway, started)
    assert answer["status"] == "approved" and answer["token"]
    device = answer["device"]
    assert device["name"] == "laptop-alice"
    assert device["identity"] == {"issuer": sso_idp.issuer, "subject": "alice"}
    assert stream_status(gateway, answer["token"]) == 101
    page.goto(gateway.url + "/devices")  # the new device is listed as alice's
    assert page.text_content(f"#device-{device['id']} .name") == "laptop-alice"


# -- (b) my devices: rename, revoke ------------------------------------------------------


def _enrolled(gateway: Gateway, idp: RunningIdp, subject: str, name: str) -> dict[str, Any]:
    started = start_login(gateway, name)
    body = {"issuer": idp.issuer, "subject": subject}
    path = f"/api/v1/login/requests/{started['user_code']}/approve"
    assert gateway.admin("POST", path, body)[0] == 200
    answer = poll(gateway, started)
    assert answer["status"] == "approved"
    return answer


def test_my_devices_rename_and_revoke(gateway: Gateway, sso_idp: RunningIdp, page: Page) -> None:
    mine = _enrolled(gateway, sso_idp, "bob", "bob-desktop")
    other = _enrolled(gateway, sso_idp, "erin", "erin-laptop")
    device_id, token = mine["device"]["id"], mine["token"]
    watcher = StreamWatcher(gateway, token)
    watcher.start()
    assert watcher.connected.wait(10), "the device's stream did not open"
    sign_in_at(page, sso_idp, gateway, "/devices", "bob")
    row = f"#device-{device_id}"
    assert page.text_content(f"{row} .name") == "bob-desktop"
    assert page.locator(f"#device-{other['device']['id']}").count() == 0  # only my devices

    page.fill(f"#name-{device_id}", "bob-workstation")
    page.click(f"{row} button.rename")
    assert page.text_content(f"{row} .name") == "bob-workstation"
    assert gateway.admin("GET", f"/api/v1/devices/{device_id}")[1]["name"] == "bob-workstation"

    page.click(f"{row} button.revoke")
    page.wait_for_selector("#no-devices")
    assert page.locator(row).count() == 0
    watcher.join(10)
    assert watcher.messages[-1]["type"] == "revoked", watcher.messages[-1]
    assert stream_status(gateway, token) == 401
    assert gateway.admin("GET", f"/api/v1/devices/{device_id}")[0] == 404
    assert stream_status(gateway, other["token"]) == 101  # erin's device is untouched


# -- (c) the admin page ------------------------------------------------------------------


def test_admin_page_for_admins_only(
    gateway: Gateway, sso_idp: RunningIdp, browser_context_factory: Any
) -> None:
    admin, user = browser_context_factory(), browser_context_factory()
    page = admin.new_page()
    sign_in_at(page, sso_idp, gateway, "/admin", "admin-carol")
    assert page.locator("#all-devices").count() == 1 and page.locator("#keys").count() == 1
    page.fill("#description", "ci runners")
    page.fill("#tags", "tag:ci")
    page.click("#create-key")
    secret = page.text_content("#key-secret") or ""
    key_id = (page.text_content("#key-id") or "").strip()
    assert secret.startswith(KEY_PREFIX)
    keys = {k["id"]: k for k in gateway.admin("GET", "/api/v1/keys")[1]["keys"]}
    assert keys[key_id]["tags"] == ["tag:ci"] and not keys[key_id]["revoked"]
    page.goto(gateway.url + "/admin")
    assert secret not in page.content()  # shown once
    page.click(f"#key-{key_id} button.revoke")
    assert page.text_content(f"#key-{key_id} .state") == "revoked"

    other = user.new_page()
    sign_in_at(other, sso_idp, gateway, "/devices", "dave")
    assert other.locator("a[href='/admin']").count() == 0
    response = other.goto(gateway.url + "/admin")
    assert response is not None and response.status == 403
    assert other.get_attribute("#error", "data-code") == "not_an_admin"
    csrf = other.get_attribute("#sign-out", "form") or ""  # no admin form: post anyway
    refused = other.request.post(gateway.url + "/admin/keys", headers={"Origin": gateway.url},
                                 form={"expiry": "3600", "csrf": csrf})  # fmt: skip
    assert refused.status == 403
    assert len(gateway.admin("GET", "/api/v1/keys")[1]["keys"]) == len(keys)


@pytest.fixture
def browser_context_factory(browser: Any) -> Any:
    made: list[BrowserContext] = []

    def make() -> BrowserContext:
        ctx = browser.new_context()
        ctx.set_default_timeout(15_000)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.close()


# -- (d) CSRF ----------------------------------------------------------------------------


def test_posts_without_the_right_csrf_token_change_nothing(
    gateway: Gateway, sso_idp: RunningIdp, page: Page, context: BrowserContext
) -> None:
    started = start_login(gateway, "frank-laptop")
    page.goto(started["verification_uri_complete"])
    idp_sign_in(page, sso_idp, gateway, "frank")
    assert page.text_content("#device-name") == "frank-laptop"
    code = started["user_code"]

    page.locator("form[action='/login/approve'] input[name=csrf]").evaluate(
        "field => { field.value = 'forged' }"
    )
    with page.expect_response(gateway.url + "/login/approve") as wrong:
        page.click("#approve")
    assert wrong.value.status == 403
    assert page.get_attribute("#error", "data-code") == "bad_csrf"

    missing = context.request.post(gateway.url + "/login/approve", form={"user_code": code},
                                   headers={"Origin": gateway.url})  # fmt: skip
    assert missing.status == 403 and "security token" in missing.text()

    page.goto(started["verification_uri_complete"])  # a real token, from another origin
    token = page.get_attribute("form[action='/login/approve'] input[name=csrf]", "value")
    cross = context.request.post(gateway.url + "/login/approve",
                                 form={"user_code": code, "csrf": token or ""},
                                 headers={"Origin": "http://evil.example"})  # fmt: skip
    assert cross.status == 403

    evil = context.new_page()  # a cross-site page submitting a form to the gateway
    evil.set_content(
        f'<form method="post" action="{gateway.url}/login/approve">'
        f'<input name="user_code" value="{code}"><input name="csrf" value="{token}">'
        '<button id="go">go</button></form>'
    )
    with evil.expect_response(gateway.url + "/login/approve") as forged:
        evil.click("#go")
    assert forged.value.status == 403

    time.sleep(0.1)
    assert poll(gateway, started)["status"] == "pending"  # nothing was approved


# -- sessions: fixation, cookie flags, sign-out --------------------------------------------


def _cookies(context: BrowserContext) -> dict[str, dict[str, Any]]:
    return {c["name"]: dict(c) for c in context.cookies() if c["name"].startswith("wiregate_")}


def test_each_sign_in_makes_a_new_session_unrelated_to_earlier_cookies(
    gateway: Gateway, sso_idp: RunningIdp, context: BrowserContext, page: Page
) -> None:
    box = CookieBox(load_or_create_session_key(gateway.state_dir))
    planted = {"name": "wiregate_session", "value": "planted-by-someone-else", "url": gateway.url}
    context.add_cookies([planted])  # type: ignore[list-item]
    page.goto(gateway.url + "/devices")
    page.wait_for_url(sso_idp.issuer + "/**")
    pre = box.open_pre_login(_cookies(context)["wiregate_login"]["value"], time.time())
    assert pre is not None and pre.return_to == "/devices"
    idp_sign_in(page, sso_idp, gateway, "grace")
    cookies = _cookies(context)
    assert "wiregate_login" not in cookies  # the login in progress is used once
    first = box.open_session(cookies["wiregate_session"]["value"], time.time())
    assert first is not None and first.subject == "grace" and first.groups == ("engineering",)
    assert first.email == "grace@example.test" and first.name == "Test grace"
    carried = {pre.start.state, pre.start.nonce, pre.start.code_verifier, planted["value"]}
    assert not {first.session_id, first.csrf_secret} & carried
    flags = cookies["wiregate_session"]
    assert flags["httpOnly"] and flags["sameSite"] == "Lax" and flags["path"] == "/"

    page.click("#sign-out")
    assert page.text_content("#signed-out") == "Signed out"
    assert "wiregate_session" not in _cookies(context)
    page.goto(gateway.url + "/devices")  # the IdP still knows grace: straight back, new session
    page.wait_for_url(gateway.url + "/devices")
    second = box.open_session(_cookies(context)["wiregate_session"]["value"], time.time())
    assert second is not None and second.subject == "grace"
    assert second.session_id != first.session_id and second.csrf_secret != first.csrf_secret
