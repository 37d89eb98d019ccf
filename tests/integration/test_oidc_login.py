"""The relying party against a real OpenID Provider (oidc-provider) over loopback.

A login is driven over HTTP without a browser: follow the authorize redirects,
fill the development login and consent forms (action and hidden fields parsed
from the HTML), stop at the redirect URI and hand its query to the RP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qsl, urljoin, urlsplit

import aiohttp
import pytest

from identity.claims import verified_email
from identity.oidc import AiohttpPoster, ClientSecret, OidcProvider, OidcRelyingParty
from identity.pkce import LoginStart, new_verifier
from lab.idp import REDIRECT_URI, RunningIdp
from wiregate.errors import Unauthorized, Unavailable
from wiregate.model import Identity

pytestmark = pytest.mark.timeout(60)


class _Forms(HTMLParser):
    """The forms (action, fields) and abort links of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.abort_links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), {}))
        elif tag == "input" and self.forms and a.get("name"):
            kind, name = a.get("type", "text"), a["name"]
            value = {"text": "alice", "password": "any"}.get(kind, a.get("value", ""))
            self.forms[-1][1][name] = value
        elif tag == "a" and "/abort" in a.get("href", ""):
            self.abort_links.append(a["href"])


@dataclasses.dataclass
class Landing:
    url: str
    status: int
    body: str

    @property
    def params(self) -> dict[str, str]:
        pairs = parse_qsl(urlsplit(self.url).query)
        assert len({k for k, _ in pairs}) == len(pairs), "duplicate parameters"
        return dict(pairs)


