"""The console's pages in real Chromium against a real gateway and OpenID Provider: the
device search and a device's page (its peers and their reported paths), the relays, the
audit log filtered through its form, the policy in force, the pending approvals and a
new key's bootstrap command — each at 1280 and 390 px wide with no sideways scroll and
no script; a 403 for a person outside the admin groups; a forged key form refused."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, Page

from identity.enrollment import KEY_PREFIX
from lab.gateway_process import Gateway
from lab.idp import RunningIdp
from tests.browser.layout import WIDTHS, assert_fits
from tests.browser.test_paths_page import reported_pair
from tests.browser.test_sso_pages import sign_in_at, start_login, text

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(180)]
NewContext = Callable[[], Awaitable[BrowserContext]]
PAGES = ("/admin/relays", "/admin/audit", "/admin/policy", "/admin/logins")


async def fits(page: Page, shots: Path, name: str) -> None:
    assert await page.locator("script").count() == 0
    for width in WIDTHS:
        await assert_fits(page, width, shots, name)


async def test_the_console_shows_the_network(
    gateway: Gateway, sso_idp: RunningIdp, new_context: NewContext, tmp_path: Path
) -> None:
    a, b = await reported_pair(gateway, "tag:cs", "cs-web", "cs-db")
    a_id, b_id = a["device"]["id"], b["device"]["id"]
    start_login(gateway, "cs-waiting")

    page = await (await new_context()).new_page()
    await sign_in_at(page, sso_idp, gateway, "/admin", "admin-carol")
    await page.fill("#q", "cs-web")
    await page.click("#device-search button")
    assert await page.locator(f"#device-{a_id}").count() == 1
    assert await page.locator(f"#device-{b_id}").count() == 0
    await fits(page, tmp_path, "admin-search")
    await page.click(f"#device-{a_id} a.details")
    await page.wait_for_url(f"{gateway.url}/admin/devices/{a_id}")
    assert await text(page, "#device-name") == "cs-web"
    assert await text(page, "#tags") == "tag:cs"
    assert await page.locator("#last-seen time[title]").count() == 1
    assert "relayed via relay-1" in await text(page, f"#peers tr[data-peer='{b_id}'] .out")
    await fits(page, tmp_path, "device")
    assert await page.get_attribute("#device-audit", "href") == f"/admin/audit?target={a_id}"
    await page.fill(f"#tags-{a_id}", "tag:cs tag:web")
    await page.click("#device-forms button.set-tags")
    await page.wait_for_url(f"{gateway.url}/admin/devices/{a_id}")
    assert await text(page, "#tags") == "tag:cs tag:web"
    await page.click(f"#peers tr[data-peer='{b_id}'] a.pair")
    await page.wait_for_url(f"{gateway.url}/admin/paths/{a_id}/{b_id}")

    for path in PAGES:
        await page.click(f"header nav a[href='{path}']")
        await page.wait_for_url(gateway.url + path)
        await fits(page, tmp_path, path.rsplit("/", 1)[-1])
    assert "cs-waiting" in await text(page, "#pending")
    await page.goto(gateway.url + "/admin/policy")
    policy = gateway.admin("GET", "/api/v1/policy")[1]["policy"]
    assert await text(page, "#hash") == policy["hash"]
    assert (await text(page, "#validation")).startswith("valid")
    await page.fill("#draft-document", "acls:\n  - {src: ['tag:a'], dst: ['tag:b']}\n")
    await page.click("#check-draft")
    assert await text(page, "#draft-validation") == "valid"
    assert gateway.admin("GET", "/api/v1/policy")[1]["policy"] == policy
    await page.goto(gateway.url + "/admin/audit")
    await page.fill("#action", "key.create")
    await page.click("#audit-filters button")
    actions = await page.locator("#audit td.action").all_text_contents()
    assert actions and all("key.create" in a for a in actions)


async def test_a_new_key_ends_with_a_bootstrap_command(
    gateway: Gateway, sso_idp: RunningIdp, new_context: NewContext, tmp_path: Path
) -> None:
    page = await (await new_context()).new_page()
    await sign_in_at(page, sso_idp, gateway, "/admin", "admin-carol")
    await page.fill("#tags", "tag:vm")
    await page.click("#create-key")
    secret = await text(page, "#key-secret")
    command = await text(page, "#bootstrap-command")
    assert secret.startswith(KEY_PREFIX) and f"\n{secret}\n" in command
    assert f"{gateway.url}/bootstrap.sh | sh -s --" in command
    assert "--auth-key file:/root/wiregate.key" in command and f"key {secret}" not in command
    await fits(page, tmp_path, "key-created")


async def test_console_pages_refuse_non_admins_and_forged_forms(
    gateway: Gateway, sso_idp: RunningIdp, new_context: NewContext
) -> None:
    user = await new_context()
    other = await user.new_page()
    await sign_in_at(other, sso_idp, gateway, "/devices", "dave")
    for path in PAGES:
        assert await other.locator(f"a[href='{path}']").count() == 0
    device = gateway.admin("GET", "/api/v1/devices")[1]["devices"]
    paths = (*PAGES, "/admin?q=cs", *(f"/admin/devices/{d['id']}" for d in device[:1]))
    for path in paths:
        response = await other.goto(gateway.url + path)
        assert response is not None and response.status == 403, path
        assert await other.get_attribute("#error", "data-code") == "not_an_admin"

    admin = await new_context()
    page = await admin.new_page()
    await sign_in_at(page, sso_idp, gateway, "/admin", "admin-carol")
    before = len(gateway.admin("GET", "/api/v1/keys")[1]["keys"])
    forged = await admin.request.post(gateway.url + "/admin/keys",
                                      headers={"Origin": gateway.url},
                                      form={"expiry": "3600", "csrf": "forged"})  # fmt: skip
    assert forged.status == 403
    assert len(gateway.admin("GET", "/api/v1/keys")[1]["keys"]) == before
