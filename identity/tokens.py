"""ID token validation: OpenID Connect Core 3.1.3.7 and RFC 8725, with pyjwt.

The order of checks, each a refusal (:class:`~wiregate.errors.Unauthorized`,
code ``invalid_token``) when it fails:

1. shape: a string of at most 16 KiB, three canonical base64url segments, a
   non-empty signature (no unsigned or stripped tokens);
2. header (:func:`parse_header`): ``alg`` in the issuer's asymmetric allow-list,
   compared exactly (``none`` in any case and every ``HS*`` refused, so a
   public key can never be used as an HMAC secret); ``kid`` a short safe string;
   no ``jwk``/``jku``/``x5u``/``x5c``/``crit``/``b64`` (keys never come from the
   token); ``typ``, if present, ``JWT`` (``at+jwt``, ``logout+jwt`` refused);
3. key: only from the issuer's JWKS (:class:`~identity.jwks.JwksCache`), and
   compatible with ``alg``; then the signature, checked by pyjwt;
4. claims (:func:`~identity.claims.check_claims`): ``iss``, ``sub``,
   ``aud``/``azp``, ``exp``/``iat``/``nbf``, ``nonce``, no ``events``.

:func:`parse_header` and :func:`verify_id_token` are pure; :class:`TokenValidator`
adds the key lookup, which may fetch. Tokens are never logged.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from jwt.api_jws import PyJWS
from jwt.exceptions import PyJWTError

from identity.claims import Claims, IssuerConfig, check_claims, is_safe_kid, loads_strict, refuse
from identity.jwks import JwksCache, VerifyKey
from wiregate.clock import Clock
from wiregate.errors import ConfigError, Unavailable

__all__ = [
    "MAX_TOKEN_CHARS",
    "NonceStore",
    "TokenHeader",
    "TokenValidator",
    "parse_header",
    "verify_id_token",
]

MAX_TOKEN_CHARS = 16 * 1024
_MAX_HEADER_CHARS = 4096
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_KEY_HEADERS = ("jwk", "jku", "x5u", "x5c")
_UNSUPPORTED_HEADERS = ("crit", "b64", "zip", "enc")
_JWT_TYPES = frozenset({"jwt", "application/jwt"})
_JWS = PyJWS()  # stateless once built; building one costs more than a verification
_TYPE_REASONS = {
    "at+jwt": "an access token is not an ID token",
    "application/at+jwt": "an access token is not an ID token",
    "logout+jwt": "a logout token is not an ID token",
    "application/logout+jwt": "a logout token is not an ID token",
}


@dataclass(frozen=True, slots=True)
class TokenHeader:
    """The checked JOSE header of a token."""

    alg: str
    kid: str
    typ: str | None


def _segments(token: object) -> tuple[str, str, str]:
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise refuse("not a token of acceptable size")
    parts = token.split(".")
    if len(parts) != 3:
        raise refuse("not a compact JWS (three segments)")
    header, payload, signature = parts
    if not signature:
        raise refuse("unsigned token (empty signature)")
    if not all(_SEGMENT.fullmatch(p) for p in parts):
        raise refuse("segments are not base64url")
    return header, payload, signature


def _b64decode(segment: str, what: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise refuse(f"{what} is not base64url") from None
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment.encode():
        raise refuse(f"{what} is not canonical base64url")
    return raw


def parse_header(
    token: str, algorithms: tuple[str, ...], *, extra_types: frozenset[str] = frozenset()
) -> TokenHeader:
    """Check a token's shape and header against an issuer's ``algorithms``.

    ``extra_types`` are lowercased ``typ`` values accepted besides ``JWT`` (a
    workload issuer's RFC 9068 access tokens: ``at+jwt``).
    """
    header_b64, payload_b64, signature_b64 = _segments(token)
    if len(header_b64) > _MAX_HEADER_CHARS:
        raise refuse("header too large")
    for segment, what in ((payload_b64, "payload"), (signature_b64, "signature")):
        _b64decode(segment, what)
    header = loads_strict(_b64decode(header_b64, "header"), "header", refuse)
    alg = _check_alg(header.get("alg"), algorithms)
    _check_no_key_headers(header)
    typ = _check_typ(header.get("typ"), extra_types)
    kid = header.get("kid")
    if not is_safe_kid(kid):
        raise refuse("kid missing, not a string, too long or unsafe")
    return TokenHeader(alg=alg, kid=kid, typ=typ)


def _check_alg(alg: Any, algorithms: tuple[str, ...]) -> str:
    if not isinstance(alg, str):
        raise refuse("alg missing")
    if alg.strip().lower() == "none":
        raise refuse("unsigned token (alg none)")
    if alg.upper().startswith("HS"):
        raise refuse("symmetric algorithms are never accepted")
    if alg not in algorithms:
        raise refuse("algorithm not allowed for this issuer")
    return alg


def _check_no_key_headers(header: dict[str, Any]) -> None:
    for name in _KEY_HEADERS:
        if name in header:
            raise refuse(f"'{name}' header refused: keys come only from the issuer's JWKS")
    for name in _UNSUPPORTED_HEADERS:
        if name in header:
            raise refuse(f"'{name}' header not supported")


def _check_typ(typ: Any, extra_types: frozenset[str]) -> str | None:
    if typ is None:
        return None
    if not isinstance(typ, str):
        raise refuse("typ malformed")
    lowered = typ.lower()
    if lowered in extra_types:
        return typ
    if lowered in _TYPE_REASONS:
        raise refuse(_TYPE_REASONS[lowered])
    if lowered not in _JWT_TYPES:
        raise refuse("typ is not JWT")
    return typ


def verify_id_token(
    token: str,
    header: TokenHeader,
    key: VerifyKey,
    config: IssuerConfig,
    *,
    audience: str,
    nonce: str | None,
    now: float,
) -> Claims:
    """Verify ``token``'s signature with ``key`` and its claims at ``now`` (pure)."""
    if key.kid != header.kid or not key.can_verify(header.alg):
        raise refuse("the key does not match the token's kid and alg")
    try:
        decoded = _JWS.decode_complete(token, key=key.public_key, algorithms=[header.alg])
    except PyJWTError:
        raise refuse("bad signature") from None
    payload = loads_strict(decoded["payload"], "payload", refuse)
    return check_claims(payload, config, audience=audience, nonce=nonce, now=now)


class NonceStore:
    """Nonces already used, kept for ``ttl`` seconds: a replayed ID token is refused.

    Bounded by ``max_entries``; when full of live nonces it refuses new logins
    (:class:`Unavailable`) rather than forget a nonce that could be replayed.
    """

    def __init__(self, *, ttl: float = 24 * 3600.0 + 120.0, max_entries: int = 100_000) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ConfigError("NonceStore: ttl > 0 and max_entries >= 1 required")
        self._ttl = ttl
        self._max = max_entries
        self._used: dict[str, float] = {}

    def use(self, nonce: str, now: float) -> None:
        """Mark ``nonce`` used at ``now``; refuse it if it was used before."""
        self._prune(now)
        if nonce in self._used:
            raise refuse("nonce already used (replayed token)")
        if len(self._used) >= self._max:
            raise Unavailable("too many logins in flight", hint="try again in a minute")
        self._used[nonce] = now + self._ttl

    def __len__(self) -> int:
        return len(self._used)

    def _prune(self, now: float) -> None:
        while self._used:
            oldest = next(iter(self._used))
            if self._used[oldest] > now:
                return
            del self._used[oldest]


class TokenValidator:
    """Validates ID tokens of one issuer, with keys from its :class:`JwksCache`."""

    def __init__(
        self,
        config: IssuerConfig,
        jwks: JwksCache,
        clock: Clock,
        *,
        nonces: NonceStore | None = None,
        extra_types: frozenset[str] = frozenset(),
    ) -> None:
        if jwks.issuer != config.issuer:
            raise ConfigError(f"JWKS cache is for {jwks.issuer}, not {config.issuer}")
        self.config = config
        self._jwks = jwks
        self._clock = clock
        self._nonces = nonces
        self._extra_types = extra_types

    async def validate_id_token(
        self,
        token: str,
        *,
        audience: str,
        nonce: str | None = None,
        now: float | None = None,
    ) -> Claims:
        """The verified claims of ``token`` for client ``audience``, else an error.

        ``nonce`` is the one this login sent; with a :class:`NonceStore` it is
        then marked used. Raises Unauthorized (refused) or Unavailable (no keys).
        """
        if not audience:
            raise ConfigError("validate_id_token: audience (the client id) is required")
        header = parse_header(token, self.config.algorithms, extra_types=self._extra_types)
        key = await self._jwks.key(header.kid, header.alg)
        at = self._clock() if now is None else now
        claims = verify_id_token(
            token, header, key, self.config, audience=audience, nonce=nonce, now=at
        )
        if nonce is not None and self._nonces is not None:
            self._nonces.use(nonce, at)
        return claims