async def browse(
    url: str, *, stop_at: str | None = REDIRECT_URI, login: str = "alice", abort: bool = False
) -> Landing:
    """Act as the user's browser from ``url`` until the redirect URI or a final page."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as session:
        method, data, aborted = "GET", None, False
        for _ in range(20):
            async with session.request(method, url, data=data, allow_redirects=False) as resp:
                body = await resp.text()
                location = resp.headers.get("Location")
            if location is not None:
                url, method, data = urljoin(url, location), "GET", None
                if stop_at is not None and url.startswith(stop_at + "?"):
                    return Landing(url, 303, "")
                continue
            page = _Forms()
            page.feed(body)
            if resp.status != 200 or not page.forms or aborted:
                return Landing(url, resp.status, body)
            if abort and page.abort_links:
                url, method, data = urljoin(url, page.abort_links[0]), "GET", None
                continue
            action, fields = page.forms[0]
            fields = {k: login if v == "alice" else v for k, v in fields.items()}
            if abort and "confirm" in fields:
                fields["abort"], aborted = "yes", True
            url, method, data = urljoin(url, action), "POST", fields
    raise AssertionError("the login did not finish in 20 steps")


def make_provider(idp: RunningIdp, secret_file: Path, **overrides: object) -> OidcProvider:
    settings: dict[str, object] = {
        "name": "corp",
        "issuer": idp.issuer,
        "client_id": "wiregate",
        "client_secret": ClientSecret.from_file(secret_file),
        "redirect_uri": REDIRECT_URI,
        "insecure_http": True,
    }
    settings.update(overrides)
    return OidcProvider(**settings)  # type: ignore[arg-type]


@pytest.fixture
def rp(idp: RunningIdp, secret_files: dict[str, Path]) -> OidcRelyingParty:
    basic = make_provider(idp, secret_files["wiregate"])
    post = make_provider(
        idp,
        secret_files["wiregate-post"],
        name="corp-post",
        client_id="wiregate-post",
        token_auth_method="client_secret_post",
    )
    return OidcRelyingParty([basic, post], clock=time.time)


async def login(
    rp: OidcRelyingParty, provider: str = "corp", user: str = "alice"
) -> tuple[LoginStart, dict[str, str]]:
    start = await rp.begin_login(provider)
    landing = await browse(start.url, login=user)
    assert landing.url.startswith(REDIRECT_URI + "?"), landing.body[:300]
    return start, landing.params


async def raw_token_request(idp: RunningIdp, form: dict[str, str]) -> tuple[int, bytes]:
    auth = aiohttp.encode_basic_auth("wiregate", "wiregate-test-secret-basic")
    return await AiohttpPoster().post_form(idp.issuer + "/token", form, {"Authorization": auth})


async def test_login_with_code_and_pkce(rp: OidcRelyingParty, idp: RunningIdp) -> None:
    start, params = await login(rp, user="alice")
    assert set(params) == {"code", "state", "iss"} and params["iss"] == idp.issuer
    claims = await rp.complete_login("corp", params, start)
    assert claims.identity == Identity(idp.issuer, "alice")
    assert claims.audience == ("wiregate",) and claims.nonce == start.nonce
    assert verified_email(claims) == "alice@example.test"


async def test_login_with_client_secret_post(rp: OidcRelyingParty, idp: RunningIdp) -> None:
    start, params = await login(rp, "corp-post", user="bob")
    claims = await rp.complete_login("corp-post", params, start)
    assert claims.identity == Identity(idp.issuer, "bob")


async def test_state_wrong_or_missing_is_refused(rp: OidcRelyingParty) -> None:
    start, params = await login(rp)
    other = await rp.begin_login("corp")
    with pytest.raises(Unauthorized, match="state does not match"):
        await rp.complete_login("corp", params, other)
    with pytest.raises(Unauthorized, match="state missing"):
        await rp.complete_login("corp", {k: v for k, v in params.items() if k != "state"}, start)
    assert (await rp.complete_login("corp", params, start)).subject == "alice"


async def test_user_cancel_is_an_error_response(rp: OidcRelyingParty) -> None:
    start = await rp.begin_login("corp")
    landing = await browse(start.url, abort=True)
    assert landing.params["error"] == "access_denied"
    with pytest.raises(Unauthorized, match="answered access_denied"):
        await rp.complete_login("corp", landing.params, start)


async def test_replayed_code_is_refused_by_the_op(rp: OidcRelyingParty) -> None:
    start, params = await login(rp)
    await rp.complete_login("corp", params, start)
    with pytest.raises(Unauthorized, match="invalid_grant") as caught:
        await rp.complete_login("corp", params, start)
    assert params["code"] not in str(caught.value)


async def test_wrong_pkce_verifier_is_refused_by_the_op(rp: OidcRelyingParty) -> None:
    start, params = await login(rp)
    forged = dataclasses.replace(start, code_verifier=new_verifier())
    with pytest.raises(Unauthorized, match="invalid_grant") as caught:
        await rp.complete_login("corp", params, forged)
    assert forged.code_verifier not in str(caught.value)


async def test_missing_pkce_verifier_is_refused_by_the_op(
    rp: OidcRelyingParty, idp: RunningIdp
) -> None:
    _, params = await login(rp)
    form = {"grant_type": "authorization_code", "code": params["code"]}
    status, body = await raw_token_request(idp, {**form, "redirect_uri": REDIRECT_URI})
    assert status == 400 and b"invalid_grant" in body


async def test_unregistered_redirect_uri_is_refused_by_the_op(
    idp: RunningIdp, secret_files: dict[str, Path]
) -> None:
    for uri in (REDIRECT_URI + "/", REDIRECT_URI + "x", "http://127.0.0.1:8/oidc/callback"):
        provider = make_provider(idp, secret_files["wiregate"], redirect_uri=uri)
        rp = OidcRelyingParty([provider], clock=time.time)
        start = await rp.begin_login("corp")
        landing = await browse(start.url, stop_at=uri)
        assert landing.status == 400 and "redirect_uri" in landing.body
        assert not landing.url.startswith(uri)


async def test_redirect_uri_must_match_at_the_token_endpoint(
    rp: OidcRelyingParty, idp: RunningIdp
) -> None:
    start, params = await login(rp)
    form = {"grant_type": "authorization_code", "code": params["code"]}
    form |= {"code_verifier": start.code_verifier, "redirect_uri": REDIRECT_URI + "/"}
    status, body = await raw_token_request(idp, form)
    assert status == 400 and b"invalid_grant" in body


async def test_replayed_nonce_is_refused_by_the_rp(rp: OidcRelyingParty) -> None:
    start, first = await login(rp)
    again = await browse(start.url)  # the same request again: a second code, same nonce
    assert again.params["code"] != first["code"]
    await rp.complete_login("corp", first, start)
    with pytest.raises(Unauthorized, match="nonce already used"):
        await rp.complete_login("corp", again.params, start)


async def test_issuer_must_match_discovery_exactly(
    idp: RunningIdp, secret_files: dict[str, Path]
) -> None:
    provider = make_provider(idp, secret_files["wiregate"], issuer=idp.issuer + "/")
    rp = OidcRelyingParty([provider], clock=time.time)
    with pytest.raises(Unavailable, match="names another issuer"):
        await rp.begin_login("corp")


async def test_stopped_idp_fails_new_logins_clearly(
    throwaway_idp: RunningIdp, secret_files: dict[str, Path]
) -> None:
    rp = OidcRelyingParty([make_provider(throwaway_idp, secret_files["wiregate"])], clock=time.time)
    start, params = await login(rp)
    throwaway_idp.stop()
    with pytest.raises(Unavailable, match=r"corp \(.*\) is unreachable") as caught:
        await rp.complete_login("corp", params, start)
    assert caught.value.code == "idp_unavailable" and params["code"] not in caught.value.message
    fresh = OidcRelyingParty(
        [make_provider(throwaway_idp, secret_files["wiregate"])], clock=time.time
    )
    with pytest.raises(Unavailable, match="unreachable"):
        await fresh.begin_login("corp")


def recording_sleep(waits: list[float]) -> Callable[[float], Awaitable[None]]:
    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(seconds)

    return sleep


async def test_device_grant_approved(idp: RunningIdp, secret_files: dict[str, Path]) -> None:
    waits: list[float] = []
    provider = make_provider(idp, secret_files["wiregate"])
    rp = OidcRelyingParty([provider], clock=time.time, sleep=recording_sleep(waits))
    device = await rp.start_device_authorization("corp")
    assert device.interval == 1.0 and device.verification_uri.startswith(idp.issuer)
    assert device.device_code not in repr(device)
    poll = asyncio.create_task(rp.poll_device_token(device))
    await asyncio.sleep(1.5)  # at least one authorization_pending first
    assert device.verification_uri_complete is not None
    page = await browse(device.verification_uri_complete, stop_at=None, login="carol")
    assert page.status == 200 and "Sign-in Success" in page.body
    claims = await asyncio.wait_for(poll, timeout=20)
    assert claims.identity == Identity(idp.issuer, "carol")
    assert len(waits) >= 2 and all(w >= 1.0 for w in waits)


async def test_device_grant_denied(idp: RunningIdp, secret_files: dict[str, Path]) -> None:
    provider = make_provider(idp, secret_files["wiregate"])
    rp = OidcRelyingParty([provider], clock=time.time)
    device = await rp.start_device_authorization("corp")
    assert device.verification_uri_complete is not None
    await browse(device.verification_uri_complete, stop_at=None, abort=True)
    with pytest.raises(Unauthorized, match="denied") as caught:
        await asyncio.wait_for(rp.poll_device_token(device), timeout=20)
    assert caught.value.code == "access_denied"


async def test_login_state_survives_the_session_store(rp: OidcRelyingParty) -> None:
    start, params = await login(rp)
    saved = json.loads(json.dumps(start.to_dict()))
    claims = await rp.complete_login("corp", params, LoginStart.from_dict(saved))
    assert claims.subject == "alice"
