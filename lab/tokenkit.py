"""A hand-rolled token issuer for unit tests of the validator (never for anything else).

Keys are made with ``cryptography``, tokens signed with pyjwt (or by hand for the
forgeries pyjwt refuses to make), and discovery + JWKS are served by
:class:`FakeFetcher`, which counts what it was asked for.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import hashlib
import hmac
import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.api_jws import PyJWS

from identity.claims import IssuerConfig
from identity.jwks import CachePolicy, Fetched, JwksCache, discovery_url
from identity.tokens import NonceStore, TokenValidator
from lab.fakes import T0, FakeClock
from wiregate.errors import Unavailable

ISSUER = "https://idp.example.com/tenant-a"
CLIENT = "wiregate-web"
NONCE = "n-0S6_WzA2Mj"
ALL_ALGS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")


def rsa_key(n: int = 0) -> rsa.RSAPrivateKey:
    """A cached 2048-bit RSA key (``n`` picks a different one)."""
    return _rsa_key(n)


def ec_key(curve: str = "P-256", n: int = 0) -> ec.EllipticCurvePrivateKey:
    """A cached EC key on ``curve`` (P-256 or P-384)."""
    return _ec_key(curve, n)


def ed_key(n: int = 0) -> ed25519.Ed25519PrivateKey:
    """A cached Ed25519 key."""
    return _ed_key(n)


@functools.cache
def _rsa_key(n: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def _ec_key(curve: str, n: int) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1() if curve == "P-256" else ec.SECP384R1())


@functools.cache
def _ed_key(n: int) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def key_for(alg: str, n: int = 0) -> Any:
    """A private key suited to ``alg``."""
    if alg.startswith(("RS", "PS")):
        return rsa_key(n)
    if alg == "ES256":
        return ec_key("P-256", n)
    if alg == "ES384":
        return ec_key("P-384", n)
    return ed_key(n)


def public_jwk(private: Any, kid: str, alg: str | None = None, **extra: Any) -> dict[str, Any]:
    """The public JWK of ``private`` with ``kid`` (and ``alg``, ``use`` or more)."""
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    return {**jwk, **extra}


def b64(data: bytes | str | dict[str, Any]) -> str:
    """base64url without padding of bytes, text, or a dict as compact JSON."""
    if isinstance(data, dict):
        data = json.dumps(data, separators=(",", ":"))
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(now: float = T0, **overrides: Any) -> dict[str, Any]:
    """Valid ID token claims at ``now``; ``None`` overrides drop a claim."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "248289761001",
        "aud": CLIENT,
        "exp": int(now) + 600,
        "iat": int(now),
        "nonce": NONCE,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    payload: dict[str, Any],
    *,
    alg: str = "RS256",
    kid: str | None = "k1",
    key: Any = None,
    headers: dict[str, Any] | None = None,
) -> str:
    """A token signed by pyjwt (``key`` defaults to the issuer's key for ``alg``).

    The payload is serialised as given (pyjwt's claim checks are bypassed on
    purpose, so tests can sign malformed claims).
    """
    extra = dict(headers or {})
    if kid is not None:
        extra["kid"] = kid
    private = key if key is not None else key_for(alg)
    body = json.dumps(payload, separators=(",", ":")).encode()
    return PyJWS().encode(body, private, algorithm=alg, headers=extra)


def hand_made(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand, for forgeries pyjwt will not produce."""
    return f"{b64(header)}.{b64(payload)}.{b64(signature)}"


def public_key_forms() -> dict[str, bytes]:
    """The issuer's RSA public key as PEM, OpenSSH and JWK JSON: HMAC-confusion secrets."""
    public = rsa_key().public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return {"pem": pem, "ssh": ssh, "jwk": json.dumps(public_jwk(rsa_key(), "k1")).encode()}


def hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 token with ``secret`` (e.g. the IdP's public key), made by hand."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


@dataclass
class FakeIdP:
    """Discovery + JWKS documents of an issuer, editable by tests."""

    issuer: str = ISSUER
    jwks_uri: str = ISSUER + "/keys"
    keys: list[dict[str, Any]] = field(default_factory=list)
    discovery_issuer: str | None = None
    max_age: float | None = None

    def documents(self) -> dict[str, Fetched]:
        disc = {"issuer": self.discovery_issuer or self.issuer, "jwks_uri": self.jwks_uri}
        return {
            discovery_url(self.issuer): Fetched(json.dumps(disc).encode()),
            self.jwks_uri: Fetched(json.dumps({"keys": self.keys}).encode(), self.max_age),
        }


class FakeFetcher:
    """Serves a :class:`FakeIdP`; counts fetches by URL; ``down`` makes it fail."""

    def __init__(self, idp: FakeIdP) -> None:
        self.idp = idp
        self.calls: list[str] = []
        self.down = False

    @property
    def jwks_fetches(self) -> int:
        return self.calls.count(self.idp.jwks_uri)

    async def fetch(self, url: str) -> Fetched:
        self.calls.append(url)
        if self.down:
            raise Unavailable(f"fetching {url} failed: ConnectionRefusedError")
        doc = self.idp.documents().get(url)
        if doc is None:
            raise Unavailable(f"fetching {url} failed: HTTP 404")
        return doc


def default_keys() -> list[dict[str, Any]]:
    """One key per algorithm family: RSA ``k1``, EC ``ec1``/``ec384``, Ed25519 ``ed1``."""
    return [
        public_jwk(rsa_key(), "k1", use="sig"),
        public_jwk(ec_key("P-256"), "ec1", "ES256"),
        public_jwk(ec_key("P-384"), "ec384", "ES384"),
        public_jwk(ed_key(), "ed1", "EdDSA"),
    ]


@dataclass
class Kit:
    """A validator wired to a fake IdP and clock."""

    validator: TokenValidator
    fetcher: FakeFetcher
    clock: FakeClock
    config: IssuerConfig
    cache: JwksCache


def make_kit(
    *,
    algorithms: tuple[str, ...] = ALL_ALGS,
    trusted_audiences: frozenset[str] = frozenset(),
    nonces: NonceStore | None = None,
    idp: FakeIdP | None = None,
    policy: CachePolicy | None = None,
) -> Kit:
    """A :class:`Kit` for ``ISSUER`` with :func:`default_keys` unless ``idp`` is given."""
    idp = idp or FakeIdP(keys=default_keys())
    config = IssuerConfig(ISSUER, algorithms=algorithms, trusted_audiences=trusted_audiences)
    clock = FakeClock()
    fetcher = FakeFetcher(idp)
    cache = JwksCache(config, fetcher, clock, policy)
    validator = TokenValidator(config, cache, clock, nonces=nonces)
    return Kit(validator, fetcher, clock, config, cache)


def idp_app(keys: list[dict[str, Any]]) -> web.Application:
    """A real IdP on aiohttp: discovery (issuer = its own origin), /keys, and failure paths."""

    async def discovery(request: web.Request) -> web.Response:
        origin = str(request.url.origin())
        return web.json_response({"issuer": origin, "jwks_uri": origin + "/keys"})

    async def keyset(request: web.Request) -> web.Response:
        return web.json_response({"keys": keys}, headers={"Cache-Control": "max-age=600"})

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b" " * 600_000)

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b" " * 100_000)
        return resp

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/keys")

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    for path, handler in (("/keys", keyset), ("/big", big), ("/stream", stream)):
        app.router.add_get(path, handler)
    app.router.add_get("/slow", slow)
    app.router.add_get("/moved", moved)
    return app


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed CA certificate for 127.0.0.1 and its key, as PEM files."""
    key = rsa_key(3)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test idp")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "ca.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
