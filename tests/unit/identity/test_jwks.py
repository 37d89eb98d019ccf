"""JWKS: discovery, key filtering, bounded refetch, outages, and the aiohttp fetcher."""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from identity import claims as claims_module
from identity import jwks as jwks_module
from identity.claims import IssuerConfig
from identity.jwks import (
    FETCH,
    AiohttpFetcher,
    CachePolicy,
    JwksCache,
    JwksState,
    parse_discovery,
    parse_jwks,
    parse_max_age,
)
from identity.tokens import TokenValidator
from lab.tokenkit import (
    CLIENT,
    ISSUER,
    NONCE,
    FakeClock,
    FakeIdP,
    Kit,
    claims,
    default_keys,
    ec_key,
    idp_app,
    make_kit,
    public_jwk,
    rsa_key,
    self_signed,
    sign,
)
from wiregate.errors import ConfigError, Unauthorized, Unavailable

ALGS = ("RS256", "ES256", "EdDSA")

# --- discovery --------------------------------------------------------------------


def disc(issuer: Any = ISSUER, jwks_uri: Any = ISSUER + "/keys") -> bytes:
    return json.dumps({"issuer": issuer, "jwks_uri": jwks_uri}).encode()


def test_discovery_returns_jwks_uri() -> None:
    assert parse_discovery(disc(), issuer=ISSUER) == ISSUER + "/keys"


@pytest.mark.parametrize(
    "named", [ISSUER + "/", ISSUER.upper(), "https://idp.example.com/tenant-b", None, 1]
)
def test_discovery_issuer_must_equal_the_configured_one(named: Any) -> None:
    with pytest.raises(Unavailable) as info:
        parse_discovery(disc(issuer=named), issuer=ISSUER)
    assert info.value.code == "issuer_mismatch"


@pytest.mark.parametrize(
    "uri", ["http://idp.example.com/keys", "ftp://x/keys", "/keys", None, "https://x/k#f"]
)
def test_jwks_uri_must_be_https(uri: Any) -> None:
    with pytest.raises(Unavailable):
        parse_discovery(disc(jwks_uri=uri), issuer=ISSUER)


def test_http_only_on_loopback_and_only_when_insecure_is_explicit() -> None:
    local = "http://127.0.0.1:8080"
    with pytest.raises(Unavailable):
        parse_discovery(disc(local, local + "/keys"), issuer=local)
    assert parse_discovery(disc(local, local + "/k"), issuer=local, insecure_http=True)
    with pytest.raises(Unavailable):
        parse_discovery(disc(local, "http://10.0.0.1/k"), issuer=local, insecure_http=True)
    with pytest.raises(ConfigError):
        IssuerConfig("http://idp.example.com", insecure_http=True)


@pytest.mark.parametrize("body", [b"", b"[]", b"{", b'{"issuer": NaN}', b"\xff"])
def test_discovery_garbage(body: bytes) -> None:
    with pytest.raises(Unavailable):
        parse_discovery(body, issuer=ISSUER)


# --- keys kept and skipped -----------------------------------------------------------


def jwks(*keys: Any) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def test_usable_keys_by_kid() -> None:
    assert set(parse_jwks(jwks(*default_keys()), ALGS)) == {"k1", "ec1", "ed1"}


SKIPPED = {
    "encryption key": public_jwk(rsa_key(), "enc", use="enc"),
    "no verify op": public_jwk(rsa_key(), "ops", key_ops=["encrypt"]),
    "alg not allowed": public_jwk(rsa_key(), "ps", "PS512"),
    "HMAC secret": {"kty": "oct", "kid": "hs", "k": "c2VjcmV0"},
    "private part": {**public_jwk(rsa_key(), "priv"), "d": "AQAB"},
    "curve not allowed": public_jwk(ec_key("P-384"), "p384"),
    "no kid": {k: v for k, v in public_jwk(rsa_key(), "x").items() if k != "kid"},
    "unsafe kid": public_jwk(rsa_key(), "../k"),
    "not an object": "k1",
    "broken key": {"kty": "RSA", "kid": "broken", "n": "AA", "e": "AQAB"},
}


