"""The relying party's pure parts (identity.pkce) and its polling loop, without network."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity import oidc, pkce
from identity.jwks import Fetched, discovery_url
from identity.oidc import ClientSecret, OidcProvider, OidcRelyingParty
from identity.pkce import (
    LoginStart,
    TokenReply,
    check_callback,
    new_login,
    next_poll_interval,
    parse_device_authorization,
    parse_endpoints,
    parse_token_reply,
    s256_challenge,
)
from lab.tokenkit import T0, FakeClock
from wiregate.errors import ConfigError, Unauthorized, Unavailable

ISSUER = "https://idp.example.com"
AUTHZ = ISSUER + "/authorize"
REDIRECT = "https://gw.example.com/oidc/callback"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def start(now: float = T0) -> LoginStart:
    return new_login(
        "corp",
        authorization_endpoint=AUTHZ,
        client_id="wiregate",
        redirect_uri=REDIRECT,
        scopes=("openid", "email"),
        now=now,
    )


def callback(params: Mapping[str, str], expected: LoginStart, **kw: object) -> str:
    options: dict[str, object] = {"issuer": ISSUER, "require_iss": False, "now": T0 + 5}
    options |= {"max_age": 600.0, **kw}
    return check_callback(params, expected, **options)  # type: ignore[arg-type]


def test_exported_api() -> None:
    assert "OidcRelyingParty" in oidc.__all__ and "LoginStart" in pkce.__all__
    assert all(hasattr(pkce, name) for name in pkce.__all__)
    assert all(hasattr(oidc, name) for name in oidc.__all__)


def test_s256_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert s256_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


@pytest.mark.parametrize("verifier", ["short", "a" * 129, "a" * 42 + "!", ""])
def test_s256_refuses_malformed_verifiers(verifier: str) -> None:
    with pytest.raises(ValueError):
        s256_challenge(verifier)


def test_random_values_carry_enough_entropy() -> None:
    tokens = {pkce.random_token() for _ in range(200)}
    assert len(tokens) == 200 and all(len(t) == 43 for t in tokens)
    assert len(pkce.random_token(16)) == 22  # 128 bits
    with pytest.raises(ValueError):
        pkce.random_token(15)
    assert len(pkce.new_verifier()) == 43


def test_authorization_url_carries_exactly_the_request() -> None:
    login = start()
    parts = urlsplit(login.url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == AUTHZ
    query = {k: v[0] for k, v in parse_qs(parts.query, strict_parsing=True).items()}
    assert query == {
        "response_type": "code",
        "client_id": "wiregate",
        "redirect_uri": REDIRECT,
        "scope": "openid email",
        "state": login.state,
        "nonce": login.nonce,
        "code_challenge": s256_challenge(login.code_verifier),
        "code_challenge_method": "S256",
    }
    assert len({login.state, login.nonce, login.code_verifier}) == 3


def test_authorization_endpoint_query_is_kept_and_cannot_inject() -> None:
    kw = {"client_id": "c", "redirect_uri": REDIRECT, "scopes": ("openid",), "now": T0}
    url = new_login("p", authorization_endpoint=AUTHZ + "?tenant=a", **kw).url  # type: ignore[arg-type]
    assert parse_qs(urlsplit(url).query)["tenant"] == ["a"]
    with pytest.raises(Unavailable):
        new_login("p", authorization_endpoint=AUTHZ + "?redirect_uri=x", **kw)  # type: ignore[arg-type]


def test_login_state_hides_secrets_and_round_trips() -> None:
    login = start()
    for secret in (login.state, login.nonce, login.code_verifier):
        assert secret not in repr(login)
    assert LoginStart.from_dict(json.loads(json.dumps(login.to_dict()))) == login
    broken = login.to_dict() | {"code_verifier": 7}
    with pytest.raises(Unauthorized, match="unusable"):
        LoginStart.from_dict(broken)
    with pytest.raises(Unauthorized):
        LoginStart.from_dict(login.to_dict() | {"created_at": True})


def test_callback_accepts_the_right_answer() -> None:
    login = start()
    assert callback({"code": "c0de", "state": login.state}, login) == "c0de"
    params = {"code": "c0de", "state": login.state, "iss": ISSUER}
    assert callback(params, login, require_iss=True) == "c0de"


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"code": "c"}, "state missing"),
        ({"code": "c", "state": ""}, "state missing"),
        ({"code": "c", "state": "other"}, "state does not match"),
        ({"state": "$S"}, "no authorization code"),
        ({"state": "$S", "code": ""}, "no authorization code"),
        ({"state": "$S", "error": "access_denied"}, "answered access_denied"),
        ({"state": "$S", "code": "c", "iss": ISSUER + "/"}, "another issuer"),
        ({"state": "$S", "code": "c" * 3000}, "too long"),
    ],
)
def test_callback_refusals(params: dict[str, str], reason: str) -> None:
    login = start()
    params = {k: login.state if v == "$S" else v for k, v in params.items()}
    with pytest.raises(Unauthorized, match=reason):
        callback(params, login)


def test_callback_requires_iss_when_advertised_and_never_echoes() -> None:
    login = start()
    with pytest.raises(Unauthorized, match="another issuer"):
        callback({"code": "c", "state": login.state}, login, require_iss=True)
    evil = {"state": login.state, "error": "<script>alert(1)</script>"}
    with pytest.raises(Unauthorized) as caught:
        callback(evil, login)
    assert "script" not in caught.value.message


@pytest.mark.parametrize("now", [T0 + 601, T0 - 1])
def test_callback_refuses_an_old_or_future_login(now: float) -> None:
    login = start()
    with pytest.raises(Unauthorized, match="took too long"):
        callback({"code": "c", "state": login.state}, login, now=now)


@given(st.text(min_size=1, max_size=100))
def test_any_other_state_is_refused(state: str) -> None:
    login = start()
    if state != login.state:
        with pytest.raises(Unauthorized):
            callback({"code": "c", "state": state}, login)


def test_token_replies() -> None:
    assert parse_token_reply(200, b'{"id_token":"a.b.c"}', issuer=ISSUER).id_token == "a.b.c"
    assert "a.b.c" not in repr(TokenReply(id_token="a.b.c"))
    refused = parse_token_reply(400, b'{"error":"invalid_grant"}', issuer=ISSUER)
    assert refused == TokenReply(error="invalid_grant")
    with pytest.raises(Unauthorized, match="no ID token"):
        parse_token_reply(200, b'{"access_token":"x"}', issuer=ISSUER)
    with pytest.raises(Unavailable, match="HTTP 502"):
        parse_token_reply(502, b"oops", issuer=ISSUER)
    with pytest.raises(Unavailable):
        parse_token_reply(200, b"<html>", issuer=ISSUER)


def test_token_refusal_blames_our_credentials_on_invalid_client() -> None:
    assert isinstance(pkce.token_refusal(TokenReply(error="invalid_client"), ISSUER), Unavailable)
    refusal = pkce.token_refusal(TokenReply(error="invalid_grant"), ISSUER)
    assert isinstance(refusal, Unauthorized) and refusal.code == "invalid_grant"


def test_device_authorization_parsing() -> None:
    body = {"device_code": "DEV", "user_code": "ABCD-EFGH", "verification_uri": ISSUER + "/device"}
    device = parse_device_authorization(
        "corp", json.dumps(body | {"expires_in": 600}).encode(), now=T0
    )
    assert device.interval == 5.0 and device.expires_at == T0 + 600
    assert "DEV" not in repr(device) and device.verification_uri_complete is None
    fast = body | {"expires_in": 600, "interval": 0}
    assert parse_device_authorization("corp", json.dumps(fast).encode(), now=T0).interval == 1.0
    for broken in (body, body | {"expires_in": "600"}, {"expires_in": 600}):
        with pytest.raises(Unavailable):
            parse_device_authorization("corp", json.dumps(broken).encode(), now=T0)


def test_poll_answers() -> None:
    assert next_poll_interval(TokenReply(error="authorization_pending"), 2, issuer=ISSUER) == 2
    assert next_poll_interval(TokenReply(error="slow_down"), 2, issuer=ISSUER) == 7
    for error in ("expired_token", "access_denied", "invalid_grant"):
        with pytest.raises(Unauthorized) as caught:
            next_poll_interval(TokenReply(error=error), 2, issuer=ISSUER)
        assert caught.value.code == error


def discovery(**extra: object) -> bytes:
    doc = {"issuer": ISSUER, "jwks_uri": ISSUER + "/jwks", "authorization_endpoint": AUTHZ}
    return json.dumps(doc | {"token_endpoint": ISSUER + "/token"} | extra).encode()


def test_endpoints_from_discovery() -> None:
    found = parse_endpoints(discovery(), issuer=ISSUER)
    assert found.token == ISSUER + "/token" and found.device_authorization is None
    assert found.auth_methods == ("client_secret_basic",) and not found.iss_parameter
    with pytest.raises(Unavailable, match="another issuer"):
        parse_endpoints(discovery(), issuer=ISSUER + "/")
    with pytest.raises(Unavailable, match="https"):
        parse_endpoints(discovery(token_endpoint="http://idp.example.com/t"), issuer=ISSUER)


def test_client_secret_from_file_is_never_shown(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("s3cr3t-value\n")
    secret = ClientSecret.from_file(path)
    assert secret.reveal() == "s3cr3t-value"
    provider = make_provider(secret)
    assert "s3cr3t" not in repr(provider) + str(secret) + repr(secret)
    with pytest.raises(ConfigError):
        ClientSecret.from_file(tmp_path / "absent")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError):
        ClientSecret.from_file(tmp_path / "empty")


def make_provider(secret: ClientSecret | None = None, **kw: object) -> OidcProvider:
    settings: dict[str, object] = {"name": "corp", "issuer": ISSUER, "client_id": "wiregate"}
    settings |= {"client_secret": secret or ClientSecret("x"), "redirect_uri": REDIRECT, **kw}
    return OidcProvider(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "Corp!"},
        {"scopes": ("email",)},
        {"token_auth_method": "none"},
        {"redirect_uri": "http://gw.example.com/cb"},
        {"algorithms": ("HS256",)},
        {"issuer": "http://idp.example.com"},
    ],
)
def test_provider_config_refusals(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        make_provider(**bad)


class FakeIdp:
    """Discovery over a fake fetcher; token answers from a script; records sleeps."""

    def __init__(self, answers: list[tuple[int, dict[str, object]]]) -> None:
        self.answers = answers
        self.forms: list[dict[str, str]] = []
        self.headers: list[dict[str, str]] = []
        self.sleeps: list[float] = []

    async def fetch(self, url: str) -> Fetched:
        assert url == discovery_url(ISSUER)
        return Fetched(discovery(device_authorization_endpoint=ISSUER + "/device"))

    async def post_form(
        self, url: str, form: Mapping[str, str], headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        self.forms.append(dict(form))
        self.headers.append(dict(headers))
        status, body = self.answers.pop(0)
        return status, json.dumps(body).encode()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def relying_party(fake: FakeIdp, clock: FakeClock) -> OidcRelyingParty:
    provider = make_provider(ClientSecret("s3cr3t"))
    return OidcRelyingParty([provider], clock=clock, sleep=fake.sleep, fetcher=fake, poster=fake)


async def test_device_polling_honours_interval_and_slow_down() -> None:
    device = {"device_code": "DEV", "user_code": "U", "verification_uri": ISSUER + "/d"}
    pending, slow = {"error": "authorization_pending"}, {"error": "slow_down"}
    fake = FakeIdp([(200, device | {"expires_in": 60, "interval": 2})])
    fake.answers += [(400, pending), (400, slow), (400, pending), (400, {"error": "access_denied"})]
    rp = relying_party(fake, FakeClock())
    started = await rp.start_device_authorization("corp")
    with pytest.raises(Unauthorized, match="denied"):
        await rp.poll_device_token(started)
    assert fake.sleeps == [2, 2, 7, 7]
    assert fake.forms[1] == {"grant_type": DEVICE_GRANT, "device_code": "DEV"}
    assert fake.headers[1]["Authorization"].startswith("Basic ")


async def test_device_polling_stops_at_expiry() -> None:
    device = {"device_code": "DEV", "user_code": "U", "verification_uri": ISSUER + "/d"}
    fake = FakeIdp([(200, device | {"expires_in": 3, "interval": 2})])
    fake.answers += [(400, {"error": "authorization_pending"})] * 5
    clock = FakeClock()

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    rp = OidcRelyingParty([make_provider()], clock=clock, sleep=sleep, fetcher=fake, poster=fake)
    started = await rp.start_device_authorization("corp")
    with pytest.raises(Unauthorized, match="expired") as caught:
        await rp.poll_device_token(started)
    assert caught.value.code == "expired_token" and len(fake.forms) == 2


async def test_unknown_provider_and_wrong_login_are_refused() -> None:
    fake = FakeIdp([])
    rp = relying_party(fake, FakeClock())
    with pytest.raises(Unauthorized, match="unknown identity provider"):
        await rp.begin_login("nope")
    login = await rp.begin_login("corp")
    other = LoginStart.from_dict(login.to_dict() | {"provider": "other"})
    with pytest.raises(Unauthorized, match="started elsewhere"):
        await rp.complete_login("corp", {"state": login.state, "code": "c"}, other)
    with pytest.raises(ConfigError):
        OidcRelyingParty([make_provider(), make_provider()], clock=FakeClock())
