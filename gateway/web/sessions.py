"""The web pages' cookies and CSRF tokens (pure: every time is passed in).

Two cookies, both JSON sealed with a NaCl SecretBox (XSalsa20-Poly1305: secret
and authenticated), each under its own sub-key of the key in
``state_dir/web-session.key`` so that one cannot stand in for the other:

* the **session** (:class:`Session`): issuer, subject, display name, the email
  only when ``email_verified`` is true, groups, issued/expires, a random
  session id and a per-session CSRF secret. A new one is made on every login
  (session fixation: nothing of an earlier cookie is reused).
* the **pre-login** state (:class:`PreLogin`): the PKCE verifier, state, nonce
  and the path to return to, for the few minutes of a login at the IdP.

A cookie that was tampered with, sealed for the other purpose, malformed or
expired opens to ``None``. The CSRF token of a form is an HMAC of the session
id under the session's CSRF secret (synchronizer token pattern).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from gateway.store.audit import oidc_actor
from identity.claims import Claims, verified_email
from identity.pkce import LoginStart
from wiregate.errors import Unauthorized
from wiregate.model import Identity

__all__ = [
    "PRE_LOGIN_TTL",
    "CookieBox",
    "PreLogin",
    "Session",
    "csrf_matches",
    "csrf_token",
    "new_session",
    "safe_return_path",
    "same_origin",
]

PRE_LOGIN_TTL = 600.0  # seconds from the IdP redirect to the callback
MAX_GROUPS_CHARS = 1500  # groups beyond this are dropped (a cookie holds ~4 KB)
_MAX_TEXT = 256
_SESSION, _PRE_LOGIN = b"wiregate-session", b"wiregate-prelog"


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in person, as the session cookie holds them."""

    session_id: str
    issuer: str
    subject: str
    name: str
    email: str | None
    groups: tuple[str, ...]
    issued_at: float
    expires_at: float
    csrf_secret: str

    @property
    def identity(self) -> Identity:
        """Who this is: ``Identity(iss, sub)``."""
        return Identity(self.issuer, self.subject)

    @property
    def actor(self) -> str:
        """The audit log's name for this person: ``oidc:<iss>#<sub>``."""
        return oidc_actor(self.identity)

    def in_any(self, groups: Collection[str]) -> bool:
        """Whether the person is a member of any of ``groups``."""
        return any(g in groups for g in self.groups)


@dataclass(frozen=True, slots=True)
class PreLogin:
    """A login in progress at the IdP, and where to go when it is done."""

    start: LoginStart
    return_to: str


def new_session(
    claims: Claims,
    *,
    groups_claim: str,
    lifetime: float,
    now: float,
    keep_first: Collection[str] = (),
) -> Session:
    """A fresh session (new id, new CSRF secret) for verified ``claims``.

    Groups named in ``keep_first`` (the admin groups) are kept first when the
    list must be cut to fit in a cookie.
    """
    return Session(
        session_id=secrets.token_urlsafe(16),
        issuer=claims.issuer,
        subject=claims.subject,
        name=_display_name(claims),
        email=verified_email(claims),
        groups=_groups(claims.raw.get(groups_claim), keep_first),
        issued_at=now,
        expires_at=now + lifetime,
        csrf_secret=secrets.token_urlsafe(32),
    )


def _display_name(claims: Claims) -> str:
    for key in ("name", "preferred_username"):
        value = claims.raw.get(key)
        if isinstance(value, str) and value.strip() and value.isprintable():
            return value.strip()[:_MAX_TEXT]
    return verified_email(claims) or claims.subject[:_MAX_TEXT]


def _groups(value: Any, keep_first: Collection[str]) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    names = [g for g in value if isinstance(g, str) and 0 < len(g) <= _MAX_TEXT]
    names.sort(key=lambda g: g not in keep_first)  # stable: admin groups first
    kept: list[str] = []
    used = 0
    for group in dict.fromkeys(names):
        used += len(group) + 4
        if used > MAX_GROUPS_CHARS:
            break
        kept.append(group)
    return tuple(kept)