@pytest.mark.parametrize("case", sorted(SKIPPED))
def test_unusable_keys_skipped(case: str) -> None:
    assert parse_jwks(jwks(SKIPPED[case], public_jwk(rsa_key(), "good")), ALGS).keys() == {"good"}


def test_small_rsa_keys_skipped() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert parse_jwks(jwks(public_jwk(small, "small")), ALGS) == {}


@pytest.mark.parametrize("body", [b"{}", b'{"keys": {}}', b"[]", b"nope"])
def test_jwks_garbage(body: bytes) -> None:
    with pytest.raises(Unavailable):
        parse_jwks(body, ALGS)


def test_cache_control_and_ttl_bounds() -> None:
    assert parse_max_age("public, max-age=600, must-revalidate") == 600
    assert parse_max_age("no-store") == parse_max_age("no-cache, max-age=9") == 0
    assert parse_max_age(None) is parse_max_age("max-age=soon") is None
    policy = CachePolicy()
    assert (policy.ttl(None), policy.ttl(0), policy.ttl(10**9)) == (3600, 60, 86400)
    with pytest.raises(ConfigError):
        CachePolicy(cooldown=120, min_ttl=60)


# --- bounded refetch -----------------------------------------------------------------


async def validate(kit: Kit, token: str) -> Any:
    return await kit.validator.validate_id_token(token, audience=CLIENT, nonce=NONCE)


def random_kid_token() -> str:
    return sign(claims(), kid="r" + secrets.token_hex(8))


async def test_kid_flood_fetches_at_most_once_per_cooldown() -> None:
    kit = make_kit()
    for _ in range(500):
        with pytest.raises(Unauthorized):
            await validate(kit, random_kid_token())
    assert kit.fetcher.jwks_fetches == 1
    kit.clock.advance(29.9)
    for _ in range(100):
        with pytest.raises(Unauthorized):
            await validate(kit, random_kid_token())
    assert kit.fetcher.jwks_fetches == 1
    kit.clock.advance(0.1)
    for _ in range(100):
        with pytest.raises(Unauthorized):
            await validate(kit, random_kid_token())
    assert kit.fetcher.jwks_fetches == 2
    await validate(kit, sign(claims(), kid="k1"))  # real keys unaffected


async def test_concurrent_flood_shares_one_fetch() -> None:
    kit = make_kit()
    results = await asyncio.gather(
        *(validate(kit, random_kid_token()) for _ in range(200)), return_exceptions=True
    )
    assert all(isinstance(r, Unauthorized) for r in results)
    assert kit.fetcher.jwks_fetches == 1


async def test_unknown_kid_is_remembered() -> None:
    kit = make_kit()
    token = sign(claims(), kid="gone")
    for step in (0, 31, 100, 100):  # cool-down long over, still no refetch for "gone"
        kit.clock.advance(step)
        with pytest.raises(Unauthorized, match="unknown key id"):
            await validate(kit, token)
    assert kit.fetcher.jwks_fetches == 1
    kit.clock.advance(70)  # negative entry (300 s) expired
    with pytest.raises(Unauthorized):
        await validate(kit, token)
    assert kit.fetcher.jwks_fetches == 2


async def test_rotated_key_found_after_the_cooldown() -> None:
    kit = make_kit()
    await validate(kit, sign(claims()))
    kit.fetcher.idp.keys.append(public_jwk(rsa_key(7), "k2"))
    kit.clock.advance(30)
    await validate(kit, sign(claims(kit.clock.now), kid="k2", key=rsa_key(7)))
    assert kit.fetcher.jwks_fetches == 2


