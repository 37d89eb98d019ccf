"""The pure half of the OpenID Connect login flows: values in, values or errors out.

* PKCE (RFC 7636): :func:`new_verifier` and :func:`s256_challenge` (S256 only);
* the login state :class:`LoginStart` (``state``, ``nonce``, ``code_verifier``),
  made by :func:`new_login` with the authorization request URL, and checked
  against the redirect by :func:`check_callback`; it is a frozen value that the
  web layer keeps server-side (:meth:`LoginStart.to_dict` / :meth:`from_dict`);
* token endpoint answers (:func:`parse_token_reply`, :func:`token_refusal`);
* discovery: :func:`parse_endpoints` (the issuer checked exactly);
* the device grant (RFC 8628): :func:`parse_device_authorization` and
  :func:`next_poll_interval`.

No I/O and no clock: callers pass ``now``. Secrets (verifier, codes, tokens,
device codes) are kept out of ``repr`` and out of every error message.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from authlib.oauth2.rfc7636 import create_s256_code_challenge

from identity.claims import check_url, loads_strict
from identity.jwks import parse_discovery as check_discovery_issuer
from wiregate.errors import Unauthorized, Unavailable

__all__ = [
    "DeviceAuthorization",
    "Endpoints",
    "LoginStart",
    "TokenReply",
    "check_callback",
    "new_login",
    "new_verifier",
    "next_poll_interval",
    "parse_device_authorization",
    "parse_endpoints",
    "parse_token_reply",
    "random_token",
    "s256_challenge",
    "token_refusal",
]

_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_ERROR_CODE = re.compile(r"[a-z0-9_.:-]{1,64}")
_MAX_PARAM = 2048
_REQUEST_PARAMS = frozenset(
    {"response_type", "client_id", "redirect_uri", "scope", "state", "nonce"}
    | {"code_challenge", "code_challenge_method"}
)
_SLOW_DOWN_STEP = 5.0
_MIN_INTERVAL, _MAX_INTERVAL, _DEFAULT_INTERVAL = 1.0, 60.0, 5.0
_MAX_DEVICE_LIFETIME = 3600.0


def random_token(nbytes: int = 32) -> str:
    """``nbytes`` (at least 16, i.e. 128 bits) of CSPRNG output, base64url without padding."""
    if nbytes < 16:
        raise ValueError("random tokens carry at least 128 bits")
    return base64.urlsafe_b64encode(secrets.token_bytes(nbytes)).rstrip(b"=").decode()


def new_verifier() -> str:
    """A fresh PKCE code verifier: 43 characters, 256 bits (RFC 7636 4.1)."""
    return random_token(32)


def s256_challenge(verifier: str) -> str:
    """The S256 code challenge of ``verifier`` (RFC 7636 4.2)."""
    if not _VERIFIER.fullmatch(verifier):
        raise ValueError("a code verifier is 43-128 unreserved characters")
    return str(create_s256_code_challenge(verifier))


@dataclass(frozen=True, slots=True)
class LoginStart:
    """One login in progress: what the browser is sent to, and what must come back.

    Keep it server-side (session store), use it once. Only ``provider`` and
    ``created_at`` show in ``repr``.
    """

    provider: str
    url: str = field(repr=False)
    state: str = field(repr=False)
    nonce: str = field(repr=False)
    code_verifier: str = field(repr=False)
    redirect_uri: str = field(repr=False)
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict for the session store (it holds the verifier: keep it private)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoginStart:
        """Rebuild from :meth:`to_dict`; refuse (Unauthorized) anything malformed."""
        created_at = data.get("created_at")
        if not isinstance(created_at, int | float) or isinstance(created_at, bool):
            raise _unusable()
        return cls(
            provider=_text(data, "provider"),
            url=_text(data, "url"),
            state=_text(data, "state"),
            nonce=_text(data, "nonce"),
            code_verifier=_text(data, "code_verifier"),
            redirect_uri=_text(data, "redirect_uri"),
            created_at=float(created_at),
        )


def _text(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value or len(value) > 4 * _MAX_PARAM:
        raise _unusable()
    return value


def _unusable() -> Unauthorized:
    return Unauthorized("login refused: the saved login state is unusable", code="invalid_state")


def new_login(
    provider: str,
    *,
    authorization_endpoint: str,
    client_id: str,
    redirect_uri: str,
    scopes: tuple[str, ...],
    now: float,
) -> LoginStart:
    """A fresh login: random state, nonce and verifier, and the authorization URL."""
    state, nonce, verifier = random_token(), random_token(), new_verifier()
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(scopes),
        "state": state,
        "nonce": nonce,
        "code_challenge": s256_challenge(verifier),
        "code_challenge_method": "S256",
    }
    url = _add_query(authorization_endpoint, params)
    return LoginStart(provider, url, state, nonce, verifier, redirect_uri, now)


def _add_query(endpoint: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(endpoint)
    kept = parse_qsl(parts.query, keep_blank_values=True)
    if any(name in _REQUEST_PARAMS for name, _ in kept):
        raise Unavailable(f"authorization endpoint {endpoint!r} carries request parameters")
    query = urlencode([*kept, *params.items()])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def check_callback(
    params: Mapping[str, str],
    expected: LoginStart,
    *,
    issuer: str,
    require_iss: bool,
    now: float,
    max_age: float,
) -> str:
    """The authorization code of a redirect back from the IdP, or Unauthorized.

    Order: ``state`` (missing or another login's), login age, ``error``, the
    RFC 9207 ``iss`` parameter (required when the IdP advertises it), ``code``.
    """
    for name, value in params.items():
        if not isinstance(value, str) or len(value) > _MAX_PARAM:
            raise _refused(f"parameter {name!r} malformed or too long", "invalid_request")
    _check_state(params.get("state"), expected.state)
    if not 0 <= now - expected.created_at <= max_age:
        raise _refused("the login took too long; start again", "login_expired")
    if "error" in params:
        raise _refused(f"the identity provider answered {_safe_code(params['error'])}", "denied")
    _check_iss(params.get("iss"), issuer, require_iss)
    code = params.get("code")
    if not code:
        raise _refused("no authorization code in the answer", "invalid_request")
    return code


def _check_state(got: str | None, expected: str) -> None:
    if not got:
        raise _refused("state missing", "invalid_state")
    if not hmac.compare_digest(got.encode("utf-8", "replace"), expected.encode()):
        raise _refused("state does not match this login", "invalid_state")


def _check_iss(got: str | None, issuer: str, required: bool) -> None:
    if got is None and not required:
        return
    if got != issuer:
        raise _refused("the answer comes from another issuer (iss)", "invalid_issuer")


def _refused(reason: str, code: str) -> Unauthorized:
    return Unauthorized(f"login refused: {reason}", code=code)


def _safe_code(value: object) -> str:
    text = value if isinstance(value, str) else ""
    return text if _ERROR_CODE.fullmatch(text) else "an unrecognised error"


@dataclass(frozen=True, slots=True)
class TokenReply:
    """A token endpoint answer: an ID token, or an OAuth error code."""

    id_token: str | None = field(default=None, repr=False)
    error: str | None = None


def parse_token_reply(status: int, body: bytes, *, issuer: str) -> TokenReply:
    """Parse a token endpoint answer; raise Unavailable when it is not OAuth at all."""
    if status == 200:
        doc = loads_strict(body, "token response", Unavailable)
        token = doc.get("id_token")
        if not isinstance(token, str) or not token:
            raise _refused("the token response carries no ID token", "invalid_token")
        return TokenReply(id_token=token)
    if status in (400, 401):
        doc = loads_strict(body, "token error response", Unavailable)
        return TokenReply(error=_safe_code(doc.get("error")))
    raise Unavailable(f"token endpoint of {issuer} answered HTTP {status}")


def token_refusal(reply: TokenReply, issuer: str) -> Unauthorized | Unavailable:
    """The error for a refused token request; a client-credential fault is ours."""
    if reply.error == "invalid_client":
        return Unavailable(
            f"identity provider {issuer} refused this gateway's client credentials",
            code="invalid_client",
            hint="check the client id and the client secret file",
        )
    return _refused(f"the identity provider answered {reply.error}", reply.error or "denied")


@dataclass(frozen=True, slots=True)
class DeviceAuthorization:
    """A device authorization (RFC 8628 3.2); ``device_code`` is a secret."""

    provider: str
    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_at: float
    interval: float


def parse_device_authorization(provider: str, body: bytes, *, now: float) -> DeviceAuthorization:
    """Parse a device authorization response received at ``now``."""
    doc = loads_strict(body, "device authorization response", Unavailable)
    strings = [doc.get(k) for k in ("device_code", "user_code", "verification_uri")]
    complete, expires_in = doc.get("verification_uri_complete"), doc.get("expires_in")
    interval = doc.get("interval", _DEFAULT_INTERVAL)
    if not all(isinstance(s, str) and 0 < len(s) <= _MAX_PARAM for s in strings):
        raise Unavailable("device authorization response lacks its codes")
    if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in <= 0:
        raise Unavailable("device authorization response has no usable expires_in")
    if not isinstance(interval, int | float) or isinstance(interval, bool):
        raise Unavailable("device authorization response has a malformed interval")
    device_code, user_code, uri = (str(s) for s in strings)
    return DeviceAuthorization(
        provider=provider,
        device_code=device_code,
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=complete if isinstance(complete, str) else None,
        expires_at=now + min(float(expires_in), _MAX_DEVICE_LIFETIME),
        interval=min(max(float(interval), _MIN_INTERVAL), _MAX_INTERVAL),
    )


_DEVICE_REFUSALS = {
    "expired_token": "the device code expired; start again",
    "access_denied": "the approver denied this device",
}


def next_poll_interval(reply: TokenReply, interval: float, *, issuer: str) -> float:
    """The wait before the next poll (RFC 8628 3.5); raise the error that ends polling."""
    if reply.error == "authorization_pending":
        return interval
    if reply.error == "slow_down":
        return min(interval + _SLOW_DOWN_STEP, _MAX_INTERVAL)
    if reply.error in _DEVICE_REFUSALS:
        raise _refused(_DEVICE_REFUSALS[reply.error], reply.error)
    raise token_refusal(reply, issuer)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """What discovery says about an issuer's endpoints."""

    authorization: str
    token: str
    device_authorization: str | None
    auth_methods: tuple[str, ...]
    iss_parameter: bool


def parse_endpoints(body: bytes, *, issuer: str, insecure_http: bool = False) -> Endpoints:
    """The endpoints of a discovery document for exactly ``issuer`` (pure)."""
    check_discovery_issuer(body, issuer=issuer, insecure_http=insecure_http)
    doc = loads_strict(body, "discovery document", Unavailable)

    def url(name: str, required: bool = True) -> str | None:
        value = doc.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise Unavailable(f"discovery document for {issuer} has no {name}")
        check_url(value, insecure_http=insecure_http, what=name, error=Unavailable)
        return value

    methods = doc.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
    if not isinstance(methods, list):
        raise Unavailable(f"discovery document for {issuer}: malformed auth methods")
    return Endpoints(
        authorization=str(url("authorization_endpoint")),
        token=str(url("token_endpoint")),
        device_authorization=url("device_authorization_endpoint", required=False),
        auth_methods=tuple(m for m in methods if isinstance(m, str)),
        iss_parameter=doc.get("authorization_response_iss_parameter_supported") is True,
    )
