"""An issuer's token policy and the checks on a verified token's claims (pure).

:class:`IssuerConfig` says what one issuer may sign with and how strict the time
checks are; :func:`check_claims` applies OpenID Connect Core 3.1.3.7 and RFC 8725
to a payload whose signature has already been verified, at ``now``, and returns
:class:`Claims`. Every refusal is :class:`~wiregate.errors.Unauthorized` with code
``invalid_token``; messages never echo the token.

Time rules, with ``L`` the leeway: ``exp`` and ``iat`` required; valid while
``now < exp + L``; ``exp`` no later than ``now + max_lifetime + L``; ``nbf`` and
``iat`` no later than ``now + L``; the lifetime ``exp - iat`` at most
``max_lifetime + L`` (so an old ``iat`` is not accepted in its last hours).
"""

from __future__ import annotations

import hmac
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeGuard
from urllib.parse import urlsplit

from wiregate.errors import ConfigError, Unauthorized
from wiregate.model import Identity

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "Claims",
    "IssuerConfig",
    "check_claims",
    "check_url",
    "is_safe_kid",
    "loads_strict",
    "refuse",
    "verified_email",
]

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"},
)
_KID = re.compile(r"[A-Za-z0-9._~+=:/-]{1,128}")
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
_MAX_NUMERIC_DATE = 2**40  # year ~36800: beyond it a value is garbage, not a date
_MAX_SUBJECT = 512
_MAX_AUDIENCES = 16
_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"


def refuse(reason: str) -> Unauthorized:
    """The error for a refused token: ``Unauthorized`` with code ``invalid_token``."""
    return Unauthorized(f"token refused: {reason}", code="invalid_token")


def is_safe_kid(kid: object) -> TypeGuard[str]:
    """Whether ``kid`` is a short string of safe characters and nothing path-like."""
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        return False
    return not (kid.startswith(("/", ".")) or ".." in kid or "//" in kid)


def loads_strict(data: bytes, what: str, error: Callable[[str], Exception]) -> dict[str, Any]:
    """Parse a JSON object: no duplicate keys, no NaN/Infinity; else raise ``error``."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate member")
        return dict(pairs)

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(data, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise error(f"{what} is not a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One trusted issuer: its exact URL, algorithm allow-list and time bounds.

    ``algorithms`` holds asymmetric algorithms only (HMAC is never mixed in).
    ``trusted_audiences`` are audiences other than the client id that a token
    may also carry. ``insecure_http`` allows ``http://`` on loopback (tests).
    """

    issuer: str
    algorithms: tuple[str, ...] = ("RS256",)
    trusted_audiences: frozenset[str] = frozenset()
    leeway: float = 60.0
    max_lifetime: float = 24 * 3600.0
    insecure_http: bool = False

    def __post_init__(self) -> None:
        check_url(self.issuer, insecure_http=self.insecure_http, what="issuer", error=ConfigError)
        if not self.algorithms:
            raise ConfigError(f"issuer {self.issuer}: the algorithm allow-list is empty")
        for alg in self.algorithms:
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise ConfigError(
                    f"issuer {self.issuer}: algorithm {alg!r} is not allowed",
                    hint="use asymmetric algorithms only: "
                    + ", ".join(sorted(ASYMMETRIC_ALGORITHMS)),
                )
        if not 0 <= self.leeway <= 300:
            raise ConfigError(f"issuer {self.issuer}: leeway must be between 0 and 300 seconds")
        if not 0 < self.max_lifetime <= 366 * 86400:
            raise ConfigError(f"issuer {self.issuer}: max_lifetime must be within (0, 1 year]")


def check_url(url: str, *, insecure_http: bool, what: str, error: type[Exception]) -> None:
    """Raise ``error`` unless ``url`` is https (or http on loopback when allowed)."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname  # raises on a malformed authority ("https://[")
    except ValueError:
        raise error(f"{what} {url!r} is not a valid URL") from None
    if parts.query or parts.fragment or not hostname:
        raise error(f"{what} {url!r} must be an absolute URL without query or fragment")
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and insecure_http and hostname in _LOOPBACK:
        return
    raise error(f"{what} {url!r} must use https")


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified claims of an ID token; ``raw`` holds every claim, read-only."""

    issuer: str
    subject: str
    audience: tuple[str, ...]
    expires_at: float
    issued_at: float
    not_before: float | None
    nonce: str | None
    authorized_party: str | None
    raw: Mapping[str, Any]

    @property
    def identity(self) -> Identity:
        """Who this token names: ``Identity(iss, sub)``, never the email."""
        return Identity(self.issuer, self.subject)


