"""The fragmentation heatmap in real Chromium: two devices' path reports (sent on their
map streams as an agent does) drawn as a matrix with the black hole marked, at 1280 and
390 px wide (the matrix scrolls inside its box, the page does not), a cell opening the
pair's page, and a 403 for a person outside the admin groups."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import BrowserContext

from lab.gateway_process import Gateway
from lab.idp import RunningIdp
from tests.browser.layout import WIDTHS, assert_fits
from tests.browser.test_sso_pages import new_public_key, sign_in_at, text
from wiregate.pathwire import PathEntry, build_paths

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(120)]
NewContext = Callable[[], Awaitable[BrowserContext]]
ENTRY = PathEntry("", 1340, True, 0, 6, "relayed", "relay-1", "no direct path after 3 probes",
                  14.0, 0.6)  # fmt: skip


def enroll(gateway: Gateway, secret: str, name: str) -> dict[str, Any]:
    body = {"auth_key": secret, "public_key": new_public_key(), "name": name}
    status, enrolled = gateway.api("POST", "/api/v1/enroll", body)
    assert status == 201, enrolled
    return dict(enrolled)


async def reported_pair(gateway: Gateway, tag: str, a_name: str, b_name: str) -> list[Any]:
    """Two devices enrolled with one key carrying ``tag``, the first reporting
    :data:`ENTRY` (relayed, MTU 1340, a black hole) toward the second."""
    key = {"tags": [tag], "expiry": 3600, "reusable": True, "ephemeral": False,
           "description": tag}  # fmt: skip
    status, created = gateway.admin("POST", "/api/v1/keys", key)
    assert status == 201, created
    a, b = [enroll(gateway, created["secret"], n) for n in (a_name, b_name)]
    await report(gateway, a["token"], replace(ENTRY, peer=b["device"]["id"]))
    return [a, b]


async def report(gateway: Gateway, token: str, entry: PathEntry) -> None:
    """Send one ``paths`` message on the device's map stream, as its agent would."""
    url = gateway.url.replace("http://", "ws://") + "/api/v1/stream"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers={"Authorization": f"Bearer {token}"}) as ws,
    ):
        assert (await ws.receive_json(timeout=10))["type"] == "full"
        await ws.send_json(build_paths([entry]))
        for _ in range(100):
            paths = gateway.admin("GET", f"/api/v1/paths?device={entry.peer}")[1]["paths"]
            if any(p["peer"]["id"] == entry.peer for p in paths):
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the report never reached the matrix")


async def test_the_heatmap_draws_the_pairs_and_marks_the_black_hole(
    gateway: Gateway, sso_idp: RunningIdp, new_context: NewContext, tmp_path: Path
) -> None:
    a, b = await reported_pair(gateway, "tag:hm", "hm-web", "hm-db")
    a_id, b_id = a["device"]["id"], b["device"]["id"]
    back = replace(ENTRY, peer=a_id, path_mtu=1420, black_hole=False, path="direct", relay=None)
    await report(gateway, b["token"], back)

    page = await (await new_context()).new_page()
    await sign_in_at(page, sso_idp, gateway, "/admin/paths", "admin-erin")
    hole = page.locator(f"#row-{a_id} td[data-peer='{b_id}']")
    assert await hole.get_attribute("data-black-hole") == "true"
    assert "1340" in (await hole.text_content() or "") and "black-hole" in (
        await hole.get_attribute("class") or "")  # fmt: skip
    fine = page.locator(f"#row-{b_id} td[data-peer='{a_id}']")
    assert await fine.get_attribute("class") == "cell mtu-1420"
    assert await page.locator("tbody[data-group='tag:hm'] th.group").count() == 1
    assert await page.locator(f"#black-holes tr[data-reporter='{a_id}']").count() == 1
    for width in WIDTHS:
        await assert_fits(page, width, tmp_path, "heatmap")
        assert await page.locator("#heatmap").is_visible()
    await hole.locator("a").click()
    await page.wait_for_url(f"{gateway.url}/admin/paths/{a_id}/{b_id}")
    assert await text(page, f"#from-{a_id} + dl .relay") == "relay-1"
    assert await text(page, f"#from-{a_id} + dl .reason") == "no direct path after 3 probes"
    assert await text(page, f"#from-{b_id} + dl .path") == "direct"

    other = await (await new_context()).new_page()
    await sign_in_at(other, sso_idp, gateway, "/devices", "frank")
    assert await other.locator("a[href='/admin/paths']").count() == 0
    response = await other.goto(gateway.url + "/admin/paths")
    assert response is not None and response.status == 403