async def test_keys_cached_for_max_age_within_bounds() -> None:
    kit = make_kit(idp=FakeIdP(keys=default_keys(), max_age=600))
    await validate(kit, sign(claims()))
    kit.clock.advance(599)
    await validate(kit, sign(claims(kit.clock.now)))
    assert kit.fetcher.jwks_fetches == 1
    kit.clock.advance(1)
    await validate(kit, sign(claims(kit.clock.now)))
    assert kit.fetcher.jwks_fetches == 2


async def test_tiny_max_age_is_raised_to_the_minimum() -> None:
    kit = make_kit(idp=FakeIdP(keys=default_keys(), max_age=1))
    for _ in range(5):
        await validate(kit, sign(claims(kit.clock.now)))
        kit.clock.advance(11)
    assert kit.fetcher.jwks_fetches == 1


# --- outages -------------------------------------------------------------------------


async def test_unreachable_without_cached_keys_is_unavailable() -> None:
    kit = make_kit()
    kit.fetcher.down = True
    with pytest.raises(Unavailable, match="ConnectionRefused"):
        await validate(kit, sign(claims()))
    with pytest.raises(Unavailable, match="unavailable"):  # within the cool-down: no fetch
        await validate(kit, sign(claims()))
    assert len(kit.fetcher.calls) == 1


async def test_cached_keys_survive_an_outage_until_they_expire() -> None:
    kit = make_kit()  # default TTL 3600 s
    await validate(kit, sign(claims()))
    kit.fetcher.down = True
    kit.clock.advance(3599)
    await validate(kit, sign(claims(kit.clock.now)))
    with pytest.raises(Unavailable):  # unknown kid while down: cannot tell
        kit.clock.advance(0.5)
        await validate(kit, sign(claims(kit.clock.now), kid="new"))
    kit.clock.advance(0.5)
    with pytest.raises(Unavailable):
        await validate(kit, sign(claims(kit.clock.now)))
    kit.fetcher.down = False
    kit.clock.advance(30)
    await validate(kit, sign(claims(kit.clock.now)))


async def test_discovery_issuer_mismatch_refuses_every_token() -> None:
    kit = make_kit(idp=FakeIdP(keys=default_keys(), discovery_issuer=ISSUER + "/"))
    with pytest.raises(Unavailable) as info:
        await validate(kit, sign(claims()))
    assert info.value.code == "issuer_mismatch"
    assert kit.fetcher.jwks_fetches == 0


def test_validator_and_cache_must_share_the_issuer() -> None:
    kit = make_kit()
    other = IssuerConfig("https://idp.example.com/tenant-b")
    with pytest.raises(ConfigError):
        TokenValidator(other, kit.cache, FakeClock())


# --- the aiohttp fetcher on a real server --------------------------------------------


async def test_real_http_validation_end_to_end(aiohttp_server: Any) -> None:
    server = await aiohttp_server(idp_app(default_keys()))
    issuer = str(server.make_url("")).rstrip("/")
    config = IssuerConfig(issuer, algorithms=ALGS, insecure_http=True)
    clock = FakeClock()
    validator = TokenValidator(config, JwksCache(config, AiohttpFetcher(), clock), clock)
    got = await validator.validate_id_token(sign(claims(iss=issuer)), audience=CLIENT, nonce=NONCE)
    assert got.identity.issuer == issuer


async def test_fetcher_reads_cache_control(aiohttp_server: Any) -> None:
    server = await aiohttp_server(idp_app([]))
    fetched = await AiohttpFetcher().fetch(str(server.make_url("/keys")))
    assert fetched.max_age == 600 and json.loads(fetched.body) == {"keys": []}


@pytest.mark.parametrize("path", ["/big", "/stream", "/slow", "/moved", "/missing"])
async def test_fetcher_failures_are_unavailable(aiohttp_server: Any, path: str) -> None:
    server = await aiohttp_server(idp_app([]))
    with pytest.raises(Unavailable, match="failed"):
        await AiohttpFetcher(timeout=0.5).fetch(str(server.make_url(path)))