class CookieBox:
    """Seals and opens the two cookies; one sub-key per purpose."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the cookie key is 32 bytes")
        self._session = SecretBox(_subkey(key, _SESSION))
        self._pre_login = SecretBox(_subkey(key, _PRE_LOGIN))

    def __repr__(self) -> str:
        return "CookieBox(<key redacted>)"

    def seal_session(self, session: Session) -> str:
        """The session cookie's value."""
        return _seal(self._session, asdict(session))

    def open_session(self, value: str | None, now: float) -> Session | None:
        """The session in a cookie, or None: missing, tampered, malformed or expired."""
        data = _open(self._session, value)
        if data is None:
            return None
        try:
            data["groups"] = tuple(data["groups"])
            session = Session(**data)
        except (KeyError, TypeError):
            return None
        if not _session_shape_ok(session) or not session.issued_at <= now < session.expires_at:
            return None
        return session

    def seal_pre_login(self, pre: PreLogin) -> str:
        """The pre-login cookie's value."""
        return _seal(self._pre_login, {"start": pre.start.to_dict(), "return_to": pre.return_to})

    def open_pre_login(self, value: str | None, now: float) -> PreLogin | None:
        """The login in progress, or None: missing, tampered, malformed or too old."""
        data = _open(self._pre_login, value)
        if data is None or not isinstance(data.get("start"), dict):
            return None
        try:
            start = LoginStart.from_dict(data["start"])
        except Unauthorized:
            return None
        return_to = safe_return_path(data.get("return_to"))
        if not 0 <= now - start.created_at <= PRE_LOGIN_TTL:
            return None
        return PreLogin(start, return_to)


def _session_shape_ok(s: Session) -> bool:
    texts = (s.session_id, s.issuer, s.subject, s.name, s.csrf_secret)
    numbers = (s.issued_at, s.expires_at)
    return (
        all(isinstance(t, str) and t for t in texts)
        and (s.email is None or isinstance(s.email, str))
        and all(isinstance(g, str) for g in s.groups)
        and all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)
    )


def _subkey(key: bytes, purpose: bytes) -> bytes:
    return hashlib.blake2b(b"", key=key, person=purpose, digest_size=32).digest()


def _seal(box: SecretBox, payload: Mapping[str, Any]) -> str:
    sealed = box.encrypt(json.dumps(payload, separators=(",", ":")).encode())
    return base64.urlsafe_b64encode(bytes(sealed)).rstrip(b"=").decode()


def _open(box: SecretBox, value: str | None) -> dict[str, Any] | None:
    if not value or len(value) > 8192:
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        data = json.loads(box.decrypt(raw))
    except (binascii.Error, ValueError, CryptoError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def safe_return_path(value: object) -> str:
    """A local path to return to after login (``/`` pages only), else ``/devices``."""
    if not isinstance(value, str) or len(value) > 512:
        return "/devices"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not value.startswith("/") or value.startswith("//"):
        return "/devices"
    if "\\" in value or not value.isprintable():
        return "/devices"
    return value


# -- CSRF ----------------------------------------------------------------------------


def csrf_token(session: Session) -> str:
    """The synchronizer token every form of ``session`` carries."""
    mac = hmac.new(session.csrf_secret.encode(), b"csrf:" + session.session_id.encode(), "sha256")
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def csrf_matches(session: Session, given: object) -> bool:
    """Whether a form's token is the session's (constant-time)."""
    if not isinstance(given, str) or not given.isascii():
        return False
    return hmac.compare_digest(given.encode(), csrf_token(session).encode())


def same_origin(public_origin: str, origin: str | None, referer: str | None) -> bool:
    """Whether a POST comes from our own pages: ``Origin``, else ``Referer``, must match.

    A request with neither header is refused; ``Origin: null`` is not ours.
    """
    if origin is not None:
        return origin == public_origin
    if referer is not None:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}" == public_origin
    return False
