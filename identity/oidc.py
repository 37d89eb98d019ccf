"""The OpenID Connect relying party: browser logins (code + PKCE) and the device grant.

:class:`OidcRelyingParty` serves one or more :class:`OidcProvider` side by side,
by name. For each it finds the endpoints by discovery (the document's ``issuer``
must equal the configured one exactly, checked by :func:`identity.jwks.parse_discovery`)
and validates ID tokens with :class:`identity.tokens.TokenValidator` (keys from
its JWKS cache, ``aud`` = the client id, one-time ``nonce``).

* :meth:`~OidcRelyingParty.begin_login` → :class:`~identity.pkce.LoginStart` (keep
  it server-side), :meth:`~OidcRelyingParty.complete_login` → :class:`Claims`;
* :meth:`~OidcRelyingParty.start_device_authorization` → a
  :class:`~identity.pkce.DeviceAuthorization` to show the user, and
  :meth:`~OidcRelyingParty.poll_device_token` → :class:`Claims` (RFC 8628).

Refused logins raise :class:`~wiregate.errors.Unauthorized` with the reason; an
unreachable or broken IdP raises :class:`~wiregate.errors.Unavailable`. HTTP has
a total timeout, a body cap and no redirects. The client secret, codes,
verifiers and tokens are never logged nor put in an error.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote_plus

import aiohttp

from identity.claims import Claims, IssuerConfig, check_url
from identity.jwks import AiohttpFetcher, CachePolicy, Fetcher, JwksCache, discovery_url
from identity.pkce import (
    DeviceAuthorization,
    Endpoints,
    LoginStart,
    TokenReply,
    check_callback,
    new_login,
    next_poll_interval,
    parse_device_authorization,
    parse_endpoints,
    parse_token_reply,
    token_refusal,
)
from identity.tokens import NonceStore, TokenValidator
from wiregate.clock import Clock
from wiregate.errors import ConfigError, Unauthorized, Unavailable
from wiregate.logging import get_logger

__all__ = [
    "AiohttpPoster",
    "ClientSecret",
    "FormPoster",
    "OidcProvider",
    "OidcRelyingParty",
]

log = get_logger("identity.oidc")

Sleep = Callable[[float], Awaitable[None]]
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_AUTH_METHODS = ("client_secret_basic", "client_secret_post")
_MAX_SECRET_BYTES = 4096
_DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class ClientSecret:
    """A client secret; its ``repr`` and ``str`` never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not value or not value.isprintable():
            raise ConfigError("client secret is empty or not printable")
        self._value = value

    @classmethod
    def from_file(cls, path: str | Path) -> ClientSecret:
        """Read the secret from ``path`` (one line; surrounding whitespace dropped)."""
        try:
            raw = Path(path).read_bytes()[: _MAX_SECRET_BYTES + 1]
        except OSError as exc:
            raise ConfigError(
                f"client secret file {str(path)!r} unreadable: {exc.strerror}"
            ) from None
        if len(raw) > _MAX_SECRET_BYTES:
            raise ConfigError(f"client secret file {str(path)!r} is too large")
        return cls(raw.decode("utf-8", "replace").strip())

    def reveal(self) -> str:
        """The secret itself, for the token request only."""
        return self._value

    def __repr__(self) -> str:
        return "ClientSecret(<redacted>)"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class OidcProvider:
    """One IdP this gateway signs people in with, and this gateway's client there.

    ``token_auth_method`` forces ``client_secret_basic`` or ``client_secret_post``;
    ``None`` picks by discovery (basic first). ``insecure_http`` allows
    ``http://`` on loopback only (tests). ``login_ttl`` bounds a login's duration.
    """

    name: str
    issuer: str
    client_id: str
    client_secret: ClientSecret = field(repr=False)
    redirect_uri: str
    scopes: tuple[str, ...] = ("openid", "email")
    algorithms: tuple[str, ...] = ("RS256",)
    token_auth_method: str | None = None
    insecure_http: bool = False
    login_ttl: float = 600.0

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"provider name {self.name!r}: lowercase letters, digits, - and _")
        if not self.client_id or "openid" not in self.scopes:
            raise ConfigError(
                f"provider {self.name}: a client id and the 'openid' scope are needed"
            )
        if self.token_auth_method not in (None, *_AUTH_METHODS):
            raise ConfigError(
                f"provider {self.name}: token_auth_method must be one of {_AUTH_METHODS}"
            )
        if not 0 < self.login_ttl <= 3600:
            raise ConfigError(f"provider {self.name}: login_ttl must be within (0, 3600] seconds")
        check_url(
            self.redirect_uri,
            insecure_http=self.insecure_http,
            what="redirect_uri",
            error=ConfigError,
        )
        self.issuer_config()

    def issuer_config(self) -> IssuerConfig:
        """The token policy of this provider's issuer."""
        return IssuerConfig(self.issuer, self.algorithms, insecure_http=self.insecure_http)


