"""The evidence report through a real gateway (real store, real broker, real policy):
``GET /api/v1/report`` checked figure by figure against the store and the other admin
endpoints (devices, audit, policy, paths), its one-line 400s, admin only; and the
admin console's printable ``/admin/report`` page and its JSON."""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.api.common import rfc3339
from gateway.appkeys import STORE
from gateway.evidence import HOST_TRAFFIC_UNAVAILABLE
from lab.api_client import AUTH, Client, create_key
from lab.fakes import T0, FakeClock, new_key
from tests.unit.gateway.test_api import _documented, _served
from tests.unit.gateway.test_device_admin_api import enrolled
from tests.unit.gateway.test_paths_api import BOB, ENTRY
from tests.unit.gateway.test_web_pages import cookie, enroll_for, make_session, web_client

__all__ = ["web_client"]  # the fixture the page tests take
DAY = 86400.0


async def admin_get(client: Client, path: str) -> Any:
    resp = await client.get(path, headers=AUTH)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def report(client: Client, query: str = "") -> dict[str, Any]:
    body: dict[str, Any] = await admin_get(client, f"/api/v1/report{query}")
    return body


def verdicts(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["id"]: v for v in body["verdicts"]}


async def fleet(client: Client) -> list[dict[str, Any]]:
    secret = (await create_key(client, reusable=True))["secret"]
    return [await enrolled(client, secret, n) for n in ("a", "b", "c")]


async def test_the_report_matches_the_store_and_the_audit_log(
    client: Client, clock: FakeClock
) -> None:
    a, b, c = await fleet(client)
    ids = [d["device"]["id"] for d in (a, b, c)]
    store = client.app[STORE]
    clock.advance(10)
    rotate = await client.post(
        "/api/v1/devices/self/rotate",
        json={"public_key": new_key()},
        headers={"Authorization": f"Bearer {a['token']}"},
    )
    assert rotate.status == 200, await rotate.text()
    await store.record_paths(ids[0], [dataclasses.replace(ENTRY, peer=ids[1])])  # live, relayed
    assert (await client.delete(f"/api/v1/devices/{ids[2]}", headers=AUTH)).status == 204

    body = await report(client)
    devices = (await admin_get(client, "/api/v1/devices"))["devices"]
    assert sorted(d["id"] for d in body["devices"]) == sorted(d["id"] for d in devices)
    assert sorted(d["id"] for d in devices) == sorted(ids[:2])
    by_id = {d["id"]: d for d in body["devices"]}
    assert by_id[ids[0]]["rotations"] == 1 and by_id[ids[1]]["rotations"] == 0
    assert by_id[ids[0]]["key_since"] == rfc3339(clock.now) and by_id[ids[1]]["approvals"] == 1
    audit = (await admin_get(client, "/api/v1/audit?limit=1000"))["events"]
    for kind, actions in (("rotations", {"device.rotate"}), ("revocations", {"device.delete"})):
        expected = sorted(e["target"] for e in audit if e["action"] in actions)
        assert sorted(e["target"] for e in body["events"][kind]) == expected, kind
    assert [e["target"] for e in body["events"]["revocations"]] == [ids[2]]
    assert verdicts(body)["revocations_in_period"]["items"] == [
        f"device.delete {ids[2]} by admin:token"
    ]
    policy = (await admin_get(client, "/api/v1/policy"))["policy"]
    assert body["policy"]["hash"] == policy["hash"] and body["policy"]["source"] == "default"
    [pair] = body["pairs"]  # c is gone; the default policy lets a and b talk
    assert (pair["a"]["id"], pair["b"]["id"], pair["status"]) == (*sorted(ids[:2]), "encrypted")
    assert (pair["path"], pair["relay"]) == ("relayed", "relay-1")
    assert body["relays"]["in_reports"] == ["relay-1"]
    assert verdicts(body)["pairs_without_live_handshake"]["result"] == "pass"
    assert verdicts(body)["host_traffic"]["text"] == HOST_TRAFFIC_UNAVAILABLE
    assert body["generated_at"] == rfc3339(clock.now)
    assert all(v["rests_on"] for v in body["verdicts"])
    assert all(s["rests_on"] for s in body["statements"])


