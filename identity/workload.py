"""Workload identity: enrollment with a token from a trusted workload issuer.

A machine proves who it is with a short-lived token its platform mints for it,
audience = the gateway, instead of a long-lived enrollment secret:

- ``kind = "kubernetes"``: a projected ServiceAccount token, verified by
  :class:`~identity.kube.KubeTokenValidator` against the cluster issuer's
  discovery document and JWKS (through the cluster CA bundle);
- ``kind = "oidc"``: an OIDC token of a workload issuer (a CI system, a cloud's
  instance identity, another cluster, an IdP's ``client_credentials`` grant):
  an ID-token-shaped JWT (``typ`` absent or ``JWT``) or an RFC 9068 JWT access
  token (``typ: at+jwt``), verified by :class:`~identity.tokens.TokenValidator`.

Both end as :class:`VerifiedWorkload`: identity = (``iss``, ``sub``), the
verified claims for the policy file's ``groups`` and ``tag_rules``, and for
Kubernetes the workload's namespace, ServiceAccount, pod and node, flattened
into claims named ``kubernetes.io/namespace``, ``kubernetes.io/serviceaccount``,
``kubernetes.io/pod`` and ``kubernetes.io/node`` so that tag rules can match them.

The issuer is chosen by the token's ``iss`` read *before* verification (it only
selects which configured issuer verifies it; an unknown ``iss`` is refused
before any fetch). Tokens are never logged and never echoed in refusals.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal

from identity.claims import Claims, IssuerConfig, loads_strict, refuse
from identity.jwks import AiohttpFetcher, CachePolicy, Fetcher, JwksCache
from identity.kube import KubeConfig, KubeIdentity, KubeTokenValidator, kube_identity
from identity.policy_file import PolicyFile
from identity.principals import Grant, enrollment_grant
from identity.tokens import MAX_TOKEN_CHARS, TokenValidator
from wiregate.clock import Clock
from wiregate.errors import ConfigError
from wiregate.model import Identity

__all__ = [
    "ACCESS_TOKEN_TYPES",
    "VerifiedWorkload",
    "WorkloadIssuer",
    "WorkloadVerifier",
    "kube_claims",
    "token_issuer",
    "workload_actor",
    "workload_grant",
]

Kind = Literal["kubernetes", "oidc"]
FetcherFactory = Callable[["WorkloadIssuer"], Fetcher]
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})  # RFC 9068


@dataclass(frozen=True, slots=True)
class WorkloadIssuer:
    """One trusted workload issuer (``[[gateway.workload_issuers]]``, resolved)."""

    name: str
    kind: Kind
    issuer: IssuerConfig
    audience: str
    ca_bundle: str | None = None
    tags: tuple[str, ...] = ()
    token_file: str | None = None  # bearer token for the discovery and JWKS fetches (https)

    def __post_init__(self) -> None:
        if not self.audience:
            raise ConfigError(
                f"workload issuer {self.name!r}: no audience",
                hint="set its audience, or the gateway's public_url (the default audience)",
            )


@dataclass(frozen=True, slots=True)
class VerifiedWorkload:
    """A workload whose token verified: who it is and what the policy may match."""

    source: WorkloadIssuer
    claims: Claims
    kube: KubeIdentity | None = None

    @property
    def identity(self) -> Identity:
        """``Identity(iss, sub)``."""
        return self.claims.identity

    @property
    def node_name(self) -> str | None:
        """The node a Kubernetes token is bound to (its pod's node), if any."""
        return None if self.kube is None else self.kube.node_name


def workload_actor(identity: Identity) -> str:
    """The audit actor of a workload: ``workload:<iss>#<sub>``."""
    return f"workload:{identity.issuer}#{identity.subject}"


def token_issuer(token: object) -> str:
    """The unverified ``iss`` of a compact JWS: only to pick the issuer that verifies it."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
        raise refuse("not a compact JWS of acceptable size")
    segment = token.split(".")[1]
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise refuse("payload is not base64url") from None
    iss = loads_strict(raw, "payload", refuse).get("iss")
    if not isinstance(iss, str) or not iss:
        raise refuse("iss missing")
    return iss


def kube_claims(claims: Claims, workload: KubeIdentity) -> Claims:
    """``claims`` plus the workload's fields as flat ``kubernetes.io/*`` claims."""
    flat = {
        "kubernetes.io/namespace": workload.namespace,
        "kubernetes.io/serviceaccount": workload.serviceaccount,
        "kubernetes.io/pod": workload.pod_name,
        "kubernetes.io/node": workload.node_name,
    }
    raw = {**claims.raw, **{k: v for k, v in flat.items() if v is not None}}
    return replace(claims, raw=MappingProxyType(raw))


def workload_grant(policy: PolicyFile, workload: VerifiedWorkload) -> Grant:
    """Tags and groups of ``workload``: the issuer's own ``tags`` plus the policy's rules."""
    return enrollment_grant(policy, workload.claims, workload.source.tags)


class _Verifier:
    """Verifies the tokens of one workload issuer."""

    def __init__(self, source: WorkloadIssuer, fetcher: Fetcher, clock: Clock,
                 policy: CachePolicy | None) -> None:  # fmt: skip
        self.source = source
        jwks = JwksCache(source.issuer, fetcher, clock, policy)
        types = frozenset() if source.kind == "kubernetes" else ACCESS_TOKEN_TYPES
        self._tokens = TokenValidator(source.issuer, jwks, clock, extra_types=types)
        self._kube: KubeTokenValidator | None = None
        if source.kind == "kubernetes":
            cfg = source.issuer
            config = KubeConfig(cfg.issuer, source.audience, source.ca_bundle, cfg.algorithms,
                                cfg.max_lifetime, insecure_http=cfg.insecure_http)  # fmt: skip
            self._kube = KubeTokenValidator(config, self._tokens)

    async def verify(self, token: str) -> VerifiedWorkload:
        claims = await self._tokens.validate_id_token(token, audience=self.source.audience)
        if self._kube is None:
            return VerifiedWorkload(self.source, claims)
        workload = kube_identity(claims)
        return VerifiedWorkload(self.source, kube_claims(claims, workload), workload)


class WorkloadVerifier:
    """The gateway's trusted workload issuers, each with its own JWKS cache."""

    def __init__(
        self,
        issuers: Iterable[WorkloadIssuer],
        clock: Clock,
        *,
        fetcher: FetcherFactory | None = None,
        policy: CachePolicy | None = None,
    ) -> None:
        make = fetcher or _aiohttp_fetcher
        self._by_issuer: dict[str, _Verifier] = {}
        for source in issuers:
            if source.issuer.issuer in self._by_issuer:
                raise ConfigError(f"workload issuer {source.issuer.issuer} is configured twice")
            if source.name in (v.source.name for v in self._by_issuer.values()):
                raise ConfigError(f"workload issuer name {source.name!r} is used twice")
            self._by_issuer[source.issuer.issuer] = _Verifier(source, make(source), clock, policy)

    @property
    def issuers(self) -> Sequence[WorkloadIssuer]:
        """The configured issuers, in configuration order."""
        return [v.source for v in self._by_issuer.values()]

    def __bool__(self) -> bool:
        return bool(self._by_issuer)

    async def verify(self, token: str) -> VerifiedWorkload:
        """The verified workload of ``token``; Unauthorized (or Unavailable: no keys)."""
        verifier = self._by_issuer.get(token_issuer(token))
        if verifier is None:
            raise refuse("not issued by a trusted workload issuer")
        return await verifier.verify(token)


def _aiohttp_fetcher(source: WorkloadIssuer) -> Fetcher:
    return AiohttpFetcher(ca_bundle=source.ca_bundle, bearer_file=source.token_file)
