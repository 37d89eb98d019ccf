"""The SSO pages over HTTP (aiohttp's test client): CSRF and origin checks, sessions, access.

Sessions are sealed with the app's own cookie box (as a sign-in would make
them); the configured IdP listens nowhere, so any new sign-in fails with 503 —
which is also what "the IdP is down" must look like.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.appkeys import BROKER, STORE, WEB
from gateway.web.guard import SECURITY_HEADERS
from gateway.web.sessions import Session, csrf_token
from identity.device_login import format_user_code
from identity.enrollment import KEY_PREFIX
from lab.api_client import RecordingBroker, make_settings
from lab.fakes import T0, FakeClock, new_key
from wiregate.errors import ConfigError
from wiregate.model import Identity
from wiregate.settings import GatewaySettings, OidcIssuerSettings

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]
ORIGIN = "http://127.0.0.1:8080"  # http is allowed on loopback only
IDP = "http://127.0.0.1:{port}"


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sso_settings(tmp_path: Path, **kw: Any) -> GatewaySettings:
    secret = tmp_path / "client-secret"
    secret.write_text("s3cret\n")
    issuer = OidcIssuerSettings(
        name="corp",
        issuer=IDP.format(port=_dead_port()),
        client_id="wiregate",
        client_secret=f"file:{secret}",
        insecure_http=True,
    )
    values: dict[str, Any] = {"public_url": ORIGIN, "oidc": [issuer], "admin_groups": ["ops"]}
    return make_settings(tmp_path, **{**values, **kw})


@pytest.fixture
async def web_client(aiohttp_client: ClientFactory, tmp_path: Path, clock: FakeClock) -> Client:
    app = create_app(sso_settings(tmp_path), broker_factory=RecordingBroker, clock=clock)
    return await aiohttp_client(app)


def make_session(subject: str = "alice", groups: tuple[str, ...] = (), now: float = T0) -> Session:
    return Session(f"sid-{subject}-{now}", "https://idp.example", subject, subject.title(), None,
                   groups, now, now + 3600, f"csrf-secret-{subject}-{now}")  # fmt: skip


def cookie(client: Client, session: Session) -> dict[str, str]:
    return {"Cookie": "wiregate_session=" + client.app[WEB].box.seal_session(session)}


def form_headers(client: Client, session: Session, origin: str = ORIGIN) -> dict[str, str]:
    return {**cookie(client, session), "Origin": origin}


async def pending_code(client: Client, name: str = "laptop-1") -> tuple[str, str]:
    created = await client.app[STORE].create_login_request(new_key(), name, T0)
    return format_user_code(created.user_code), created.record.id


async def snapshot(client: Client) -> tuple[int, int, list[str]]:
    store = client.app[STORE]
    logins = [str(r) for r in await store.list_keys()]
    return len(await store.list_devices()), await store.map_version(), logins


async def enroll_for(client: Client, identity: Identity, name: str) -> str:
    store = client.app[STORE]
    _, request_id = await pending_code(client, name)
    approved = await store.approve_login_request(request_id, identity, (), T0)
    return approved.record.device.id


# -- headers and not-configured ---------------------------------------------------------


async def test_security_headers_on_every_page(web_client: Client) -> None:
    me = make_session()
    pages = [
        ("/login", {}),
        ("/devices", cookie(web_client, me)),
        ("/static/wiregate.css", {}),
        ("/login?user_code=nope", cookie(web_client, me)),
    ]
    for path, headers in pages:
        resp = await web_client.get(path, headers=headers, allow_redirects=False)
        for name, value in SECURITY_HEADERS.items():
            assert resp.headers[name] == value, (path, name)
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    assert csp.startswith("default-src 'self'") and "unsafe-inline" not in csp


async def test_without_issuers_the_pages_say_sso_is_not_configured(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(make_settings(tmp_path)))
    for path in ("/login", "/devices", "/admin", "/oidc/callback?code=x&state=y"):
        resp = await client.get(path, allow_redirects=False)
        assert resp.status == 503 and "not configured" in await resp.text()
        assert resp.headers["X-Frame-Options"] == "DENY"


def test_issuers_without_public_url_or_with_a_literal_secret_are_refused(tmp_path: Path) -> None:
    from gateway.web.context import build_context

    with pytest.raises(ConfigError, match="public_url"):
        build_context(sso_settings(tmp_path, public_url=""), clock=lambda: T0)
    with pytest.raises(ValueError, match="file:PATH or env:VAR"):
        OidcIssuerSettings(name="x", issuer="https://i.example", client_id="c",
                           client_secret="hunter2")  # fmt: skip
    with pytest.raises(ValueError, match="without a path"):
        make_settings(tmp_path, public_url="https://gw.example/sso")


# -- the approval flow ------------------------------------------------------------------


async def test_approval_page_shows_name_and_fingerprint_then_approves(web_client: Client) -> None:
    me = make_session()
    code, _ = await pending_code(web_client, "laptop-7")
    page = await web_client.get(f"/login?code={code}", headers=cookie(web_client, me))
    text = await page.text()
    record = await web_client.app[STORE].find_login_request(code, T0)
    assert page.status == 200 and "laptop-7" in text and record.fingerprint in text
    assert csrf_token(me) in text
    form = {"user_code": code, "csrf": csrf_token(me)}
    done = await web_client.post("/login/approve", data=form, headers=form_headers(web_client, me))
    assert done.status == 200 and "Device approved" in await done.text()
    devices = await web_client.app[STORE].devices_of(me.identity)
    assert [d.device.name for d in devices] == ["laptop-7"]


async def test_guessing_codes_on_the_page_is_charged_to_the_limiter(web_client: Client) -> None:
    headers = cookie(web_client, make_session())
    statuses = [
        (await web_client.get("/login?user_code=BCDF-GHJK", headers=headers)).status
        for _ in range(12)
    ]
    assert statuses[:10] == [404] * 10 and statuses[10:] == [429, 429]


# -- refused POSTs change nothing ----------------------------------------------------------


Refusal = tuple[str, dict[str, str], dict[str, str]]


def _refusals(client: Client, me: Session, code: str) -> list[Refusal]:
    good = {"user_code": code, "csrf": csrf_token(me)}
    other = make_session("mallory")
    expired = make_session(now=T0 - 3600)
    tampered = cookie(client, me)["Cookie"][:-6] + "AAAAAA"
    return [
        ("no csrf", {"user_code": code}, form_headers(client, me)),
        ("wrong csrf", {**good, "csrf": "forged"}, form_headers(client, me)),
        ("another session's csrf", {**good, "csrf": csrf_token(other)}, form_headers(client, me)),
        ("cross origin", good, form_headers(client, me, "http://evil.example")),
        ("origin null", good, form_headers(client, me, "null")),
        ("no origin or referer", good, cookie(client, me)),
        ("foreign referer", good, {**cookie(client, me), "Referer": "http://evil.example/x"}),
        ("no session", good, {"Origin": ORIGIN}),
        ("expired session", {**good, "csrf": csrf_token(expired)}, form_headers(client, expired)),
        ("tampered cookie", good, {"Cookie": tampered, "Origin": ORIGIN}),
    ]


async def test_refused_posts_are_403_and_change_nothing(web_client: Client) -> None:
    me = make_session()
    code, _ = await pending_code(web_client)
    before = await snapshot(web_client)
    for why, form, headers in _refusals(web_client, me, code):
        for path in ("/login/approve", "/login/deny"):
            resp = await web_client.post(path, data=form, headers=headers)
            assert resp.status == 403, (why, path)
            assert "nothing was changed" in await resp.text()
            assert resp.headers["Cache-Control"] == "no-store"
    assert await snapshot(web_client) == before
    assert (await web_client.app[STORE].find_login_request(code, T0)).status == "pending"


async def test_same_origin_referer_without_origin_is_accepted(web_client: Client) -> None:
    me = make_session()
    code, _ = await pending_code(web_client)
    headers = {**cookie(web_client, me), "Referer": ORIGIN + "/login?code=" + code}
    form = {"user_code": code, "csrf": csrf_token(me)}
    assert (await web_client.post("/login/deny", data=form, headers=headers)).status == 200


# -- sessions: cookies, sign-out, IdP down ---------------------------------------------------


async def test_logout_clears_and_ends_the_session(web_client: Client) -> None:
    me = make_session()
    headers = form_headers(web_client, me)
    resp = await web_client.post("/logout", data={"csrf": csrf_token(me)}, headers=headers)
    assert resp.status == 200
    set_cookie = resp.headers["Set-Cookie"]
    assert set_cookie.startswith('wiregate_session=""') and "Max-Age=0" in set_cookie
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie and "Path=/" in set_cookie
    again = await web_client.get("/devices", headers=cookie(web_client, me))
    assert again.status == 503  # signed out: a new sign-in is needed (and the IdP is down)
    replay = await web_client.post("/logout", data={"csrf": csrf_token(me)}, headers=headers)
    assert replay.status == 403


async def test_https_public_url_uses_host_prefixed_secure_cookies(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    settings = sso_settings(tmp_path, public_url="https://gw.test")
    client = await aiohttp_client(create_app(settings, broker_factory=RecordingBroker))
    me = make_session(now=time.time())
    sealed = client.app[WEB].box.seal_session(me)
    headers = {"Cookie": f"__Host-wiregate_session={sealed}", "Origin": "https://gw.test"}
    resp = await client.post("/logout", data={"csrf": csrf_token(me)}, headers=headers)
    assert resp.status == 200
    assert resp.headers["Set-Cookie"].startswith("__Host-wiregate_session=")
    assert "Secure" in resp.headers["Set-Cookie"]
    plain = {"Cookie": f"wiregate_session={sealed}", "Origin": "https://gw.test"}
    assert (
        await client.post("/logout", data={"csrf": csrf_token(me)}, headers=plain)
    ).status == 403


async def test_idp_down_sessions_go_on_new_sign_ins_fail_clearly(web_client: Client) -> None:
    resp = await web_client.get("/devices", headers=cookie(web_client, make_session()))
    assert resp.status == 200 and "My devices" in await resp.text()
    refused = await web_client.get("/devices", allow_redirects=False)
    text = await refused.text()
    assert refused.status == 503 and 'data-code="idp_unavailable"' in text
    assert "Set-Cookie" not in refused.headers


async def test_callback_without_its_login_cookie_is_refused(web_client: Client) -> None:
    resp = await web_client.get("/oidc/callback?code=abc&state=def", allow_redirects=False)
    assert resp.status == 401 and 'data-code="login_expired"' in await resp.text()
    assert "wiregate_session" not in resp.headers.get("Set-Cookie", "")


# -- my devices and admin ------------------------------------------------------------------


async def test_others_devices_cannot_be_renamed_or_revoked(web_client: Client) -> None:
    me = make_session()
    theirs = await enroll_for(web_client, Identity("https://idp.example", "bob"), "bob-pc")
    before = await snapshot(web_client)
    for action, form in (("rename", {"name": "mine-now"}), ("revoke", {})):
        data = {**form, "csrf": csrf_token(me)}
        resp = await web_client.post(f"/devices/{theirs}/{action}", data=data,
                                     headers=form_headers(web_client, me))  # fmt: skip
        assert resp.status == 404
    assert await snapshot(web_client) == before
    page = await (await web_client.get("/devices", headers=cookie(web_client, me))).text()
    assert "bob-pc" not in page


async def test_rename_and_revoke_own_device(web_client: Client) -> None:
    me = make_session()
    mine = await enroll_for(web_client, me.identity, "old-name")
    headers, csrf = form_headers(web_client, me), csrf_token(me)
    bad = await web_client.post(f"/devices/{mine}/rename", data={"name": "../x", "csrf": csrf},
                                headers=headers)  # fmt: skip
    assert bad.status == 400
    ok = await web_client.post(f"/devices/{mine}/rename", data={"name": "new-name", "csrf": csrf},
                               headers=headers, allow_redirects=False)  # fmt: skip
    assert ok.status == 303 and ok.headers["Location"] == "/devices"
    assert (await web_client.app[STORE].get_device(mine)).device.name == "new-name"
    gone = await web_client.post(f"/devices/{mine}/revoke", data={"csrf": csrf},
                                 headers=headers, allow_redirects=False)  # fmt: skip
    assert gone.status == 303 and await web_client.app[STORE].devices_of(me.identity) == []
    broker = web_client.app[BROKER]
    assert isinstance(broker, RecordingBroker)
    version = await web_client.app[STORE].map_version()
    assert broker.events[-2:] == [("upsert", mine, version - 1), ("remove", mine, version)]


async def test_admin_page_is_for_admin_groups_only(web_client: Client) -> None:
    admin, user = make_session("carol", ("ops",)), make_session("dave", ("eng",))
    assert (await web_client.get("/admin", headers=cookie(web_client, admin))).status == 200
    refused = await web_client.get("/admin", headers=cookie(web_client, user))
    assert refused.status == 403 and 'data-code="not_an_admin"' in await refused.text()
    form = {"expiry": "3600", "tags": "tag:ci", "csrf": csrf_token(user)}
    before = await snapshot(web_client)
    resp = await web_client.post("/admin/keys", data=form, headers=form_headers(web_client, user))
    assert resp.status == 403 and await snapshot(web_client) == before
    form["csrf"] = csrf_token(admin)
    made = await web_client.post("/admin/keys", data=form, headers=form_headers(web_client, admin))
    assert made.status == 200 and KEY_PREFIX in await made.text()
    keys = await web_client.app[STORE].list_keys()
    assert [k.tags for k in keys] == [("tag:ci",)]


async def test_several_issuers_get_a_chooser_that_keeps_the_page(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    settings = sso_settings(tmp_path)
    second = settings.oidc[0].model_copy(update={"name": "partner"})
    settings = settings.model_copy(update={"oidc": [settings.oidc[0], second]})
    client = await aiohttp_client(create_app(settings, broker_factory=RecordingBroker))
    for path in ("/login?user_code=BCDF-GHJK", "/login?user_code=BCDF-GHJK&provider=nope"):
        resp = await client.get(path, allow_redirects=False)
        text = await resp.text()
        assert resp.status == 200 and "Set-Cookie" not in resp.headers
        assert 'href="/login?user_code=BCDF-GHJK&amp;provider=corp"' in text
        assert 'href="/login?user_code=BCDF-GHJK&amp;provider=partner"' in text
    chosen = await client.get("/login?user_code=BCDF-GHJK&provider=partner")
    assert chosen.status == 503 and "partner" in await chosen.text()  # its IdP is down


async def test_oversized_forms_and_failures_are_html_pages_with_headers(
    web_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    me = make_session()
    big = {"user_code": "x" * 8000, "csrf": csrf_token(me)}
    resp = await web_client.post("/login/approve", data=big, headers=form_headers(web_client, me))
    assert resp.status == 413 and resp.content_type == "text/html"
    assert resp.headers["X-Frame-Options"] == "DENY"

    async def broken(_identity: Identity) -> None:
        raise RuntimeError("database exploded at /secret/path")

    monkeypatch.setattr(web_client.app[STORE], "devices_of", broken)
    failed = await web_client.get("/devices", headers=cookie(web_client, me))
    text = await failed.text()
    assert failed.status == 500 and "internal error" in text and "/secret/path" not in text
    assert failed.headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]


def test_client_secret_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.web.context import build_context

    settings = sso_settings(tmp_path)
    issuer = settings.oidc[0].model_copy(update={"client_secret": "env:WG_TEST_OIDC_SECRET"})
    settings = settings.model_copy(update={"oidc": [issuer]})
    with pytest.raises(ConfigError, match="WG_TEST_OIDC_SECRET is empty or unset"):
        build_context(settings, clock=lambda: T0)
    monkeypatch.setenv("WG_TEST_OIDC_SECRET", "from-env")
    ctx = build_context(settings, clock=lambda: T0)
    assert ctx.rp is not None and ctx.rp.providers == ("corp",)
    provider = ctx.rp._issuers["corp"].provider
    assert provider.client_secret.reveal() == "from-env" and "from-env" not in repr(provider)
    assert provider.redirect_uri == ORIGIN + "/oidc/callback"


async def test_verification_uri_is_on_the_public_url(web_client: Client) -> None:
    body = {"public_key": new_key(), "name": "laptop-9"}
    created = await (await web_client.post("/api/v1/login/requests", json=body)).json()
    assert created["verification_uri"] == ORIGIN + "/login"
    assert created["verification_uri_complete"].startswith(ORIGIN + "/login?code=")


POLICY_DOC = {
    "groups": {"eng": {"issuer": "https://idp.example", "claim": "groups", "values": ["eng"]}},
    "tag_rules": [
        {"group": "eng", "tags": ["tag:laptop"]},
        {
            "issuer": "https://idp.example",
            "claim": "email",
            "match": "*@example.test",
            "tags": ["tag:staff"],
        },
    ],
    "acls": [{"src": ["*"], "dst": ["*"]}],
}


@pytest.mark.parametrize(
    ("groups", "email", "tags", "policy_groups"),
    [
        (("eng",), "dave@example.test", ("tag:laptop", "tag:staff"), ("eng",)),
        (("eng",), None, ("tag:laptop",), ("eng",)),  # an unverified email is not in a session
        (("sales",), None, (), ()),
    ],
)
async def test_approval_gives_what_the_policy_grants(
    aiohttp_client: ClientFactory,
    tmp_path: Path,
    groups: tuple[str, ...],
    email: str | None,
    tags: tuple[str, ...],
    policy_groups: tuple[str, ...],
) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY_DOC))
    settings = sso_settings(tmp_path, policy_file=policy)
    app = create_app(settings, broker_factory=RecordingBroker, clock=FakeClock())
    client = await aiohttp_client(app)
    me = dataclasses.replace(make_session("dave", groups), email=email)
    code, _ = await pending_code(client)
    form = {"user_code": code, "csrf": csrf_token(me)}
    resp = await client.post("/login/approve", data=form, headers=form_headers(client, me))
    assert resp.status == 200
    [device] = await client.app[STORE].devices_of(me.identity)
    assert (device.device.tags, device.device.groups) == (tags, policy_groups)


async def test_a_disabled_identity_cannot_approve(web_client: Client) -> None:
    me = make_session()
    await enroll_for(web_client, me.identity, "first")  # the identity exists
    await web_client.app[STORE].set_identity_disabled(me.identity, True, actor="admin:socket")
    code, _ = await pending_code(web_client, "second")
    before = await snapshot(web_client)
    form = {"user_code": code, "csrf": csrf_token(me)}
    resp = await web_client.post("/login/approve", data=form, headers=form_headers(web_client, me))
    assert resp.status == 403 and 'data-code="identity_disabled"' in await resp.text()
    assert await snapshot(web_client) == before