async def test_fetcher_connection_refused(aiohttp_server: Any) -> None:
    server = await aiohttp_server(idp_app([]))
    url = str(server.make_url("/keys"))
    await server.close()
    with pytest.raises(Unavailable):
        await AiohttpFetcher(timeout=1).fetch(url)


async def test_https_with_a_ca_bundle(aiohttp_server: Any, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await aiohttp_server(idp_app([]), ssl=context)
    url = str(server.make_url("/keys"))
    assert url.startswith("https://")
    with pytest.raises(Unavailable):  # not trusted without the bundle
        await AiohttpFetcher(timeout=2).fetch(url)
    assert (await AiohttpFetcher(ca_bundle=str(cert)).fetch(url)).max_age == 600


async def test_bearer_token_file_is_sent_over_https_only(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    from aiohttp import web

    seen: list[str | None] = []

    async def keys(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"keys": []})

    def app() -> web.Application:
        a = web.Application()
        a.router.add_get("/keys", keys)
        return a

    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    secure = await aiohttp_server(app(), ssl=context)
    plain = await aiohttp_server(app())
    token = tmp_path / "token"
    token.write_text("first\n")
    fetcher = AiohttpFetcher(ca_bundle=str(cert), bearer_file=str(token))
    await fetcher.fetch(str(secure.make_url("/keys")))
    token.write_text("rotated")  # re-read at each fetch
    await fetcher.fetch(str(secure.make_url("/keys")))
    await fetcher.fetch(str(plain.make_url("/keys")))
    assert seen == ["Bearer first", "Bearer rotated", None]
    token.unlink()
    with pytest.raises(Unavailable, match="bearer token file"):
        await fetcher.fetch(str(secure.make_url("/keys")))


def test_ca_bundle_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        AiohttpFetcher(ca_bundle=str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError):
        AiohttpFetcher(ca_bundle=str(tmp_path / "junk.pem"))


def test_state_machine_is_sans_io() -> None:
    state = JwksState(ISSUER, CachePolicy())
    assert state.decide("k1", "RS256", 0.0) is FETCH
    state.fetch_started(0.0)
    state.fetch_succeeded(parse_jwks(jwks(*default_keys()), ALGS), 60.0, 0.0)
    assert state.decide("k1", "RS256", 59.0).kid == "k1"  # type: ignore[union-attr]
    with pytest.raises(Unauthorized, match="cannot verify"):
        state.decide("k1", "ES256", 1.0)
    with pytest.raises(Unauthorized, match="cooling down"):
        state.decide("other", "RS256", 29.0)
    assert state.decide("other", "RS256", 30.0) is FETCH
    assert state.decide("k1", "RS256", 60.0) is FETCH  # expired: refresh before use


def test_exported_api() -> None:
    assert set(jwks_module.__all__) == {
        "FETCH", "AiohttpFetcher", "CachePolicy", "Fetched", "Fetcher", "JwksCache",
        "JwksState", "PublicKey", "VerifyKey", "discovery_url", "parse_discovery",
        "parse_jwks", "parse_max_age",
    }  # fmt: skip
    assert set(claims_module.__all__) == {
        "ASYMMETRIC_ALGORITHMS", "Claims", "IssuerConfig", "check_claims", "check_url",
        "is_safe_kid", "loads_strict", "refuse", "verified_email",
    }  # fmt: skip


@pytest.mark.parametrize("url", ["https://[", "https://[::1", "http://[zz]/jwks"])
def test_a_malformed_url_from_discovery_is_the_named_error(url: str) -> None:
    from identity.claims import check_url
    from wiregate.errors import Unavailable

    with pytest.raises(Unavailable, match=r"jwks_uri .* is not a valid URL"):
        check_url(url, insecure_http=True, what="jwks_uri", error=Unavailable)
