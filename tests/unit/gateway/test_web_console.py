"""The console's views (device, relays, audit, policy, approvals), the device search and
the human timestamps, over HTTP (aiohttp's test client, sessions sealed by the app)."""

from __future__ import annotations

from pathlib import Path

from gateway.app import create_app
from gateway.appkeys import RELAY_PROBE, STORE
from gateway.web.admin import matches
from gateway.web.console import AUDIT_PAGE, audit_filter
from gateway.web.humantime import relative, time_tag
from gateway.web.sessions import Session, csrf_token
from lab.api_client import RecordingBroker
from lab.fakes import T0, FakeClock
from lab.relay_api import CONTROL_1, RELAYS, ScriptedProbe
from relay.client.probe import PingResult
from tests.unit.gateway.test_policy_reload import OPEN
from tests.unit.gateway.test_web_device_admin import BOB, post
from tests.unit.gateway.test_web_pages import (
    Client,
    ClientFactory,
    cookie,
    enroll_for,
    form_headers,
    make_session,
    pending_code,
    sso_settings,
    web_client,
)
from wiregate.errors import BadInput

__all__ = ["web_client"]  # the fixture these tests take

PAGES = ("/admin/relays", "/admin/audit", "/admin/policy", "/admin/logins")


async def get(client: Client, path: str, who: str = "carol") -> tuple[int, str]:
    session = make_session(who, ("ops",) if who == "carol" else ("eng",))
    resp = await client.get(path, headers=cookie(client, session), allow_redirects=False)
    return resp.status, await resp.text()


def test_relative_times_read_like_a_person_would_say_them() -> None:
    assert relative(T0 - 2, T0) == "just now"
    assert relative(T0 - 180, T0) == "3 min ago"
    assert relative(T0 - 7200, T0) == "2 h ago"
    assert relative(T0 + 3 * 86400, T0) == "in 3 days"
    assert relative(T0 - 86400, T0) == "1 day ago"
    tag = str(time_tag(T0 - 60, T0))
    assert tag.startswith("<time datetime=") and 'title="' in tag and ">1 min ago</time>" in tag
    assert str(time_tag(None, T0, "<never>")) == "&lt;never&gt;"


def test_device_search_matches_every_word() -> None:
    d = {"name": "web-1", "id": "dev_1", "subject": "bob", "issuer": "https://idp",
         "online": True, "tags": ("tag:web",), "addresses": ("100.64.0.2", "fd7a::2")}  # fmt: skip
    assert matches(d, "") and matches(d, "WEB bob") and matches(d, "online 100.64.0.2")
    assert not matches(d, "offline") and not matches(d, "web alice")


def test_audit_filters_refuse_bad_times() -> None:
    since, until, words = audit_filter({"since": "10", "until": "20", "actor": " oidc ", "x": "y"})
    assert (since, until, words) == (10.0, 20.0, {"actor": "oidc"})
    for bad in ({"since": "yesterday"}, {"since": "20", "until": "10"}):
        try:
            audit_filter(bad)
        except BadInput:
            continue
        raise AssertionError(bad)


async def test_console_pages_are_for_admins_only(web_client: Client) -> None:
    device = await enroll_for(web_client, BOB, "bob-pc")
    for path in (*PAGES, f"/admin/devices/{device}", "/admin?q=bob"):
        assert (await get(web_client, path, "dave"))[0] == 403, path
        status, page = await get(web_client, path)
        assert status == 200, (path, page)
        assert "<script" not in page
    assert (await get(web_client, "/admin/devices/dev_nope"))[0] == 404


async def test_device_page_search_audit_policy_and_approvals(web_client: Client) -> None:
    pc = await enroll_for(web_client, BOB, "bob-pc")
    await enroll_for(web_client, BOB, "bob-phone")
    _, page = await get(web_client, f"/admin/devices/{pc}")
    assert 'id="device-name">bob-pc<' in page and 'data-peer="' in page and "bob-phone" in page
    _, page = await get(web_client, "/admin?q=phone")
    assert "bob-phone" in page and 'value="bob-pc"' not in page
    await web_client.app[STORE].update_device(pc, name="bob-laptop", actor="admin:carol")
    _, page = await get(web_client, "/admin/audit?action=rename&actor=carol")
    assert page.count("<tr data-audit-id=") == 1 and "device.rename" in page
    assert "<time datetime=" in page
    _, page = await get(web_client, "/admin/audit?actor=nobody-at-all")
    assert "No audit record matches." in page
    assert (await get(web_client, "/admin/audit?since=nope"))[0] == 400
    assert (await get(web_client, "/admin/audit?page=0"))[0] == 400
    _, page = await get(web_client, "/admin/policy")
    assert 'id="source">default' in page and 'class="pass">valid' in page
    await pending_code(web_client, "waiting-vm")
    _, page = await get(web_client, "/admin/logins")
    assert "waiting-vm" in page and 'class="fingerprint"' in page


