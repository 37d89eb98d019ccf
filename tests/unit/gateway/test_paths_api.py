"""Agents' path reports through a real gateway (real store, real map streams):
kept per pair, served by GET /api/v1/paths, refused when malformed, rate-limited,
limited to the reporter's peers, gone with a device; the metrics' figures; the
admin console's heatmap and pair pages."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY, generate_latest

from gateway.api.common import rfc3339
from gateway.api.paths import refresh
from gateway.appkeys import METRICS, STORE
from gateway.pathmatrix import BURST, STALE_AFTER
from gateway.web import paths as page
from lab.api_client import AUTH, Client, create_key
from lab.fakes import FakeClock
from tests.unit.gateway.test_device_admin_api import enrolled, stream
from tests.unit.gateway.test_web_pages import cookie, enroll_for, make_session, web_client
from wiregate.model import Identity
from wiregate.pathwire import PathEntry, build_paths, entry_json

__all__ = ["web_client"]  # the fixture the page tests take

ENTRY = PathEntry(
    "", 1340, True, 2, 5, "relayed", "relay-1", "no direct path after 3 probes", 12.0, 0.75
)


async def two(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    secret = (await create_key(client, reusable=True))["secret"]
    return await enrolled(client, secret, "a"), await enrolled(client, secret, "b")


async def paths(client: Client, query: str = "") -> list[dict[str, Any]]:
    resp = await client.get(f"/api/v1/paths{query}", headers=AUTH)
    assert resp.status == 200, await resp.text()
    found: list[dict[str, Any]] = (await resp.json())["paths"]
    return found


async def until(client: Client, count: int, query: str = "") -> list[dict[str, Any]]:
    for _ in range(100):
        found = await paths(client, query)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} paths: {found}")


def reports(outcome: str) -> float:
    value = REGISTRY.get_sample_value("wiregate_path_reports_total", {"outcome": outcome})
    return value or 0.0


async def test_a_report_is_kept_per_pair_and_served(client: Client, clock: FakeClock) -> None:
    a, b = await two(client)
    a_id, b_id = a["device"]["id"], b["device"]["id"]
    async with stream(client, a) as ws:
        await ws.send_json(build_paths([dataclasses.replace(ENTRY, peer=b_id)]))
        [pair] = await until(client, 1)
    assert pair == {
        "reporter": {"id": a_id, "name": "a"},
        "peer": {"id": b_id, "name": "b"},
        "path_mtu": 1340,
        "black_hole": True,
        "frag_needed": 2,
        "probe_failures": 5,
        "path": "relayed",
        "relay": "relay-1",
        "reason": "no direct path after 3 probes",
        "handshake_age": 12.0,
        "rtt_ms": 0.75,
        "reported_at": rfc3339(clock.now),
        "age": 0.0,
        "stale": False,
    }
    async with stream(client, b) as ws:  # the other direction, then an update of it
        await ws.send_json(build_paths([dataclasses.replace(ENTRY, peer=a_id, path_mtu=1420)]))
        await until(client, 2)
        await ws.send_json(
            build_paths(
                [
                    dataclasses.replace(
                        ENTRY, peer=a_id, path_mtu=1280, black_hole=False, path="direct"
                    )
                ]
            )
        )
        for _ in range(100):
            back = [p for p in await paths(client) if p["reporter"]["id"] == b_id]
            if back[0]["path_mtu"] == 1280:
                break
            await asyncio.sleep(0.05)
    assert len(await paths(client)) == 2 and back[0]["path"] == "direct"
    assert [p["peer"]["id"] for p in await paths(client, "?black_hole=true")] == [b_id]
    assert len(await paths(client, f"?device={a_id}")) == 2
    assert await paths(client, "?device=dev_none") == []
    clock.advance(STALE_AFTER + 1)
    assert all(p["stale"] and p["age"] > STALE_AFTER for p in await paths(client))


async def test_the_endpoint_is_for_admins_and_checks_its_filters(client: Client) -> None:
    assert (await client.get("/api/v1/paths")).status == 401
    bad = {"Authorization": "Bearer nope"}
    assert (await client.get("/api/v1/paths", headers=bad)).status == 401
    for query in ("?black_hole=yes", "?device=" + "d" * 33):
        resp = await client.get(f"/api/v1/paths{query}", headers=AUTH)
        assert resp.status == 400 and (await resp.json())["error"] == "bad_input"


async def test_a_malformed_report_closes_the_stream_and_keeps_nothing(client: Client) -> None:
    a, b = await two(client)
    doc = build_paths([dataclasses.replace(ENTRY, peer=b["device"]["id"])])
    doc["paths"][0]["mss"] = 1300
    async with stream(client, a) as ws:
        await ws.send_json(doc)
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1008
        assert 'unknown fields: "mss"' in str(msg.extra)
    assert await paths(client) == []


async def test_only_the_reporters_peers_are_kept(client: Client) -> None:
    a, b = await two(client)
    a_id, b_id = a["device"]["id"], b["device"]["id"]
    entries = [dataclasses.replace(ENTRY, peer=p) for p in (b_id, a_id, "dev_0000000000000000")]
    async with stream(client, a) as ws:
        await ws.send_json(build_paths(entries))
        found = await until(client, 1)
        await asyncio.sleep(0.2)
    assert (
        [p["peer"]["id"] for p in await paths(client)] == [b_id] == [p["peer"]["id"] for p in found]
    )


async def test_reports_past_the_burst_are_dropped(client: Client) -> None:
    a, b = await two(client)
    before = reports("rate_limited"), reports("accepted")
    message = build_paths([dataclasses.replace(ENTRY, peer=b["device"]["id"])])
    async with stream(client, a) as ws:
        for _ in range(BURST + 2):
            await ws.send_json(message)
        for _ in range(100):
            if reports("rate_limited") - before[0] >= 2:
                break
            await asyncio.sleep(0.05)
    assert reports("rate_limited") - before[0] == 2 and reports("accepted") - before[1] == BURST


async def test_rows_go_with_either_device(client: Client) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    a, b, c = [await enrolled(client, secret, n) for n in "abc"]
    ids = {n: d["device"]["id"] for n, d in zip("abc", (a, b, c), strict=True)}
    store = client.app[STORE]
    for reporter, peers in (("a", "bc"), ("b", "ac"), ("c", "ab")):
        await store.record_paths(
            ids[reporter], [dataclasses.replace(ENTRY, peer=ids[p]) for p in peers]
        )
    assert len(await paths(client)) == 6
    resp = await client.delete(f"/api/v1/devices/{ids['b']}", headers=AUTH)
    assert resp.status == 204, await resp.text()
    left = {(p["reporter"]["name"], p["peer"]["name"]) for p in await paths(client)}
    assert left == {("a", "c"), ("c", "a")}


async def test_metrics_count_pairs_by_bucket_without_per_pair_labels(client: Client) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    a, b, c = [await enrolled(client, secret, n) for n in "abc"]
    ids = [d["device"]["id"] for d in (a, b, c)]
    store = client.app[STORE]
    await store.record_paths(
        ids[0],
        [
            dataclasses.replace(ENTRY, peer=ids[1]),
            dataclasses.replace(ENTRY, peer=ids[2], path_mtu=1420, black_hole=False, path="direct"),
        ],
    )
    await store.record_paths(
        ids[1], [dataclasses.replace(ENTRY, peer=ids[0], path_mtu=None, black_hole=False)]
    )
    await refresh(client.app)
    text = generate_latest(client.app[METRICS]).decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("wiregate_path")
    }
    assert samples['wiregate_path_mtu_bucket{le="1340"}'] == 1
    assert samples['wiregate_path_mtu_bucket{le="1420"}'] == 2
    assert samples['wiregate_path_mtu_bucket{le="+Inf"}'] == 2
    assert samples["wiregate_path_mtu_gsum"] == 1340 + 1420
    assert (
        samples["wiregate_path_black_holes"] == 1 and samples["wiregate_path_unprobed_pairs"] == 1
    )
    assert samples['wiregate_path_pairs{path="relayed"}'] == 2
    assert (
        samples["wiregate_path_frag_needed"] == 6 and samples["wiregate_path_probe_failures"] == 15
    )
    assert not any(i in line for line in text.splitlines() for i in ids)  # no per-pair label
    # the JSON says the same
    served = await paths(client)
    assert sum(p["black_hole"] for p in served) == samples["wiregate_path_black_holes"]
    assert (
        sum(1 for p in served if p["path_mtu"] is not None)
        == samples['wiregate_path_mtu_bucket{le="+Inf"}']
    )


# -- the admin console -------------------------------------------------------------

BOB = Identity("https://idp.example", "bob")


async def test_the_heatmap_page_marks_mtus_and_black_holes(web_client: Client) -> None:
    a = await enroll_for(web_client, BOB, "web-1")
    b = await enroll_for(web_client, BOB, "db-1")
    store = web_client.app[STORE]
    await store.record_paths(a, [dataclasses.replace(ENTRY, peer=b)])
    await store.record_paths(
        b, [dataclasses.replace(ENTRY, peer=a, path_mtu=1420, black_hole=False, path="direct")]
    )
    admin = cookie(web_client, make_session("carol", ("ops",)))
    page = await web_client.get("/admin/paths", headers=admin)
    html = await page.text()
    assert page.status == 200, html
    assert 'id="heatmap"' in html and "<script" not in html
    assert f'data-peer="{b}" data-mtu="1340" data-black-hole="true"' in html
    assert f'class="cell mtu-1420" data-peer="{a}" data-mtu="1420"' in html
    assert f'href="/admin/paths/{a}/{b}"' in html and 'id="black-holes"' in html
    detail = await web_client.get(f"/admin/paths/{a}/{b}", headers=admin)
    text = await detail.text()
    assert detail.status == 200 and "relay-1" in text and "no direct path after 3 probes" in text
    assert "0.8 ms" in text and "12 s" in text and f'id="from-{b}"' in text  # both directions
    missing = await web_client.get(f"/admin/paths/{a}/dev_nope", headers=admin)
    assert missing.status == 404


async def test_the_heatmap_is_for_admins_only(web_client: Client) -> None:
    user = cookie(web_client, make_session("dave"))
    assert (await web_client.get("/admin/paths", headers=user)).status == 403
    assert (await web_client.get("/admin/paths/a/b", headers=user)).status == 403
    anonymous = await web_client.get("/admin/paths", allow_redirects=False)
    assert anonymous.status != 200 and 'id="heatmap"' not in await anonymous.text()


def test_entry_json_is_the_wire_form() -> None:
    assert set(entry_json(ENTRY)) == set(build_paths([ENTRY])["paths"][0])


async def test_the_heatmap_draws_one_tag_and_at_most_max_drawn(
    web_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await enroll_for(web_client, BOB, "web-1")
    b = await enroll_for(web_client, BOB, "db-1")
    store = web_client.app[STORE]
    await store.update_device(b, tags=["tag:db"])
    await store.record_paths(a, [dataclasses.replace(ENTRY, peer=b)])
    admin = cookie(web_client, make_session("carol", ("ops",)))
    html = await (await web_client.get("/admin/paths?tag=tag:db", headers=admin)).text()
    assert f'id="row-{b}"' in html and f'id="row-{a}"' not in html
    assert 'data-group="tag:db"' in html and '<option value="tag:db" selected>' in html
    monkeypatch.setattr(page, "MAX_DRAWN", 1)
    html = await (await web_client.get("/admin/paths", headers=admin)).text()
    assert html.count('<tr id="row-') == 1 and "1 more devices are not drawn" in html
