"""The web pages' cookies, CSRF tokens and origin checks (pure), and the cookie key file."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from gateway.web import sessions
from gateway.web.keyfile import KEY_FILE, load_or_create_session_key
from gateway.web.sessions import (
    PRE_LOGIN_TTL,
    CookieBox,
    PreLogin,
    Session,
    csrf_matches,
    csrf_token,
    new_session,
    safe_return_path,
    same_origin,
)
from identity.claims import Claims
from identity.pkce import new_login
from wiregate.errors import ConfigError

T0 = 1_700_000_000.0
ISSUER = "https://idp.example"
KEY = bytes(range(32))


def claims(**raw: Any) -> Claims:
    payload = {"iss": ISSUER, "sub": "alice", **raw}
    return Claims(ISSUER, "alice", ("wiregate",), T0 + 300, T0, None, "n", None,
                  MappingProxyType(payload))  # fmt: skip


def session(now: float = T0, **raw: Any) -> Session:
    return new_session(claims(**raw), groups_claim="groups", lifetime=3600, now=now)


def pre_login(now: float = T0, return_to: str = "/login?user_code=BCDF-GHJK") -> PreLogin:
    start = new_login("corp", authorization_endpoint=ISSUER + "/auth", client_id="wiregate",
                      redirect_uri="https://gw.example/oidc/callback", scopes=("openid",),
                      now=now)  # fmt: skip
    return PreLogin(start, return_to)


def flip(value: str, at: int) -> str:
    return value[:at] + ("A" if value[at] != "A" else "B") + value[at + 1 :]


# -- the session cookie ------------------------------------------------------------------


def test_session_round_trip() -> None:
    box, s = CookieBox(KEY), session(email="a@example.test", email_verified=True, name="Alice")
    opened = box.open_session(box.seal_session(s), T0 + 1)
    assert opened == s
    assert (opened.name, opened.email, opened.actor) == ("Alice", "a@example.test",
                                                         f"oidc:{ISSUER}#alice")  # fmt: skip


@pytest.mark.parametrize("at", [0, 10, 30, -5, -3])  # not the last: it may hold pad bits
def test_tampered_session_cookie_is_refused(at: int) -> None:
    box = CookieBox(KEY)
    sealed = box.seal_session(session())
    assert box.open_session(flip(sealed, at), T0) is None
    assert box.open_session(sealed[:-4], T0) is None


@pytest.mark.parametrize("value", ["", "not base64 !!", "AAAA", "A" * 9000, None])
def test_garbage_session_cookie_is_refused(value: str | None) -> None:
    assert CookieBox(KEY).open_session(value, T0) is None


def test_session_sealed_under_another_key_is_refused() -> None:
    sealed = CookieBox(bytes(32)).seal_session(session())
    assert CookieBox(KEY).open_session(sealed, T0) is None


def test_expired_or_future_session_is_refused() -> None:
    box = CookieBox(KEY)
    sealed = box.seal_session(session())
    assert box.open_session(sealed, T0 + 3599) is not None
    assert box.open_session(sealed, T0 + 3600) is None  # expires_at is exclusive
    assert box.open_session(sealed, T0 - 1) is None  # issued in the future


def test_a_cookie_cannot_stand_in_for_the_other() -> None:
    box = CookieBox(KEY)
    assert box.open_pre_login(box.seal_session(session()), T0) is None
    assert box.open_session(box.seal_pre_login(pre_login()), T0) is None


def test_malformed_session_payloads_are_refused() -> None:
    box = CookieBox(KEY)
    good = dataclasses.asdict(session())
    bad: list[dict[str, Any]] = [
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "csrf_secret"},
        {**good, "subject": ""},
        {**good, "expires_at": "tomorrow"},
        {**good, "groups": [1, 2]},
        {**good, "email": 5},
        {**good, "issued_at": True},
    ]
    for payload in bad:
        sealed = sessions._seal(box._session, payload)
        assert box.open_session(sealed, T0) is None, payload


# -- the pre-login cookie ----------------------------------------------------------------


def test_pre_login_round_trip_and_age() -> None:
    box, pre = CookieBox(KEY), pre_login()
    sealed = box.seal_pre_login(pre)
    assert box.open_pre_login(sealed, T0 + 1) == pre
    assert box.open_pre_login(sealed, T0 + PRE_LOGIN_TTL + 1) is None
    assert box.open_pre_login(flip(sealed, 20), T0) is None
    for secret in (pre.start.state, pre.start.nonce, pre.start.code_verifier):
        assert secret not in sealed  # sealed, not merely signed


def test_pre_login_return_path_is_local_only() -> None:
    box = CookieBox(KEY)
    for hostile in ("https://evil.example/", "//evil.example/x", "/\\evil", "javascript:x"):
        opened = box.open_pre_login(box.seal_pre_login(pre_login(return_to=hostile)), T0)
        assert opened is not None and opened.return_to == "/devices"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/login?user_code=BCDF-GHJK", "/login?user_code=BCDF-GHJK"),
        ("/admin", "/admin"),
        ("//evil.example", "/devices"),
        ("https://evil.example/admin", "/devices"),
        ("admin", "/devices"),
        ("/\\evil.example", "/devices"),
        ("/x\ny", "/devices"),
        (None, "/devices"),
        ("/" + "a" * 600, "/devices"),
    ],
)
def test_safe_return_path(given: object, expected: str) -> None:
    assert safe_return_path(given) == expected


# -- what a new session holds (session fixation) -----------------------------------------


def test_every_login_makes_a_fresh_session_unrelated_to_the_pre_login_state() -> None:
    pre = pre_login()
    first, second = session(), session()
    assert first.session_id != second.session_id and first.csrf_secret != second.csrf_secret
    carried = {pre.start.state, pre.start.nonce, pre.start.code_verifier}
    for s in (first, second):
        assert not {s.session_id, s.csrf_secret} & carried


def test_email_only_when_verified() -> None:
    assert session(email="a@example.test", email_verified=True).email == "a@example.test"
    assert session(email="a@example.test", email_verified=False).email is None
    assert session(email="a@example.test", email_verified="true").email is None
    assert session(email="a@example.test").email is None


def test_display_name_falls_back_to_subject() -> None:
    assert session(name="Alice A.").name == "Alice A."
    assert session(name="\x1b[31m", preferred_username="al").name == "al"
    assert session().name == "alice"


def test_groups_are_capped_with_admin_groups_kept_first() -> None:
    many = [f"group-{i:04d}" for i in range(500)] + ["admins", 7, ""]
    s = new_session(claims(groups=many), groups_claim="groups", lifetime=60, now=T0,
                    keep_first={"admins"})  # fmt: skip
    assert s.groups[0] == "admins" and s.in_any({"admins"})
    assert sum(len(g) + 4 for g in s.groups) <= sessions.MAX_GROUPS_CHARS
    assert len(CookieBox(KEY).seal_session(s)) < 4000  # fits in a cookie
    assert session(groups="admins").groups == ()  # not a list: no groups
    assert session(roles=["admins"]).groups == ()  # another claim name


# -- CSRF tokens and origins -------------------------------------------------------------


def test_csrf_token_is_bound_to_its_session() -> None:
    mine, other = session(), session()
    token = csrf_token(mine)
    assert csrf_matches(mine, token)
    assert not csrf_matches(other, token)
    assert not csrf_matches(mine, token[:-1])
    for wrong in ("", None, 5, "é" + token[1:], token + "x"):
        assert not csrf_matches(mine, wrong)
    same_secret = dataclasses.replace(other, csrf_secret=mine.csrf_secret)
    assert not csrf_matches(same_secret, token)  # also bound to the session id


@pytest.mark.parametrize(
    ("origin", "referer", "ok"),
    [
        ("https://gw.example", None, True),
        ("https://gw.example", "https://evil.example/", True),  # Origin decides
        ("https://evil.example", "https://gw.example/devices", False),
        ("null", "https://gw.example/devices", False),
        ("http://gw.example", None, False),  # another scheme is another origin
        ("https://gw.example:8443", None, False),
        (None, "https://gw.example/devices", True),
        (None, "https://gw.example.evil.example/", False),
        (None, "https://evil.example/?https://gw.example/", False),
        (None, None, False),
    ],
)
def test_same_origin(origin: str | None, referer: str | None, ok: bool) -> None:
    assert same_origin("https://gw.example", origin, referer) is ok


# -- the key file ------------------------------------------------------------------------


def test_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    key = load_or_create_session_key(tmp_path / "state")
    path = tmp_path / "state" / KEY_FILE
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_session_key(tmp_path / "state") == key
    assert key.hex() not in path.read_text()  # base64, and the only copy


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    load_or_create_session_key(tmp_path)
    (tmp_path / KEY_FILE).chmod(mode)
    with pytest.raises(ConfigError, match="readable by group or others"):
        load_or_create_session_key(tmp_path)


def test_key_file_that_is_not_a_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    path.write_text("c2hvcnQ=\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not 32 bytes"):
        load_or_create_session_key(tmp_path)
