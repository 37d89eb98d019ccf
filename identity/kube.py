"""Kubernetes projected ServiceAccount tokens: validation and identity mapping.

A pod mounts a token with ``audience`` = the gateway (a projected
``serviceAccountToken`` volume). The gateway verifies it like an ID token
(:class:`~identity.tokens.TokenValidator`) against the cluster issuer's
discovery document and JWKS (optionally through a CA bundle), with no nonce,
then reads the ``kubernetes.io`` claim::

    {"namespace": "kube-system",
     "serviceaccount": {"name": "wiregate-agent", "uid": "..."},
     "pod": {"name": "...", "uid": "..."}, "node": {"name": "...", "uid": "..."}}

:func:`kube_identity` insists ``sub`` is ``system:serviceaccount:NS:NAME`` for
that namespace and name. The mapping to an :class:`~wiregate.model.Identity` is pure; tags come
from the workload issuer's claim rules (:mod:`identity.workload`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from identity.claims import Claims, IssuerConfig, refuse
from identity.jwks import AiohttpFetcher, CachePolicy, Fetcher, JwksCache
from identity.tokens import TokenValidator
from wiregate.clock import Clock
from wiregate.errors import ConfigError
from wiregate.model import Identity

__all__ = [
    "KubeConfig",
    "KubeIdentity",
    "KubeTokenValidator",
    "kube_identity",
]

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # namespace: DNS-1123 label
_SUBDOMAIN = re.compile(r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9.]*[a-z0-9])?")  # object names
_UID = re.compile(r"[A-Za-z0-9-]{1,64}")


@dataclass(frozen=True, slots=True)
class KubeIdentity:
    """A workload as its ServiceAccount token names it."""

    issuer: str
    namespace: str
    serviceaccount: str
    serviceaccount_uid: str
    pod_name: str | None = None
    pod_uid: str | None = None
    node_name: str | None = None

    @property
    def subject(self) -> str:
        """``system:serviceaccount:NS:NAME``, the token's ``sub``."""
        return f"system:serviceaccount:{self.namespace}:{self.serviceaccount}"

    def to_identity(self) -> Identity:
        """``Identity(issuer, "system:serviceaccount:NS:NAME")``."""
        return Identity(self.issuer, self.subject)


def kube_identity(claims: Claims) -> KubeIdentity:
    """The workload named by a verified ServiceAccount token; refuse if inconsistent."""
    info = claims.raw.get("kubernetes.io")
    if not isinstance(info, Mapping):
        raise refuse("not a ServiceAccount token (no kubernetes.io claim)")
    namespace = info.get("namespace")
    if not isinstance(namespace, str) or not _LABEL.fullmatch(namespace):
        raise refuse("kubernetes.io namespace malformed")
    account = _object_ref(info, "serviceaccount")
    if account is None:
        raise refuse("kubernetes.io serviceaccount missing")
    pod = _object_ref(info, "pod") or (None, None)
    node = _object_ref(info, "node") or (None, None)
    workload = KubeIdentity(
        issuer=claims.issuer,
        namespace=namespace,
        serviceaccount=account[0],
        serviceaccount_uid=account[1],
        pod_name=pod[0],
        pod_uid=pod[1],
        node_name=node[0],
    )
    if claims.subject != workload.subject:
        raise refuse("sub does not match the kubernetes.io claim")
    return workload


def _object_ref(info: Mapping[str, Any], field: str) -> tuple[str, str] | None:
    ref = info.get(field)
    if ref is None:
        return None
    if not isinstance(ref, Mapping):
        raise refuse(f"kubernetes.io {field} malformed")
    name, uid = ref.get("name"), ref.get("uid")
    if not isinstance(name, str) or not _SUBDOMAIN.fullmatch(name):
        raise refuse(f"kubernetes.io {field} name malformed")
    if not isinstance(uid, str) or not _UID.fullmatch(uid):
        raise refuse(f"kubernetes.io {field} uid malformed")
    return name, uid


@dataclass(frozen=True, slots=True)
class KubeConfig:
    """A cluster issuer trusted for ServiceAccount tokens whose audience is the gateway.

    ``max_lifetime`` bounds the lifetime ``exp - iat`` and ``exp`` (kube-apiserver
    caps projected tokens at 48 h by default); ``ca_bundle`` verifies the
    discovery and JWKS fetch.
    """

    issuer: str
    audience: str
    ca_bundle: str | None = None
    algorithms: tuple[str, ...] = ("RS256",)
    max_lifetime: float = 48 * 3600.0
    insecure_http: bool = False

    def __post_init__(self) -> None:
        if not self.audience:
            raise ConfigError("kube: the audience (the gateway's name in tokens) is required")
        self.issuer_config()  # the issuer URL, algorithms and lifetime cap, checked on load

    def issuer_config(self) -> IssuerConfig:
        """The :class:`IssuerConfig` for the cluster issuer."""
        return IssuerConfig(
            issuer=self.issuer,
            algorithms=self.algorithms,
            max_lifetime=self.max_lifetime,
            insecure_http=self.insecure_http,
        )


class KubeTokenValidator:
    """Validates ServiceAccount tokens of one cluster and maps them to identities."""

    def __init__(self, config: KubeConfig, validator: TokenValidator) -> None:
        if validator.config.issuer != config.issuer:
            raise ConfigError(f"kube: validator is for {validator.config.issuer}")
        self.config = config
        self._validator = validator

    @classmethod
    def create(
        cls,
        config: KubeConfig,
        clock: Clock,
        *,
        fetcher: Fetcher | None = None,
        policy: CachePolicy | None = None,
    ) -> KubeTokenValidator:
        """A validator with its own JWKS cache (aiohttp, with the CA bundle, by default)."""
        issuer = config.issuer_config()
        fetcher = fetcher or AiohttpFetcher(ca_bundle=config.ca_bundle)
        jwks = JwksCache(issuer, fetcher, clock, policy)
        return cls(config, TokenValidator(issuer, jwks, clock))

    async def validate(self, token: str, *, now: float | None = None) -> KubeIdentity:
        """The workload named by ``token``; Unauthorized or Unavailable otherwise."""
        claims = await self._validator.validate_id_token(
            token, audience=self.config.audience, now=now
        )
        return kube_identity(claims)