def verified_email(claims: Claims) -> str | None:
    """The ``email`` claim only when ``email_verified`` is JSON ``true``; else ``None``."""
    email = claims.raw.get("email")
    if claims.raw.get("email_verified") is not True or not isinstance(email, str):
        return None
    return email if "@" in email else None


def check_claims(
    payload: Mapping[str, Any],
    config: IssuerConfig,
    *,
    audience: str,
    nonce: str | None,
    now: float,
) -> Claims:
    """Check a verified payload against ``config`` at ``now``; return its :class:`Claims`."""
    _check_not_security_event(payload)
    issuer = _check_issuer(payload, config)
    subject = _check_subject(payload)
    audiences, azp = _check_audience(payload, config, audience)
    expires_at, issued_at, not_before = _check_times(payload, config, now)
    return Claims(
        issuer=issuer,
        subject=subject,
        audience=audiences,
        expires_at=expires_at,
        issued_at=issued_at,
        not_before=not_before,
        nonce=_check_nonce(payload, nonce),
        authorized_party=azp,
        raw=MappingProxyType(dict(payload)),
    )


def _check_not_security_event(payload: Mapping[str, Any]) -> None:
    events = payload.get("events")
    if isinstance(events, Mapping) and _LOGOUT_EVENT in events:
        raise refuse("a logout token is not an ID token")
    if "events" in payload:
        raise refuse("a security event token is not an ID token")


def _check_issuer(payload: Mapping[str, Any], config: IssuerConfig) -> str:
    iss = payload.get("iss")
    if not isinstance(iss, str):
        raise refuse("iss missing")
    if not hmac.compare_digest(iss.encode("utf-8", "replace"), config.issuer.encode()):
        raise refuse("iss is not the configured issuer")
    return iss


def _check_subject(payload: Mapping[str, Any]) -> str:
    sub = payload.get("sub")
    if not isinstance(sub, str) or not sub:
        raise refuse("sub missing")
    if len(sub) > _MAX_SUBJECT or not sub.isprintable():
        raise refuse("sub is too long or not printable")
    return sub


def _check_audience(
    payload: Mapping[str, Any], config: IssuerConfig, client_id: str
) -> tuple[tuple[str, ...], str | None]:
    audiences = _audience_list(payload.get("aud"))
    if client_id not in audiences:
        raise refuse("aud does not contain this client")
    if any(a != client_id and a not in config.trusted_audiences for a in audiences):
        raise refuse("aud contains an untrusted audience")
    azp = payload.get("azp")
    if azp is None and len(audiences) > 1:
        raise refuse("azp missing on a token with several audiences")
    if azp is not None and azp != client_id:
        raise refuse("azp is not this client")
    return audiences, azp


def _audience_list(aud: Any) -> tuple[str, ...]:
    if isinstance(aud, str):
        aud = [aud]
    if not isinstance(aud, list) or not aud or len(aud) > _MAX_AUDIENCES:
        raise refuse("aud missing or malformed")
    if not all(isinstance(a, str) and a for a in aud):
        raise refuse("aud malformed")
    return tuple(aud)


def _check_times(
    payload: Mapping[str, Any], config: IssuerConfig, now: float
) -> tuple[float, float, float | None]:
    exp = _numeric_date(payload, "exp")
    iat = _numeric_date(payload, "iat")
    nbf = _numeric_date(payload, "nbf")
    leeway = config.leeway
    if exp is None:
        raise refuse("exp and iat are required")
    if iat is None:
        raise refuse("exp and iat are required (iat missing: the lifetime cap runs from iat)")
    if now >= exp + leeway:
        raise refuse("expired")
    if exp > now + config.max_lifetime + leeway:
        raise refuse("exp is too far in the future")
    if iat > now + leeway:
        raise refuse("iat is in the future")
    if exp - iat > config.max_lifetime + leeway:
        raise refuse("lifetime (exp - iat) is beyond the cap")
    if nbf is not None and nbf > now + leeway:
        raise refuse("not valid yet (nbf)")
    return exp, iat, nbf


def _numeric_date(payload: Mapping[str, Any], name: str) -> float | None:
    if name not in payload:
        return None
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise refuse(f"{name} is not a number")
    if not math.isfinite(value) or not 0 <= value < _MAX_NUMERIC_DATE:
        raise refuse(f"{name} is out of range")
    return float(value)


def _check_nonce(payload: Mapping[str, Any], expected: str | None) -> str | None:
    got = payload.get("nonce")
    if got is not None and not isinstance(got, str):
        raise refuse("nonce malformed")
    if expected is None:
        return got
    if got is None:
        raise refuse("nonce missing")
    if not hmac.compare_digest(got.encode("utf-8", "replace"), expected.encode()):
        raise refuse("nonce does not match this login")
    return got
