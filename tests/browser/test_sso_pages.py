"""The SSO pages in real Chromium: device approval, my devices, admin, CSRF, sessions.

Every sign-in goes through the real OpenID Provider's login and consent pages
(oidc-provider's development interactions); the device side uses the JSON API
exactly as ``wiregate login`` does (create a request, poll it). The JSON calls
are small blocking ``urllib`` calls to the gateway process, fine in a test.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from playwright.async_api import BrowserContext, Page

from gateway.web.keyfile import load_or_create_session_key
from gateway.web.sessions import CookieBox
from identity.enrollment import KEY_PREFIX
from lab.gateway_process import Gateway
from lab.idp import RunningIdp
from wiregate.keys import encode_key, fingerprint, generate_private_key, public_from_private

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(120)]
NewContext = Callable[[], Awaitable[BrowserContext]]


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


async def idp_sign_in(page: Page, idp: RunningIdp, gateway: Gateway, login: str) -> None:
    """At the IdP's development pages: log in as ``login``, consent, back at the gateway."""
    await page.wait_for_url(idp.issuer + "/**")
    await page.fill("input[name=login]", login)
    await page.fill("input[name=password]", "any")
    await page.click("button[type=submit]")
    await page.click("button:has-text('Continue')")  # consent: openid email profile groups
    await page.wait_for_url(gateway.url + "/**")


async def sign_in_at(page: Page, idp: RunningIdp, gateway: Gateway, path: str, login: str) -> None:
    await page.goto(gateway.url + path)
    await idp_sign_in(page, idp, gateway, login)
    assert page.url == gateway.url + path


async def text(page: Page, selector: str) -> str:
    return ((await page.text_content(selector)) or "").strip()


class StreamWatcher:
    """An agent's map stream, read in the background until it is told ``revoked``."""

    def __init__(self, gateway: Gateway, token: str) -> None:
        self.url = gateway.url.replace("http://", "ws://") + "/api/v1/stream"
        self.token = token
        self.messages: list[dict[str, Any]] = []
        self.connected = asyncio.Event()
        self.task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(self.url, headers=headers) as ws,
        ):
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                self.messages.append(json.loads(msg.data))
                self.connected.set()
                if self.messages[-1].get("type") == "revoked":
                    break


async def stream_status(gateway: Gateway, token: str) -> int:
    """The HTTP status of opening the stream with ``token`` (101 when it opens)."""
    url = gateway.url.replace("http://", "ws://") + "/api/v1/stream"
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(url, headers={"Authorization": f"Bearer {token}"})
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


# -- (a) wiregate login approved in the browser ------------------------------------------


async def test_device_login_approved_in_the_browser(
    gateway: Gateway, sso_idp: RunningIdp, page: Page
) -> None:
    started = start_login(gateway, "laptop-alice")
    await page.goto(started["verification_uri_complete"])
    await idp_sign_in(page, sso_idp, gateway, "alice")
    assert page.url == started["verification_uri_complete"]
    status, shown = gateway.admin("GET", f"/api/v1/login/requests/{started['user_code']}")
    assert status == 200 and shown["status"] == "pending"  # nothing approved by looking
    assert await text(page, "#device-name") == "laptop-alice"
    assert await text(page, "#fingerprint") == shown["fingerprint"]
    assert shown["fingerprint"] == fingerprint(shown["public_key"])
    await page.click("#approve")
    assert await text(page, "#result") == "Device approved"
    answer = poll(gateway, started)
    assert answer["status"] == "approved" and answer["token"]
    device = answer["device"]
    assert device["name"] == "laptop-alice"
    assert device["identity"] == {"issuer": sso_idp.issuer, "subject": "alice"}
    assert await stream_status(gateway, answer["token"]) == 101
    await page.goto(gateway.url + "/devices")  # the new device is listed as alice's
    assert await text(page, f"#device-{device['id']} .name") == "laptop-alice"
    session_cookie = next(c["value"] for c in await page.context.cookies()
                          if c["name"] == "wiregate_session")  # fmt: skip
    logged = gateway.log.read_text()
    assert '"event": "web_signed_in"' in logged and '"subject": "alice"' in logged
    for secret in (started["user_code"], started["poll_token"], answer["token"], session_cookie):
        assert secret not in logged
    alice = f"oidc:{sso_idp.issuer}#alice"
    assert ("login.approve", started["request_id"]) in audit_of(gateway, alice)