class FormPoster(Protocol):
    """POSTs a form; answers (status, body); raises Unavailable on transport failure."""

    async def post_form(
        self, url: str, form: Mapping[str, str], headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        """The status and body of the answer to a form POST at ``url``."""
        ...


class AiohttpPoster:
    """Form POSTs over aiohttp: total timeout, size cap, no redirects."""

    def __init__(self, *, timeout: float = 10.0, max_bytes: int = 256 * 1024) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0))
        self._max_bytes = max_bytes

    async def post_form(
        self, url: str, form: Mapping[str, str], headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        """POST ``form`` to ``url``; Unavailable on any transport failure."""
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.post(
                    url, data=dict(form), headers=dict(headers), allow_redirects=False
                ) as resp,
            ):
                return resp.status, await self._read_capped(resp)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise Unavailable(f"POST to {url} failed: {exc.__class__.__name__}") from None

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        body = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > self._max_bytes:
                raise ValueError("answer too large")
        return bytes(body)


class _Issuer:
    """One configured provider at run time: discovered endpoints and its validator."""

    def __init__(
        self,
        provider: OidcProvider,
        fetcher: Fetcher,
        clock: Clock,
        *,
        discovery_ttl: float,
        jwks_policy: CachePolicy | None,
        nonces: NonceStore,
    ) -> None:
        self.provider = provider
        self._fetcher = fetcher
        self._clock = clock
        self._ttl = discovery_ttl
        self._endpoints: tuple[Endpoints, float] | None = None
        config = provider.issuer_config()
        jwks = JwksCache(config, fetcher, clock, jwks_policy)
        self.validator = TokenValidator(config, jwks, clock, nonces=nonces)

    async def endpoints(self) -> Endpoints:
        now = self._clock()
        if self._endpoints is not None and 0 <= now - self._endpoints[1] < self._ttl:
            return self._endpoints[0]
        p = self.provider
        try:
            found = await self._fetcher.fetch(discovery_url(p.issuer))
        except Unavailable as exc:
            raise unreachable(p, exc) from None
        endpoints = parse_endpoints(found.body, issuer=p.issuer, insecure_http=p.insecure_http)
        self._endpoints = (endpoints, now)
        return endpoints

    def client_auth(self, endpoints: Endpoints) -> tuple[dict[str, str], dict[str, str]]:
        """Form fields and headers that authenticate this client at the token endpoint."""
        p = self.provider
        method = p.token_auth_method or next(
            (m for m in _AUTH_METHODS if m in endpoints.auth_methods), None
        )
        if method is None or method not in endpoints.auth_methods:
            raise Unavailable(f"identity provider {p.name} offers no client authentication we use")
        secret = p.client_secret.reveal()
        if method == "client_secret_post":
            return {"client_id": p.client_id, "client_secret": secret}, {}
        pair = f"{quote_plus(p.client_id)}:{quote_plus(secret)}".encode()
        return {}, {"Authorization": "Basic " + base64.b64encode(pair).decode()}


def unreachable(provider: OidcProvider, exc: Unavailable) -> Unavailable:
    """The error for an IdP that cannot be reached: new logins fail clearly."""
    return Unavailable(
        f"identity provider {provider.name} ({provider.issuer}) is unreachable: {exc.message}",
        code="idp_unavailable",
        hint="new logins fail until the identity provider answers; signed-in sessions go on",
    )


