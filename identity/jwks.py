"""An issuer's signing keys: discovery, JWKS parsing and a cache with bounded refetch.

The core is sans-IO: :func:`parse_discovery`, :func:`parse_jwks`,
:func:`parse_max_age` take bytes and strings, and :class:`JwksState` takes
``now`` and answers with a key, :data:`FETCH`, or an error. :class:`JwksCache`
is the thin async adapter that runs a :class:`Fetcher` when the state asks for
one; :class:`AiohttpFetcher` is the real fetcher (timeouts, size cap, no
redirects, optional CA bundle).

Refetch is bounded: one fetch attempt per ``cooldown`` per issuer, whatever
the reason (unknown ``kid``, expired keys, a failed fetch), and a ``kid`` that
a fetch did not contain is remembered (negative cache) for ``negative_ttl``.
Keys only ever come from the issuer's JWKS, never from a token header.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import PyJWTError

from identity.claims import IssuerConfig, check_url, is_safe_kid, loads_strict, refuse
from wiregate.clock import Clock
from wiregate.errors import ConfigError, Unauthorized, Unavailable
from wiregate.logging import get_logger

__all__ = [
    "FETCH",
    "AiohttpFetcher",
    "CachePolicy",
    "Fetched",
    "Fetcher",
    "JwksCache",
    "JwksState",
    "PublicKey",
    "VerifyKey",
    "discovery_url",
    "parse_discovery",
    "parse_jwks",
    "parse_max_age",
]

log = get_logger("identity.jwks")

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
_FAMILY: Mapping[str, tuple[str, str | None]] = {
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256"), ("RSA", None)),
    **{"ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "EdDSA": ("OKP", None)},
}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_MIN_RSA_BITS = 2048
_MAX_KEYS = 100


class _Fetch(enum.Enum):
    FETCH = "fetch"


FETCH = _Fetch.FETCH
"""What :meth:`JwksState.decide` answers when a fetch should run now."""


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One public signing key from a JWKS."""

    kid: str
    kty: str
    alg: str | None
    curve: str | None
    public_key: PublicKey

    def can_verify(self, alg: str) -> bool:
        """Whether this key may verify a signature made with ``alg``."""
        kty, curve = _FAMILY.get(alg, ("", None))
        if self.alg is not None and self.alg != alg:
            return False
        return self.kty == kty and (curve is None or self.curve == curve)


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """Bounds of the key cache, in seconds."""

    cooldown: float = 30.0
    default_ttl: float = 3600.0
    min_ttl: float = 60.0
    max_ttl: float = 86400.0
    negative_ttl: float = 300.0
    negative_max: int = 4096

    def __post_init__(self) -> None:
        if not 0 < self.cooldown <= self.min_ttl <= self.default_ttl <= self.max_ttl:
            raise ConfigError("JWKS cache: need 0 < cooldown <= min_ttl <= default_ttl <= max_ttl")
        if self.negative_ttl < 0 or self.negative_max < 1:
            raise ConfigError("JWKS cache: negative_ttl >= 0 and negative_max >= 1 required")

    def ttl(self, max_age: float | None) -> float:
        """How long a fetched JWKS is kept, given the response's Cache-Control max-age."""
        wanted = self.default_ttl if max_age is None else max_age
        return min(max(wanted, self.min_ttl), self.max_ttl)


def discovery_url(issuer: str) -> str:
    """The issuer's OpenID discovery document URL (OpenID Connect Discovery 1.0, 4)."""
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def parse_discovery(body: bytes, *, issuer: str, insecure_http: bool = False) -> str:
    """Return the ``jwks_uri`` of a discovery document for exactly ``issuer``."""
    doc = loads_strict(body, "discovery document", Unavailable)
    if doc.get("issuer") != issuer:
        raise Unavailable(
            f"discovery document for {issuer} names another issuer; refused",
            code="issuer_mismatch",
            hint="the configured issuer must equal the IdP's 'issuer' exactly",
        )
    jwks_uri = doc.get("jwks_uri")
    if not isinstance(jwks_uri, str):
        raise Unavailable(f"discovery document for {issuer} has no jwks_uri")
    check_url(jwks_uri, insecure_http=insecure_http, what="jwks_uri", error=Unavailable)
    return jwks_uri