async def test_the_period_bounds_the_audit_records(client: Client, clock: FakeClock) -> None:
    await fleet(client)
    clock.advance(DAY)
    before = await report(client, f"?until={T0 + 60:.0f}")
    assert len(before["events"]["approvals"]) == 3
    after = await report(client, f"?since={rfc3339(T0 + 3600)}")
    assert after["events"]["approvals"] == []
    assert after["period"] == {"since": rfc3339(T0 + 3600), "until": rfc3339(clock.now)}
    default = await report(client)
    assert default["period"]["since"] == rfc3339(clock.now - 30 * DAY)


async def test_verdicts_fail_as_time_passes(client: Client, clock: FakeClock) -> None:
    a, b, _ = await fleet(client)
    await client.app[STORE].record_paths(
        a["device"]["id"], [dataclasses.replace(ENTRY, peer=b["device"]["id"])]
    )
    clock.advance(91 * DAY)
    body = await report(client)
    v = verdicts(body)
    assert v["keys_over_max_age"]["result"] == "fail" and len(v["keys_over_max_age"]["items"]) == 3
    assert v["pairs_without_live_handshake"]["result"] == "fail"  # the report went stale
    assert {p["status"] for p in body["pairs"]} == {"unknown"}
    relaxed = verdicts(await report(client, "?max_key_age_days=365"))
    assert relaxed["keys_over_max_age"]["result"] == "pass"


async def test_bad_input_is_a_one_line_400_and_admins_only(client: Client) -> None:
    for query, message in (
        ("?since=yesterday", "since must be an RFC 3339 time or POSIX seconds"),
        ("?until=2026-13-01T00:00:00Z", "until must be an RFC 3339 time or POSIX seconds"),
        ("?since=2026-12-01T00:00:00", "since must be an RFC 3339 time or POSIX seconds"),
        ("?since=200&until=100", "since must be before until"),
        ("?max_key_age_days=0", "max_key_age_days must be an integer from 1 to 3650"),
        ("?max_key_age_days=x", "max_key_age_days must be an integer from 1 to 3650"),
        ("?format=pdf", "unknown parameter 'format'"),
    ):
        resp = await client.get(f"/api/v1/report{query}", headers=AUTH)
        assert resp.status == 400, query
        body = await resp.json()
        assert body["message"] == message and "\n" not in body["message"], query
    assert (await client.get("/api/v1/report")).status == 401
    bad = {"Authorization": "Bearer nope"}
    assert (await client.get("/api/v1/report", headers=bad)).status == 401


# -- the admin console -------------------------------------------------------------


async def test_the_report_page_is_printable_and_says_what_it_rests_on(
    web_client: Client,
) -> None:
    a = await enroll_for(web_client, BOB, "web-1")
    b = await enroll_for(web_client, BOB, "db-1")
    await web_client.app[STORE].record_paths(a, [dataclasses.replace(ENTRY, peer=b)])
    admin = cookie(web_client, make_session("carol", ("ops",)))
    page = await web_client.get("/admin/report", headers=admin)
    html = await page.text()
    assert page.status == 200, html
    assert "<script" not in html
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert 'id="verdict-pairs_without_live_handshake"' in html and 'data-result="pass"' in html
    assert 'id="verdict-host_traffic" class="verdict fail"' in html
    assert "host traffic: not shown to be encrypted" in html
    assert f'data-a="{min(a, b)}" data-b="{max(a, b)}" class="pair status-encrypted"' in html
    assert "path_reports (store), as GET /api/v1/paths: 1" in html
    assert 'class="inline no-print period"' in html
    css = await (await web_client.get("/static/wiregate.css")).text()
    assert "@media print" in css
    dated = await web_client.get("/admin/report?since=2020-01-01&until=2020-01-31", headers=admin)
    text = await dated.text()
    assert dated.status == 200 and "2020-01-01T00:00:00Z" in text and "2020-01-31T23:59:59Z" in text
    data = await (
        await web_client.get("/admin/report.json?max_key_age_days=7", headers=admin)
    ).json()
    assert data["max_key_age_days"] == 7 and len(data["devices"]) == 2