class OidcRelyingParty:
    """Sign-in with one or more OpenID Providers; state lives with the caller."""

    def __init__(
        self,
        providers: Iterable[OidcProvider],
        *,
        clock: Clock,
        sleep: Sleep = asyncio.sleep,
        fetcher: Fetcher | None = None,
        poster: FormPoster | None = None,
        nonces: NonceStore | None = None,
        discovery_ttl: float = 3600.0,
        jwks_policy: CachePolicy | None = None,
    ) -> None:
        fetcher = fetcher or AiohttpFetcher()
        self._clock, self._sleep = clock, sleep
        self._poster = poster or AiohttpPoster()
        nonces = nonces or NonceStore()
        self._issuers: dict[str, _Issuer] = {}
        for p in providers:
            if p.name in self._issuers:
                raise ConfigError(f"provider {p.name!r} configured twice")
            self._issuers[p.name] = _Issuer(
                p,
                fetcher,
                clock,
                discovery_ttl=discovery_ttl,
                jwks_policy=jwks_policy,
                nonces=nonces,
            )
        if not self._issuers:
            raise ConfigError("no OpenID provider configured")

    @property
    def providers(self) -> tuple[str, ...]:
        """The names of the configured providers, in configuration order."""
        return tuple(self._issuers)

    def _issuer(self, name: str) -> _Issuer:
        try:
            return self._issuers[name]
        except KeyError:
            raise Unauthorized(
                "login refused: unknown identity provider", code="unknown_provider"
            ) from None

    async def begin_login(self, provider: str) -> LoginStart:
        """A new browser login at ``provider``: send the browser to ``.url``, keep the rest."""
        issuer = self._issuer(provider)
        p, endpoints = issuer.provider, await issuer.endpoints()
        return new_login(
            p.name,
            authorization_endpoint=endpoints.authorization,
            client_id=p.client_id,
            redirect_uri=p.redirect_uri,
            scopes=p.scopes,
            now=self._clock(),
        )

    async def complete_login(
        self, provider: str, params: Mapping[str, str], expected: LoginStart
    ) -> Claims:
        """Check the redirect ``params``, redeem the code, validate the ID token."""
        issuer = self._issuer(provider)
        p = issuer.provider
        if expected.provider != p.name or expected.redirect_uri != p.redirect_uri:
            raise Unauthorized(
                "login refused: the login was started elsewhere", code="invalid_state"
            )
        endpoints = await issuer.endpoints()
        code = check_callback(
            params,
            expected,
            issuer=p.issuer,
            require_iss=endpoints.iss_parameter,
            now=self._clock(),
            max_age=p.login_ttl,
        )
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": p.redirect_uri}
        form["code_verifier"] = expected.code_verifier
        reply = await self._post(issuer, endpoints.token, form, endpoints)
        if reply.id_token is None:
            raise token_refusal(reply, p.issuer)
        claims = await issuer.validator.validate_id_token(
            reply.id_token, audience=p.client_id, nonce=expected.nonce
        )
        log.info("oidc login", provider=p.name, issuer=claims.issuer, subject=claims.subject)
        return claims

    async def _post(
        self, issuer: _Issuer, url: str, form: dict[str, str], endpoints: Endpoints
    ) -> TokenReply:
        status, body = await self._post_raw(issuer, url, form, endpoints)
        return parse_token_reply(status, body, issuer=issuer.provider.issuer)

    async def _post_raw(
        self, issuer: _Issuer, url: str, form: dict[str, str], endpoints: Endpoints
    ) -> tuple[int, bytes]:
        fields, headers = issuer.client_auth(endpoints)
        try:
            return await self._poster.post_form(url, {**form, **fields}, headers)
        except Unavailable as exc:
            raise unreachable(issuer.provider, exc) from None

    async def start_device_authorization(self, provider: str) -> DeviceAuthorization:
        """Start an RFC 8628 device authorization; show ``user_code`` and the URI."""
        issuer = self._issuer(provider)
        p, endpoints = issuer.provider, await issuer.endpoints()
        if endpoints.device_authorization is None:
            raise Unavailable(
                f"identity provider {p.name} offers no device authorization",
                code="device_flow_unsupported",
                hint="sign in with the browser instead",
            )
        form = {"scope": " ".join(p.scopes)}
        status, body = await self._post_raw(issuer, endpoints.device_authorization, form, endpoints)
        if status != 200:
            raise token_refusal(parse_token_reply(status, body, issuer=p.issuer), p.issuer)
        return parse_device_authorization(p.name, body, now=self._clock())

    async def poll_device_token(self, device: DeviceAuthorization) -> Claims:
        """Poll until the user approves (→ Claims), denies, or the code expires."""
        issuer = self._issuer(device.provider)
        p, endpoints = issuer.provider, await issuer.endpoints()
        form = {"grant_type": _DEVICE_GRANT, "device_code": device.device_code}
        interval = device.interval
        while True:
            await self._sleep(interval)
            if self._clock() >= device.expires_at:
                raise Unauthorized(
                    "login refused: the device code expired; start again", code="expired_token"
                )
            reply = await self._post(issuer, endpoints.token, dict(form), endpoints)
            if reply.id_token is not None:
                claims = await issuer.validator.validate_id_token(
                    reply.id_token, audience=p.client_id
                )
                log.info(
                    "oidc device login",
                    provider=p.name,
                    issuer=claims.issuer,
                    subject=claims.subject,
                )
                return claims
            interval = next_poll_interval(reply, interval, issuer=p.issuer)