async def test_relays_page_shows_health_and_load(
    aiohttp_client: ClientFactory, tmp_path: Path, clock: FakeClock
) -> None:
    app = create_app(sso_settings(tmp_path, relays=RELAYS), broker_factory=RecordingBroker,
                     clock=clock)  # fmt: skip
    probe = ScriptedProbe()  # relay-2 never answers
    probe.answers[CONTROL_1] = PingResult(0.012, 25, 100)
    app[RELAY_PROBE] = probe  # type: ignore[misc]  # a scripted Probe (see lab.relay_api)
    client = await aiohttp_client(app)
    status, page = await get(client, "/admin/relays")
    assert status == 200, page
    one, two = page.split('id="relay-relay-1"')[1].split('id="relay-relay-2"')
    assert 'class="health up">up' in one and "12.0 ms" in one and "25 %" in one
    assert ">just now</time>" in one
    assert 'class="health down">down' in two and "no answer" in two
    assert 'class="answered">never</td>' in two


async def test_audit_pages_keep_the_filters(web_client: Client) -> None:
    pc = await enroll_for(web_client, BOB, "bob-pc")
    store = web_client.app[STORE]
    for i in range(AUDIT_PAGE + 5):
        await store.update_device(pc, name=f"pc-{i}", actor="admin:carol&co")
    query = "/admin/audit?actor=carol%26co&action=rename"
    _, first = await get(web_client, query)
    assert first.count("<tr data-audit-id=") == AUDIT_PAGE and 'id="newer"' not in first
    older = "?actor=carol%26co&amp;action=rename&amp;page=2"
    assert f'href="{older}"' in first
    _, second = await get(web_client, "/admin/audit" + older.replace("&amp;", "&"))
    assert second.count("<tr data-audit-id=") == 5 and 'id="older"' not in second
    newest = f"<code>pc-{AUDIT_PAGE + 4}</code>"
    assert newest in first and newest not in second and "<code>bob-pc</code>" in second


async def test_device_forms_return_to_the_device_page_when_sent_from_it(
    web_client: Client,
) -> None:
    admin = make_session("carol", ("ops",))
    pc = await enroll_for(web_client, BOB, "bob-pc")
    _, page = await get(web_client, f"/admin/devices/{pc}")
    assert page.count('name="back" value="device"') == 2 and 'name="csrf"' in page
    form = {"tags": "tag:a", "back": "device", "csrf": csrf_token(admin)}
    resp = await web_client.post(f"/admin/devices/{pc}/tags", data=form, allow_redirects=False,
                                 headers=form_headers(web_client, admin))  # fmt: skip
    assert (resp.status, resp.headers["Location"]) == (303, f"/admin/devices/{pc}")
    assert await post(web_client, admin, f"/admin/devices/{pc}/rename", name="pc2",
                      back="https://evil.example") == 303  # fmt: skip
    assert await post(web_client, make_session("dave"), f"/admin/devices/{pc}/tags",
                      tags="tag:b", back="device") == 403  # fmt: skip
    assert (await web_client.app[STORE].get_device(pc)).device.tags == ("tag:a",)


async def test_a_draft_policy_is_checked_and_nothing_applied(web_client: Client) -> None:
    admin, user = make_session("carol", ("ops",)), make_session("dave")
    before = await web_client.app[STORE].policy()

    async def check(who: Session, document: str, fmt: str = "yaml", **extra: str) -> str:
        form = {"document": document, "format": fmt, "csrf": csrf_token(who), **extra}
        resp = await web_client.post("/admin/policy/check", data=form,
                                     headers=form_headers(web_client, who))  # fmt: skip
        return f"{resp.status} {await resp.text()}"

    passing = OPEN + "tests:\n  - {src: tag:a, accept: ['tag:b:5432'], deny: ['tag:c:22']}\n"
    assert 'id="draft-validation" class="pass">valid, its 1 tests pass' in await check(
        admin, passing
    )
    failing = await check(admin, OPEN + "tests:\n  - {src: tag:a, deny: ['tag:b:22']}\n")
    assert 'class="fail">1 of its tests fail' in failing and 'id="draft-failures"' in failing
    assert 'class="fail">invalid: ' in await check(admin, "acls: [", "yaml")
    assert (await check(admin, "{}", "xml")).startswith("400 ")
    assert "&lt;script&gt;" in await check(admin, "<script>")  # the draft is shown escaped
    assert (await check(user, OPEN)).startswith("403 ")
    assert (await check(admin, OPEN, csrf="forged")).startswith("403 ")
    assert await web_client.app[STORE].policy() == before
