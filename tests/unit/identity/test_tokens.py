"""ID token validation: every token line of SECURITY.md, against a hand-rolled issuer."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from identity import tokens
from identity.claims import Claims, IssuerConfig, check_claims, verified_email
from identity.tokens import NonceStore
from lab.tokenkit import (
    ALL_ALGS,
    CLIENT,
    ISSUER,
    NONCE,
    T0,
    Kit,
    b64,
    claims,
    ec_key,
    hand_made,
    hs256,
    make_kit,
    public_jwk,
    public_key_forms,
    rsa_key,
    sign,
)
from wiregate.errors import ConfigError, Unauthorized, Unavailable, WiregateError
from wiregate.model import Identity

KID_FOR = {"ES256": "ec1", "ES384": "ec384", "EdDSA": "ed1"}


@pytest.fixture
def kit() -> Kit:
    return make_kit()


async def ok(kit: Kit, token: str, *, nonce: str | None = NONCE, **kw: Any) -> Claims:
    return await kit.validator.validate_id_token(token, audience=CLIENT, nonce=nonce, **kw)


async def refused(kit: Kit, token: Any, *, nonce: str | None = NONCE, **kw: Any) -> str:
    with pytest.raises(Unauthorized) as info:
        await kit.validator.validate_id_token(token, audience=CLIENT, nonce=nonce, **kw)
    assert info.value.code == "invalid_token"
    assert not isinstance(token, str) or len(token) < 8 or token not in str(info.value)
    return info.value.message


@pytest.mark.parametrize("alg", ALL_ALGS)
async def test_valid_token_for_each_allowed_algorithm(kit: Kit, alg: str) -> None:
    got = await ok(kit, sign(claims(), alg=alg, kid=KID_FOR.get(alg, "k1")))
    assert got.identity == Identity(ISSUER, "248289761001")
    assert got.audience == (CLIENT,) and got.nonce == NONCE and got.expires_at == T0 + 600


# --- alg none, HMAC, stripped signatures ---------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "nOnE", "NONE", " none"])
@pytest.mark.parametrize("signature", [b"", b"\x00" * 256])
async def test_alg_none_refused_in_every_case(kit: Kit, alg: str, signature: bytes) -> None:
    await refused(kit, hand_made({"alg": alg, "kid": "k1"}, claims(), signature))
    assert kit.fetcher.calls == []


@pytest.mark.parametrize("alg", [None, 5, ["RS256"], "", "rs256", "RS257", "ES512", "ES256K"])
async def test_alg_missing_malformed_or_not_allowed(kit: Kit, alg: Any) -> None:
    header = {"kid": "k1"} if alg is None else {"alg": alg, "kid": "k1"}
    await refused(kit, hand_made(header, claims(), b"s" * 256))


async def test_alg_outside_this_issuers_allow_list(kit: Kit) -> None:
    strict = make_kit(algorithms=("RS256",))
    assert "not allowed" in await refused(strict, sign(claims(), alg="ES256", kid="ec1"))
    assert "not allowed" in await refused(strict, sign(claims(), alg="PS256"))


async def test_stripped_or_missing_signature(kit: Kit) -> None:
    head, body, _ = sign(claims()).split(".")
    assert "empty signature" in await refused(kit, f"{head}.{body}.")
    await refused(kit, f"{head}.{body}")
    await refused(kit, f"{head}.{body}.{b64(b'')}.")


@pytest.mark.parametrize("form", ["pem", "ssh", "jwk"])
@pytest.mark.parametrize("alg", ["HS256", "HS384", "hs256"])
async def test_hmac_with_the_public_key_as_secret(kit: Kit, form: str, alg: str) -> None:
    token = hs256({"alg": alg, "kid": "k1", "typ": "JWT"}, claims(), public_key_forms()[form])
    assert "symmetric" in await refused(kit, token)
    assert kit.fetcher.calls == []  # refused before any key is looked up


@pytest.mark.parametrize("algs", [("RS256", "HS256"), ("none",), (), ("HS256",), ("rs256",)])
def test_allow_list_never_mixes_hmac_or_none(algs: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        IssuerConfig(ISSUER, algorithms=algs)


# --- keys never taken from the token ---------------------------------------------

ATTACKER = rsa_key(99)


@pytest.mark.parametrize("kid", ["k1", "attacker"])
async def test_embedded_jwk_signed_by_attacker_key_refused(kit: Kit, kid: str) -> None:
    jwk = public_jwk(ATTACKER, kid)
    token = sign(claims(), kid=kid, key=ATTACKER, headers={"jwk": jwk})
    assert "JWKS" in await refused(kit, token)


@pytest.mark.parametrize("name", ["jku", "x5u"])
async def test_jku_and_x5u_never_fetched(kit: Kit, name: str) -> None:
    url = "https://attacker.example/keys"
    await refused(kit, sign(claims(), key=ATTACKER, headers={name: url}))
    assert url not in kit.fetcher.calls


async def test_x5c_crit_b64_headers_refused(kit: Kit) -> None:
    for extra in ({"x5c": ["MIIB"]}, {"crit": ["exp"], "exp": 1}, {"b64": False, "crit": ["b64"]}):
        await refused(kit, sign(claims(), headers=extra))


async def test_attacker_key_under_the_issuers_kid_is_a_bad_signature(kit: Kit) -> None:
    assert "signature" in await refused(kit, sign(claims(), key=ATTACKER))


async def test_key_family_must_match_alg(kit: Kit) -> None:
    await refused(kit, sign(claims(), alg="ES256", kid="k1"))  # RSA kid, EC alg
    await refused(kit, sign(claims(), alg="RS256", kid="ec1", key=rsa_key()))
    await refused(kit, sign(claims(), alg="ES384", kid="ec1", key=ec_key("P-384")))


# --- kid -----------------------------------------------------------------------------

BAD_KIDS = ["a" * 129, "a" * 3000, "../../etc/passwd", "/etc/passwd", "a/../b", "..",
            "file:///etc/passwd", "k1\n", "k1 ", "", "ké", "a\\b"]  # fmt: skip


@pytest.mark.parametrize("kid", BAD_KIDS)
async def test_unsafe_kid_refused_without_fetching(kit: Kit, kid: str) -> None:
    await refused(kit, sign(claims(), kid=kid))
    assert kit.fetcher.calls == []


@pytest.mark.parametrize("kid", [None, 1, 1.5, True, ["k1"], {"k": "k1"}])
async def test_missing_or_non_string_kid_refused(kit: Kit, kid: Any) -> None:
    header = {"alg": "RS256"} if kid is None else {"alg": "RS256", "kid": kid}
    await refused(kit, hand_made(header, claims(), b"s" * 256))


async def test_unknown_kid_refused_after_one_fetch(kit: Kit) -> None:
    assert "unknown key id" in await refused(kit, sign(claims(), kid="rotated-away"))
    assert kit.fetcher.jwks_fetches == 1


# --- iss -----------------------------------------------------------------------------

ISS_VARIANTS = [ISSUER + "/", ISSUER.replace("https", "http"), ISSUER.upper(),
                "https://IDP.example.com/tenant-a", "https://idp.example.com/tenant-b",
                "https://idp.example.com", ISSUER + "?", " " + ISSUER, 1, ["x"]]  # fmt: skip


@pytest.mark.parametrize("iss", ISS_VARIANTS)
async def test_iss_variants_refused(kit: Kit, iss: Any) -> None:
    assert "iss" in await refused(kit, sign(claims(iss=iss)))


async def test_iss_missing(kit: Kit) -> None:
    await refused(kit, sign(claims(iss=None)))


# --- aud / azp -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "aud",
    [None, "another-client", [], ["another-client"], [CLIENT, "evil"], [CLIENT, 5], 5, ""],
)
async def test_aud_refused(kit: Kit, aud: Any) -> None:
    assert "aud" in await refused(kit, sign(claims(aud=aud, azp=CLIENT)))


async def test_trusted_extra_audience_needs_azp() -> None:
    kit = make_kit(trusted_audiences=frozenset({"https://api.example.com"}))
    aud = [CLIENT, "https://api.example.com"]
    got = await ok(kit, sign(claims(aud=aud, azp=CLIENT)))
    assert got.audience == tuple(aud) and got.authorized_party == CLIENT
    assert "azp" in await refused(kit, sign(claims(aud=aud)))
    assert "azp" in await refused(kit, sign(claims(aud=aud, azp="https://api.example.com")))


async def test_azp_mismatch_refused_even_with_one_audience(kit: Kit) -> None:
    assert (await ok(kit, sign(claims(aud=[CLIENT], azp=CLIENT)))).audience == (CLIENT,)
    assert "azp" in await refused(kit, sign(claims(azp="another-client")))


# --- exp / nbf / iat -----------------------------------------------------------------


@pytest.mark.parametrize(
    "exp", ["1700000600", True, None, float("nan"), float("inf"), 1e300, 2**64, -1, [T0]]
)
async def test_exp_missing_non_numeric_or_absurd(kit: Kit, exp: Any) -> None:
    await refused(kit, sign(claims(exp=exp)))


async def test_exp_leeway_boundary(kit: Kit) -> None:
    token = sign(claims(iat=T0 - 600, exp=T0))
    await ok(kit, token, now=T0 + 59)
    assert "expired" in await refused(kit, token, now=T0 + 60)
    assert "expired" in await refused(kit, token, now=T0 + 3600)


async def test_exp_too_far_boundary(kit: Kit) -> None:
    await ok(kit, sign(claims(exp=T0 + 86400 + 60)))
    assert "too far" in await refused(kit, sign(claims(exp=T0 + 86400 + 61)))
    await refused(kit, sign(claims(exp=T0 + 10 * 365 * 86400)))


async def test_nbf_leeway_boundary(kit: Kit) -> None:
    await ok(kit, sign(claims(nbf=T0 + 60)))
    assert "nbf" in await refused(kit, sign(claims(nbf=T0 + 61)))
    await refused(kit, sign(claims(nbf="soon")))


async def test_nbf_null_is_malformed(kit: Kit) -> None:
    payload = claims()
    payload["nbf"] = None
    await refused(kit, sign(payload))


async def test_iat_required_and_not_in_the_future(kit: Kit) -> None:
    await ok(kit, sign(claims(iat=T0 + 60)))
    assert "iat" in await refused(kit, sign(claims(iat=T0 + 61)))
    assert "iat" in await refused(kit, sign(claims(iat=T0 + 10**6)))
    await refused(kit, sign(claims(iat=None)))


async def test_lifetime_counted_from_iat_an_old_token_in_its_last_hour_refused(kit: Kit) -> None:
    token = sign(claims(iat=T0 - 10 * 365 * 86400, exp=T0 + 3600))
    assert "lifetime" in await refused(kit, token)


async def test_iat_missing_refused_with_the_reason(kit: Kit) -> None:
    assert "iat missing" in await refused(kit, sign(claims(iat=None)))


async def test_lifetime_from_iat_boundary(kit: Kit) -> None:
    iat = T0 - 86400  # the default cap is 24 h, the leeway 60 s
    await ok(kit, sign(claims(iat=iat, exp=iat + 86400 + 60)))
    assert "lifetime" in await refused(kit, sign(claims(iat=iat, exp=iat + 86400 + 61)))


@pytest.mark.parametrize("leeway", [0.0, 60.0, 300.0])
def test_lifetime_from_iat_boundary_follows_the_leeway(leeway: float) -> None:
    config = IssuerConfig(ISSUER, leeway=leeway, max_lifetime=3600.0)
    iat = T0 - 1800
    edge = iat + 3600 + int(leeway)
    got = check_claims(claims(iat=iat, exp=edge), config, audience=CLIENT, nonce=NONCE, now=T0)
    assert got.issued_at == iat and got.expires_at == edge
    with pytest.raises(Unauthorized, match="lifetime"):
        check_claims(claims(iat=iat, exp=edge + 1), config, audience=CLIENT, nonce=NONCE, now=T0)


# --- nonce ---------------------------------------------------------------------------


async def test_nonce_missing_wrong_or_malformed(kit: Kit) -> None:
    assert "nonce missing" in await refused(kit, sign(claims(nonce=None)))
    assert "nonce" in await refused(kit, sign(claims(nonce="another")))
    assert "nonce" in await refused(kit, sign(claims(nonce=12345)))
    assert (await ok(kit, sign(claims(nonce=None)), nonce=None)).nonce is None


async def test_nonce_replay_refused_with_a_store() -> None:
    kit = make_kit(nonces=NonceStore())
    token = sign(claims())
    await ok(kit, token)
    assert "replayed" in await refused(kit, token)
    await ok(kit, sign(claims(nonce="fresh")), nonce="fresh")


def test_nonce_store_forgets_after_ttl_and_fails_closed_when_full() -> None:
    store = NonceStore(ttl=100, max_entries=2)
    store.use("a", T0)
    store.use("b", T0 + 10)
    with pytest.raises(Unavailable):
        store.use("c", T0 + 20)
    with pytest.raises(Unauthorized):
        store.use("a", T0 + 99)
    store.use("a", T0 + 100)  # a's entry expired: its token has long expired too
    assert len(store) == 2


# --- other token types presented as ID tokens -----------------------------------------

LOGOUT = {"http://schemas.openid.net/event/backchannel-logout": {}}


@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "AT+JWT", "logout+jwt", "JOSE", 1])
async def test_typ_other_than_jwt_refused(kit: Kit, typ: Any) -> None:
    await refused(kit, sign(claims(), headers={"typ": typ}))


@pytest.mark.parametrize("typ", ["JWT", "jwt", "application/jwt"])
async def test_typ_jwt_accepted(kit: Kit, typ: str) -> None:
    assert (await ok(kit, sign(claims(), headers={"typ": typ}))).subject == "248289761001"


@pytest.mark.parametrize("nonce", [None, NONCE])
async def test_logout_token_refused(kit: Kit, nonce: str | None) -> None:
    payload = claims(nonce=None, events=LOGOUT, sid="08a5019c", jti="bWJq")
    assert "logout" in await refused(kit, sign(payload), nonce=nonce)
    assert "logout" in await refused(kit, sign(payload, headers={"typ": "logout+jwt"}))


async def test_access_token_refused(kit: Kit) -> None:
    at = claims(nonce=None, aud="https://api.example.com", scope="openid", client_id=CLIENT)
    assert "access token" in await refused(kit, sign(at, headers={"typ": "at+jwt"}))
    await refused(kit, sign(at))  # no typ: aud is not this client
    await refused(kit, sign({**at, "aud": CLIENT}))  # aud right, nonce missing


# --- identity and email ----------------------------------------------------------------


async def test_identity_is_iss_and_sub_never_email(kit: Kit) -> None:
    mail = {"email": "ann@example.com", "email_verified": True}
    a = await ok(kit, sign(claims(sub="1", **mail)))
    b = await ok(kit, sign(claims(sub="2", **mail)))
    assert a.identity == Identity(ISSUER, "1") != b.identity
    assert verified_email(a) == verified_email(b) == "ann@example.com"


@pytest.mark.parametrize("verified", [False, "true", 1, None])
async def test_email_only_when_verified(kit: Kit, verified: Any) -> None:
    got = await ok(kit, sign(claims(email="ann@example.com", email_verified=verified)))
    assert verified_email(got) is None


@pytest.mark.parametrize("sub", [None, "", 5, "x" * 513, "a\nb"])
async def test_sub_required_and_sane(kit: Kit, sub: Any) -> None:
    await refused(kit, sign(claims(sub=sub)))


# --- shape ---------------------------------------------------------------------------


DUPLICATE_ALG = b64('{"alg":"RS256","alg":"none","kid":"k1"}')
NAN_PAYLOAD = b64('{"a":NaN}')


async def test_malformed_shapes(kit: Kit) -> None:
    token = sign(claims())
    head, body, sig = token.split(".")
    for bad in (None, b"x.y.z", "", "a.b.c.d", token + "=", " " + token, "x" * 20000,
                f"{head}.{body}.{sig[:-1]}", f"{head}.{b64('[1]')}.{sig}",
                f"{DUPLICATE_ALG}.{body}.{sig}", f"{head}.{NAN_PAYLOAD}.{sig}"):  # fmt: skip
        await refused(kit, bad)


async def test_non_canonical_base64_signature_refused(kit: Kit) -> None:
    token = sign(claims(), alg="ES256", kid="ec1")  # 64-byte signature: last char has slack
    head, body, sig = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = sig[:-1] + alphabet[alphabet.index(sig[-1]) ^ 1]
    assert "canonical" in await refused(kit, f"{head}.{body}.{twin}")


def test_exported_api() -> None:
    assert set(tokens.__all__) == {
        "MAX_TOKEN_CHARS", "NonceStore", "TokenHeader", "TokenValidator",
        "parse_header", "verify_id_token",
    }  # fmt: skip


# --- property: mutations never validate, and only raise wiregate errors ---------------

_VALID = {alg: sign(claims(), alg=alg, kid=KID_FOR.get(alg, "k1")) for alg in ("RS256", "EdDSA")}


def _mutate(token: str, data: st.DataObject) -> str:
    parts = token.split(".")
    i = data.draw(st.integers(0, 2))
    how = data.draw(st.sampled_from(["flip", "text", "json", "truncate", "insert"]))
    seg = parts[i]
    if how == "flip":
        raw = bytearray(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
        parts[i] = b64(bytes(raw))
    elif how == "text":
        parts[i] = data.draw(st.text(max_size=60))
    elif how == "json":
        parts[i] = b64(json.dumps(data.draw(st.dictionaries(st.text(max_size=5), st.integers()))))
    elif how == "truncate":
        parts[i] = seg[: data.draw(st.integers(0, max(len(seg) - 1, 0)))]
    else:
        pos = data.draw(st.integers(0, len(seg)))
        parts[i] = seg[:pos] + data.draw(st.characters()) + seg[pos:]
    return ".".join(parts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(alg=st.sampled_from(sorted(_VALID)), data=st.data())
def test_mutated_tokens_never_validate(alg: str, data: st.DataObject) -> None:
    token = _VALID[alg]
    mutated = _mutate(token, data)
    assume(mutated != token)
    kit = make_kit()
    with pytest.raises(WiregateError) as info:
        asyncio.run(kit.validator.validate_id_token(mutated, audience=CLIENT, nonce=NONCE))
    assert isinstance(info.value, Unauthorized)
