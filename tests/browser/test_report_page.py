"""The evidence report page in real Chromium: two devices and a live path report, the
verdicts and the pair drawn, at 1280 and 390 px wide (tables scroll inside their box,
the page does not), the print stylesheet hiding the console's header and form, a PDF
printed by Chromium, and a 403 for a person outside the admin groups."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext

from lab.gateway_process import Gateway
from lab.idp import RunningIdp
from tests.browser.layout import WIDTHS, assert_fits
from tests.browser.test_paths_page import reported_pair
from tests.browser.test_sso_pages import sign_in_at, text

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(120)]
NewContext = Callable[[], Awaitable[BrowserContext]]


async def test_the_report_page_renders_prints_and_is_for_admins(
    gateway: Gateway, sso_idp: RunningIdp, new_context: NewContext, tmp_path: Path
) -> None:
    a, b = await reported_pair(gateway, "tag:ev", "ev-web", "ev-db")
    a_id, b_id = a["device"]["id"], b["device"]["id"]

    page = await (await new_context()).new_page()
    await sign_in_at(page, sso_idp, gateway, "/admin/report", "admin-erin")
    assert await page.locator("script").count() == 0
    assert await page.locator("#verdict-host_traffic").get_attribute("data-result") == "fail"
    assert "not shown to be encrypted" in await text(page, "#verdict-host_traffic")
    row = f"#pairs tr[data-a='{min(a_id, b_id)}'][data-b='{max(a_id, b_id)}']"
    assert await page.locator(row).count() == 1
    assert await text(page, f"{row} .status") == "encrypted"
    assert await page.locator(f"#devices tr[data-device-id='{a_id}']").count() == 1
    policy = gateway.admin("GET", "/api/v1/policy")[1]["policy"]
    assert await text(page, "#policy-hash") == policy["hash"]
    for width in WIDTHS:
        await assert_fits(page, width, tmp_path, "report")
    await page.emulate_media(media="print")
    assert not await page.locator("header").is_visible()
    assert not await page.locator("#period-form").is_visible()
    assert await page.locator("#verdicts").is_visible()
    pdf = await page.pdf(format="A4", print_background=True)  # the bonus: Chromium's PDF
    assert pdf.startswith(b"%PDF-") and len(pdf) > 5000
    (tmp_path / "report.pdf").write_bytes(pdf)

    other = await (await new_context()).new_page()
    await sign_in_at(other, sso_idp, gateway, "/devices", "frank")
    assert await other.locator("a[href='/admin/report']").count() == 0
    response = await other.goto(gateway.url + "/admin/report")
    assert response is not None and response.status == 403