# -- (b) my devices: rename, revoke ------------------------------------------------------


def audit_of(gateway: Gateway, actor: str) -> list[tuple[str, str]]:
    """(action, target) of the audit log's events by ``actor``, oldest first."""
    status, log = gateway.admin("GET", "/api/v1/audit?limit=1000")
    assert status == 200, log
    newest_first = [(e["action"], e["target"]) for e in log["events"] if e["actor"] == actor]
    return newest_first[::-1]


def _enrolled(gateway: Gateway, idp: RunningIdp, subject: str, name: str) -> dict[str, Any]:
    started = start_login(gateway, name)
    body = {"issuer": idp.issuer, "subject": subject}
    path = f"/api/v1/login/requests/{started['user_code']}/approve"
    assert gateway.admin("POST", path, body)[0] == 200
    answer = poll(gateway, started)
    assert answer["status"] == "approved"
    return answer


async def test_my_devices_rename_and_revoke(
    gateway: Gateway, sso_idp: RunningIdp, page: Page
) -> None:
    mine = _enrolled(gateway, sso_idp, "bob", "bob-desktop")
    other = _enrolled(gateway, sso_idp, "erin", "erin-laptop")
    device_id, token = mine["device"]["id"], mine["token"]
    watcher = StreamWatcher(gateway, token)
    await asyncio.wait_for(watcher.connected.wait(), 10)
    await sign_in_at(page, sso_idp, gateway, "/devices", "bob")
    row = f"#device-{device_id}"
    assert await text(page, f"{row} .name") == "bob-desktop"
    assert await page.locator(f"#device-{other['device']['id']}").count() == 0  # only mine

    await page.fill(f"#name-{device_id}", "bob-workstation")
    await page.click(f"{row} button.rename")
    assert await text(page, f"{row} .name") == "bob-workstation"
    assert gateway.admin("GET", f"/api/v1/devices/{device_id}")[1]["name"] == "bob-workstation"

    await page.click(f"{row} button.revoke")
    await page.wait_for_selector("#no-devices")
    assert await page.locator(row).count() == 0
    await asyncio.wait_for(watcher.task, 10)
    assert watcher.messages[-1]["type"] == "revoked", watcher.messages[-1]
    assert await stream_status(gateway, token) == 401
    assert gateway.admin("GET", f"/api/v1/devices/{device_id}")[0] == 404
    assert await stream_status(gateway, other["token"]) == 101  # erin's device is untouched
    bob = f"oidc:{sso_idp.issuer}#bob"
    assert audit_of(gateway, bob) == [("device.rename", device_id), ("device.delete", device_id)]


# -- (c) the admin page ------------------------------------------------------------------


async def test_admin_page_for_admins_only(
    gateway: Gateway, sso_idp: RunningIdp, new_context: NewContext
) -> None:
    page = await (await new_context()).new_page()
    await sign_in_at(page, sso_idp, gateway, "/admin", "admin-carol")
    assert await page.locator("#all-devices").count() == 1
    await page.fill("#description", "ci runners")
    await page.fill("#tags", "tag:ci")
    await page.click("#create-key")
    secret, key_id = await text(page, "#key-secret"), await text(page, "#key-id")
    assert secret.startswith(KEY_PREFIX)
    keys = {k["id"]: k for k in gateway.admin("GET", "/api/v1/keys")[1]["keys"]}
    assert keys[key_id]["tags"] == ["tag:ci"] and not keys[key_id]["revoked"]
    await page.goto(gateway.url + "/admin")
    assert secret not in await page.content()  # shown once
    await page.click(f"#key-{key_id} button.revoke")
    assert await text(page, f"#key-{key_id} .state") == "revoked"

    user = await new_context()
    other = await user.new_page()
    await sign_in_at(other, sso_idp, gateway, "/devices", "dave")
    assert await other.locator("a[href='/admin']").count() == 0
    response = await other.goto(gateway.url + "/admin")
    assert response is not None and response.status == 403
    assert await other.get_attribute("#error", "data-code") == "not_an_admin"
    csrf = await other.get_attribute("form[action='/logout'] input[name=csrf]", "value")
    refused = await user.request.post(gateway.url + "/admin/keys", headers={"Origin": gateway.url},
                                      form={"expiry": "3600", "csrf": csrf or ""})  # fmt: skip
    assert refused.status == 403  # a valid session and token, but not an admin
    assert len(gateway.admin("GET", "/api/v1/keys")[1]["keys"]) == len(keys)