async def test_the_report_page_is_for_admins_and_refuses_a_bad_period(web_client: Client) -> None:
    user = cookie(web_client, make_session("dave"))
    assert (await web_client.get("/admin/report", headers=user)).status == 403
    assert (await web_client.get("/admin/report.json", headers=user)).status == 403
    anonymous = await web_client.get("/admin/report", allow_redirects=False)
    assert anonymous.status != 200 and 'id="verdicts"' not in await anonymous.text()
    admin = cookie(web_client, make_session("carol", ("ops",)))
    bad = await web_client.get("/admin/report?since=2026-02-01&until=2026-01-01", headers=admin)
    assert bad.status == 400 and "since must be before until" in await bad.text()


async def test_the_answers_match_the_openapi_document(client: Client) -> None:
    a, b, _ = await fleet(client)
    await client.app[STORE].record_paths(
        a["device"]["id"], [dataclasses.replace(ENTRY, peer=b["device"]["id"])]
    )
    await client.delete(f"/api/v1/devices/{b['device']['id']}", headers=AUTH)
    served = await _served(client)
    for url, status in (("/api/v1/report", 200), ("/api/v1/report?since=x", 400)):
        resp = await client.get(url, headers=AUTH)
        assert resp.status == status
        await _documented(served, "get", "/api/v1/report", resp)


POLICY = (
    "acls:\n  - {src: ['tag:web'], dst: ['tag:db']}\n"
    "routes:\n  - {tags: ['tag:db'], allow: ['10.20.0.0/16']}\n"
)


async def test_pairs_and_routes_follow_the_policy_in_force(client: Client) -> None:
    resp = await client.put(
        "/api/v1/policy", json={"document": POLICY, "format": "yaml"}, headers=AUTH
    )
    assert resp.status == 200, await resp.text()
    devices = {}
    for name, tag, routes in (("web", "tag:web", []), ("db", "tag:db", ["10.20.0.0/24"]),
                              ("lone", "tag:lone", ["10.30.0.0/24"])):  # fmt: skip
        secret = (await create_key(client, tags=[tag]))["secret"]
        body = {"auth_key": secret, "public_key": new_key(), "name": name, "routes": routes}
        made = await client.post("/api/v1/enroll", json=body)
        assert made.status == 201, await made.text()
        devices[name] = (await made.json())["device"]["id"]
    body = await report(client)
    [pair] = body["pairs"]  # web ↔ db only; lone peers with nobody
    assert {pair["a"]["id"], pair["b"]["id"]} == {devices["web"], devices["db"]}
    assert pair["status"] == "unknown"  # no report: never counted as encrypted
    routes = verdicts(body)["routes_leaving_in_clear"]
    assert routes["result"] == "fail" and routes["items"] == [
        "10.20.0.0/24 leaves the tunnel at db"
    ]
    lone = next(d for d in body["devices"] if d["id"] == devices["lone"])
    assert (lone["routes"], lone["carried_routes"]) == (["10.30.0.0/24"], [])  # refused
    policy = (await admin_get(client, "/api/v1/policy"))["policy"]
    assert body["policy"]["hash"] == policy["hash"] and body["policy"]["source"] == "api"
    [change] = body["events"]["policy"]
    assert change["detail"]["new_hash"] == policy["hash"] and change["actor"] == "admin:token"