def parse_max_age(cache_control: str | None) -> float | None:
    """The ``max-age`` of a Cache-Control header (0 for no-store/no-cache), else None."""
    if not cache_control:
        return None
    directives = [d.strip().lower() for d in cache_control.split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    for directive in directives:
        name, _, value = directive.partition("=")
        if name.strip() == "max-age" and value.strip().isdigit():
            return float(value.strip())
    return None


def parse_jwks(body: bytes, algorithms: tuple[str, ...]) -> dict[str, tuple[VerifyKey, ...]]:
    """Usable signing keys of a JWKS, by ``kid``; unusable entries are skipped."""
    doc = loads_strict(body, "JWKS", Unavailable)
    entries = doc.get("keys")
    if not isinstance(entries, list):
        raise Unavailable("JWKS has no 'keys' list")
    keys: dict[str, tuple[VerifyKey, ...]] = {}
    for entry in entries[:_MAX_KEYS]:
        key = _parse_jwk(entry, algorithms)
        if key is not None:
            keys[key.kid] = (*keys.get(key.kid, ()), key)
    return keys


def _parse_jwk(entry: Any, algorithms: tuple[str, ...]) -> VerifyKey | None:
    if not isinstance(entry, dict) or not _is_public_signing_jwk(entry):
        return None
    try:
        key = _load_jwk(entry)
    except (PyJWTError, ValueError, TypeError, KeyError):
        return None
    if key is None or not any(key.can_verify(alg) for alg in algorithms):
        return None
    return key


def _is_public_signing_jwk(entry: dict[str, Any]) -> bool:
    use, ops, alg = entry.get("use"), entry.get("key_ops"), entry.get("alg")
    if use not in (None, "sig") or not is_safe_kid(entry.get("kid")):
        return False
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return False
    return (alg is None or isinstance(alg, str)) and not _PRIVATE_MEMBERS & entry.keys()


def _load_jwk(entry: dict[str, Any]) -> VerifyKey | None:
    kty, crv, alg = entry.get("kty"), entry.get("crv"), entry.get("alg")
    public: Any
    if kty == "RSA":
        public = RSAAlgorithm.from_jwk(entry)
        if not isinstance(public, rsa.RSAPublicKey) or public.key_size < _MIN_RSA_BITS:
            return None
    elif kty == "EC":
        public = ECAlgorithm.from_jwk(entry)
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return None
    elif kty == "OKP":
        public = OKPAlgorithm.from_jwk(entry)
        if not isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            return None
    else:
        return None
    return VerifyKey(entry["kid"], kty, alg, crv if isinstance(crv, str) else None, public)


class JwksState:
    """The sans-IO key cache of one issuer: decisions at ``now``, no I/O."""

    def __init__(self, issuer: str, policy: CachePolicy) -> None:
        self.issuer = issuer
        self._policy = policy
        self._keys: dict[str, tuple[VerifyKey, ...]] = {}
        self._fetched_at = 0.0
        self._expires_at = 0.0
        self._last_attempt: float | None = None
        self._last_error: str | None = None
        self._negative: dict[str, float] = {}

    def decide(self, kid: str, alg: str, now: float) -> VerifyKey | _Fetch:
        """A key for ``kid``/``alg``, or FETCH; raise when neither is possible now."""
        keys = self._keys.get(kid) if self._fresh(now) else None
        if keys is not None:
            return _pick(keys, alg)
        if self._negative.get(kid, float("-inf")) > now:
            raise refuse("unknown key id")
        if self._may_fetch(now):
            return FETCH
        if self._last_error is not None:
            raise _keys_unavailable(self.issuer, self._last_error)
        raise refuse("unknown key id (key refresh cooling down)")

    def fetch_started(self, now: float) -> None:
        """Record a fetch attempt: the cool-down runs from here, success or not."""
        self._last_attempt = now

    def fetch_failed(self, reason: str) -> None:
        """Record why the last fetch failed; cached keys stay until they expire."""
        self._last_error = reason

    def fetch_succeeded(
        self, keys: dict[str, tuple[VerifyKey, ...]], ttl: float, now: float
    ) -> None:
        """Replace the cached keys with ``keys``, valid for ``ttl`` from ``now``."""
        self._keys = dict(keys)
        self._fetched_at, self._expires_at = now, now + ttl
        self._last_error = None
        for kid in keys:
            self._negative.pop(kid, None)

    def resolve(self, kid: str, alg: str, now: float) -> VerifyKey:
        """After a fetch: the key, or remember ``kid`` as unknown and refuse."""
        keys = self._keys.get(kid) if self._fresh(now) else None
        if keys is not None:
            return _pick(keys, alg)
        self._remember_unknown(kid, now)
        raise refuse("unknown key id")

    def _fresh(self, now: float) -> bool:
        return self._fetched_at <= now < self._expires_at

    def _may_fetch(self, now: float) -> bool:
        if self._last_attempt is None:
            return True
        elapsed = now - self._last_attempt
        return elapsed >= self._policy.cooldown or elapsed < 0

    def _remember_unknown(self, kid: str, now: float) -> None:
        self._negative.pop(kid, None)
        while len(self._negative) >= self._policy.negative_max:
            del self._negative[next(iter(self._negative))]
        self._negative[kid] = now + self._policy.negative_ttl


def _keys_unavailable(issuer: str, reason: str) -> Unavailable:
    """The error for a token whose key is not cached while the issuer's keys cannot be
    fetched: it names the issuer and why, so that the caller knows it is not the token."""
    return Unavailable(
        f"signing keys of issuer {issuer} unavailable (its JWKS cannot be fetched): {reason}",
        code="jwks_unavailable",
        hint="tokens signed with a key not cached yet are refused until the issuer answers; "
        "retry later",
    )


def _pick(keys: tuple[VerifyKey, ...], alg: str) -> VerifyKey:
    for key in keys:
        if key.can_verify(alg):
            return key
    raise refuse("the key named by kid cannot verify this algorithm")


@dataclass(frozen=True, slots=True)
class Fetched:
    """A fetched document and its Cache-Control max-age, if any."""

    body: bytes
    max_age: float | None = None


class Fetcher(Protocol):
    """Gets a URL; raises :class:`Unavailable` on any failure."""

    async def fetch(self, url: str) -> Fetched:
        """The body of a 200 response at ``url``."""
        ...


class JwksCache:
    """The keys of one issuer, fetched through ``fetcher`` when :class:`JwksState` asks."""

    def __init__(
        self,
        config: IssuerConfig,
        fetcher: Fetcher,
        clock: Clock,
        policy: CachePolicy | None = None,
    ) -> None:
        self.config = config
        self._fetcher = fetcher
        self._clock = clock
        self._policy = policy or CachePolicy()
        self._state = JwksState(config.issuer, self._policy)
        self._lock = asyncio.Lock()

    @property
    def issuer(self) -> str:
        """The issuer whose keys this cache holds."""
        return self.config.issuer

    async def key(self, kid: str, alg: str) -> VerifyKey:
        """The issuer's key ``kid`` for ``alg``; raise Unauthorized or Unavailable."""
        in_flight = self._lock.locked()
        try:
            step = self._state.decide(kid, alg, self._clock())
        except Unauthorized:
            if not in_flight:
                raise
            step = FETCH  # cooling down because a fetch is under way: wait for its keys
        if isinstance(step, VerifyKey):
            return step
        async with self._lock:  # concurrent misses share one fetch, then see the cool-down
            step = self._state.decide(kid, alg, self._clock())
            if isinstance(step, VerifyKey):
                return step
            await self._refresh()
            return self._state.resolve(kid, alg, self._clock())

    async def _refresh(self) -> None:
        self._state.fetch_started(self._clock())
        try:
            keys, max_age = await self._fetch_keys()
        except Unavailable as exc:
            self._state.fetch_failed(exc.message)
            log.warning("jwks fetch failed", issuer=self.issuer, error=exc.message)
            if exc.code != Unavailable.code:  # e.g. issuer_mismatch: says it all
                raise
            raise _keys_unavailable(self.issuer, exc.message) from None
        ttl = self._policy.ttl(max_age)
        self._state.fetch_succeeded(keys, ttl, self._clock())
        log.info("jwks fetched", issuer=self.issuer, kids=len(keys), ttl=ttl)

    async def _fetch_keys(self) -> tuple[dict[str, tuple[VerifyKey, ...]], float | None]:
        cfg = self.config
        found = await self._fetcher.fetch(discovery_url(cfg.issuer))
        jwks_uri = parse_discovery(found.body, issuer=cfg.issuer, insecure_http=cfg.insecure_http)
        doc = await self._fetcher.fetch(jwks_uri)
        return parse_jwks(doc.body, cfg.algorithms), doc.max_age


def _tls_context(ca_bundle: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"CA bundle {ca_bundle!r} unusable: {exc}") from None


class AiohttpFetcher:
    """GETs over aiohttp: total timeout, size cap, no redirects, optional CA bundle.

    ``bearer_file``: a token sent as ``Authorization: Bearer`` with every https GET
    (never over plain http), re-read at each fetch (a projected ServiceAccount
    token rotates). A cluster's issuer serves its discovery document and JWKS to
    authenticated ServiceAccounts only (``system:service-account-issuer-discovery``).
    """

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        max_bytes: int = 512 * 1024,
        ca_bundle: str | None = None,
        bearer_file: str | None = None,
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0))
        self._max_bytes = max_bytes
        self._ssl = _tls_context(ca_bundle) if ca_bundle else True
        self._bearer_file = bearer_file

    async def fetch(self, url: str) -> Fetched:
        """The body of a 200 response at ``url``; Unavailable on any failure."""
        try:
            return await self._get(url)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise Unavailable(f"fetching {url} failed: {exc.__class__.__name__}") from None

    def _headers(self, url: str) -> dict[str, str]:
        if self._bearer_file is None or not url.startswith("https://"):
            return {}
        try:
            token = Path(self._bearer_file).read_text().strip()
        except OSError as exc:
            raise Unavailable(f"cannot read the bearer token file: {exc.strerror}") from None
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _get(self, url: str) -> Fetched:
        headers = self._headers(url)
        connector = aiohttp.TCPConnector(ssl=self._ssl)
        async with (
            aiohttp.ClientSession(timeout=self._timeout, connector=connector) as session,
            session.get(url, allow_redirects=False, headers=headers) as resp,
        ):
            if resp.status != 200:
                raise Unavailable(f"fetching {url} failed: HTTP {resp.status}")
            body = await self._read_capped(resp, url)
            return Fetched(body, parse_max_age(resp.headers.get("Cache-Control")))

    async def _read_capped(self, resp: aiohttp.ClientResponse, url: str) -> bytes:
        body = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            body += chunk
            if max(len(body), resp.content_length or 0) > self._max_bytes:
                raise Unavailable(f"fetching {url} failed: larger than {self._max_bytes} bytes")
        return bytes(body)