# -- (d) CSRF ----------------------------------------------------------------------------


async def test_posts_without_the_right_csrf_token_change_nothing(
    gateway: Gateway, sso_idp: RunningIdp, page: Page, context: BrowserContext
) -> None:
    started = start_login(gateway, "frank-laptop")
    await page.goto(started["verification_uri_complete"])
    await idp_sign_in(page, sso_idp, gateway, "frank")
    assert await text(page, "#device-name") == "frank-laptop"
    code = started["user_code"]

    await page.locator("form[action='/login/approve'] input[name=csrf]").evaluate(
        "field => { field.value = 'forged' }"
    )
    async with page.expect_response(gateway.url + "/login/approve") as wrong:
        await page.click("#approve")
    assert (await wrong.value).status == 403
    assert await page.get_attribute("#error", "data-code") == "bad_csrf"

    missing = await context.request.post(gateway.url + "/login/approve",
                                         form={"user_code": code},
                                         headers={"Origin": gateway.url})  # fmt: skip
    assert missing.status == 403 and "security token" in await missing.text()

    await page.goto(started["verification_uri_complete"])  # a real token, from another origin
    token = await page.get_attribute("form[action='/login/approve'] input[name=csrf]", "value")
    cross = await context.request.post(gateway.url + "/login/approve",
                                       form={"user_code": code, "csrf": token or ""},
                                       headers={"Origin": "http://evil.example"})  # fmt: skip
    assert cross.status == 403

    evil = await context.new_page()  # a cross-site page submitting a form to the gateway
    await evil.set_content(
        f'<form method="post" action="{gateway.url}/login/approve">'
        f'<input name="user_code" value="{code}"><input name="csrf" value="{token}">'
        '<button id="go">go</button></form>'
    )
    async with evil.expect_response(gateway.url + "/login/approve") as forged:
        await evil.click("#go")
    assert (await forged.value).status == 403

    assert poll(gateway, started)["status"] == "pending"  # nothing was approved


# -- sessions: fixation, cookie flags, sign-out --------------------------------------------


async def _cookies(context: BrowserContext) -> dict[str, dict[str, Any]]:
    cookies = await context.cookies()
    return {c["name"]: dict(c) for c in cookies if c["name"].startswith("wiregate_")}


async def test_each_sign_in_makes_a_new_session_unrelated_to_earlier_cookies(
    gateway: Gateway, sso_idp: RunningIdp, context: BrowserContext, page: Page
) -> None:
    box = CookieBox(load_or_create_session_key(gateway.state_dir))
    planted = "planted-by-someone-else"
    await context.add_cookies([{"name": "wiregate_session", "value": planted, "url": gateway.url}])
    await page.goto(gateway.url + "/devices")
    await page.wait_for_url(sso_idp.issuer + "/**")
    pre = box.open_pre_login((await _cookies(context))["wiregate_login"]["value"], time.time())
    assert pre is not None and pre.return_to == "/devices"
    await idp_sign_in(page, sso_idp, gateway, "grace")
    cookies = await _cookies(context)
    assert "wiregate_login" not in cookies  # the login in progress is used once
    first = box.open_session(cookies["wiregate_session"]["value"], time.time())
    assert first is not None and first.subject == "grace" and first.groups == ("engineering",)
    assert first.email == "grace@example.test" and first.name == "Test grace"
    carried = {pre.start.state, pre.start.nonce, pre.start.code_verifier, planted}
    assert not {first.session_id, first.csrf_secret} & carried
    flags = cookies["wiregate_session"]
    assert flags["httpOnly"] and flags["sameSite"] == "Lax" and flags["path"] == "/"

    await page.click("#sign-out")
    assert await text(page, "#signed-out") == "Signed out"
    assert "wiregate_session" not in await _cookies(context)
    await page.goto(gateway.url + "/devices")  # the IdP still knows grace: straight back
    await page.wait_for_url(gateway.url + "/devices")
    second = box.open_session((await _cookies(context))["wiregate_session"]["value"], time.time())
    assert second is not None and second.subject == "grace"
    assert second.session_id != first.session_id and second.csrf_secret != first.csrf_secret
