"""Kubernetes projected ServiceAccount tokens: validation, identity mapping, tag rules."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from identity import kube
from identity.claims import IssuerConfig
from identity.jwks import JwksCache
from identity.kube import (
    KubeConfig,
    KubeIdentity,
    KubeTokenValidator,
)
from identity.tokens import TokenValidator
from lab.tokenkit import T0, FakeClock, FakeFetcher, FakeIdP, idp_app, public_jwk, rsa_key, sign
from lab.tokenkit import self_signed as make_ca
from wiregate.errors import ConfigError, Unauthorized
from wiregate.model import Identity

CLUSTER = "https://kubernetes.default.svc.cluster.local"
GATEWAY = "wiregate"


def sa_claims(ns: str = "kube-system", sa: str = "wiregate-agent", **over: Any) -> dict[str, Any]:
    """Claims shaped like a kube-apiserver projected token (1.29+)."""
    base: dict[str, Any] = {
        "aud": [GATEWAY],
        "exp": T0 + 3600,
        "iat": T0,
        "nbf": T0,
        "iss": CLUSTER,
        "jti": "5d2b1c6e-0d1e-4a5e-9d65-3f5ad4b0e0a1",
        "sub": f"system:serviceaccount:{ns}:{sa}",
        "kubernetes.io": {
            "namespace": ns,
            "node": {"name": "node-1", "uid": "0a1b2c3d-0000-4000-8000-000000000001"},
            "pod": {"name": "agent-x7k2p", "uid": "0a1b2c3d-0000-4000-8000-000000000002"},
            "serviceaccount": {"name": sa, "uid": "0a1b2c3d-0000-4000-8000-000000000003"},
        },
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def make(**config: Any) -> KubeTokenValidator:
    idp = FakeIdP(issuer=CLUSTER, jwks_uri=CLUSTER + "/openid/v1/jwks")
    idp.keys.append(public_jwk(rsa_key(), "k1", "RS256", use="sig"))
    cfg = KubeConfig(CLUSTER, GATEWAY, **config)
    return KubeTokenValidator.create(cfg, FakeClock(), fetcher=FakeFetcher(idp))


async def test_projected_token_maps_to_identity() -> None:
    validator = make()
    workload = await validator.validate(sign(sa_claims()))
    assert workload == KubeIdentity(
        issuer=CLUSTER,
        namespace="kube-system",
        serviceaccount="wiregate-agent",
        serviceaccount_uid="0a1b2c3d-0000-4000-8000-000000000003",
        pod_name="agent-x7k2p",
        pod_uid="0a1b2c3d-0000-4000-8000-000000000002",
        node_name="node-1",
    )
    identity = workload.to_identity()
    assert identity == Identity(CLUSTER, "system:serviceaccount:kube-system:wiregate-agent")


async def test_each_service_account_is_its_own_identity() -> None:
    validator = make()
    other = await validator.validate(sign(sa_claims(sa="coredns")))
    assert other.to_identity() == Identity(CLUSTER, "system:serviceaccount:kube-system:coredns")
    app = await validator.validate(sign(sa_claims(ns="default", sa="default")))
    assert app.to_identity() == Identity(CLUSTER, "system:serviceaccount:default:default")


async def test_token_without_pod_or_node_binding() -> None:
    claims = sa_claims()
    info = claims["kubernetes.io"]
    del info["pod"], info["node"]
    workload = await make().validate(sign(claims))
    assert workload.pod_name is workload.node_name is None


@pytest.mark.parametrize(
    "over",
    [
        {"aud": [CLUSTER]},  # a token for the API server, not the gateway
        {"aud": [GATEWAY, "vault"]},  # an extra untrusted audience
        {"iss": "https://other-cluster.example.com"},
        {"iss": "kubernetes/serviceaccount", "exp": None},  # legacy Secret-based token
        {"exp": T0 + 366 * 86400},  # beyond the 48 h cap
        {"sub": "system:serviceaccount:default:default"},  # sub and claim disagree
        {"kubernetes.io": None},
        {"kubernetes.io": "kube-system"},
    ],
)
async def test_refused_tokens(over: dict[str, Any]) -> None:
    with pytest.raises(Unauthorized):
        await make().validate(sign(sa_claims(**over)))


@pytest.mark.parametrize(
    "info",
    [
        {"namespace": "Kube_System"},
        {"namespace": "a:b"},
        {"namespace": 5},
        {"serviceaccount": None},
        {"serviceaccount": {"name": "x"}},
        {"serviceaccount": {"name": "a:b", "uid": "1"}},
        {"serviceaccount": {"name": "x", "uid": "../1"}},
        {"pod": "agent"},
        {"node": {"name": "", "uid": "1"}},
    ],
)
async def test_malformed_kubernetes_claim_refused(info: dict[str, Any]) -> None:
    claims = sa_claims()
    claims["kubernetes.io"] = {**claims["kubernetes.io"], **info}
    with pytest.raises(Unauthorized):
        await make().validate(sign(claims))


async def test_lifetime_cap_boundary_and_configurable() -> None:
    edge = T0 + 48 * 3600 + 60
    await make().validate(sign(sa_claims(exp=edge)))
    with pytest.raises(Unauthorized):
        await make().validate(sign(sa_claims(exp=edge + 1)))
    await make(max_lifetime=366 * 86400.0).validate(sign(sa_claims(exp=T0 + 365 * 86400)))


async def refused_reason(token: str) -> str:
    with pytest.raises(Unauthorized) as info:
        await make().validate(token)
    assert info.value.code == "invalid_token"
    return info.value.message


async def test_lifetime_counted_from_iat_an_old_token_in_its_last_hour_refused() -> None:
    ten_years = 10 * 365 * 86400
    reason = await refused_reason(sign(sa_claims(iat=T0 - ten_years, nbf=None, exp=T0 + 3600)))
    assert "lifetime" in reason


async def test_lifetime_cap_from_iat_boundary() -> None:
    iat = T0 - 3600  # issued an hour ago, so exp stays well within now + cap
    edge = iat + 48 * 3600 + 60  # the cap plus the 60 s leeway
    await make().validate(sign(sa_claims(iat=iat, nbf=iat, exp=edge)))
    reason = await refused_reason(sign(sa_claims(iat=iat, nbf=iat, exp=edge + 1)))
    assert "lifetime" in reason


async def test_iat_missing_refused_under_a_lifetime_cap() -> None:
    assert "iat missing" in await refused_reason(sign(sa_claims(iat=None)))


async def test_iat_in_the_future_refused() -> None:
    await make().validate(sign(sa_claims(iat=T0 + 60)))
    assert "iat is in the future" in await refused_reason(sign(sa_claims(iat=T0 + 61)))
    reason = await refused_reason(sign(sa_claims(iat=T0 + 10 * 365 * 86400, exp=T0 + 3600)))
    assert "iat is in the future" in reason


async def test_cluster_issuer_over_https_with_a_ca_bundle(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    cert, key = make_ca(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await aiohttp_server(idp_app([public_jwk(rsa_key(), "k1")]), ssl=context)
    issuer = str(server.make_url("")).rstrip("/")
    cfg = KubeConfig(issuer, GATEWAY, ca_bundle=str(cert))
    workload = await KubeTokenValidator.create(cfg, FakeClock()).validate(
        sign(sa_claims(iss=issuer))
    )
    assert workload.to_identity().issuer == issuer


def test_config_errors() -> None:
    with pytest.raises(ConfigError):
        KubeConfig(CLUSTER, "")
    with pytest.raises(ConfigError):
        KubeConfig("http://10.0.0.1:6443", GATEWAY)
    other = IssuerConfig("https://other.example.com")
    validator = TokenValidator(
        other, JwksCache(other, FakeFetcher(FakeIdP()), FakeClock()), FakeClock()
    )
    with pytest.raises(ConfigError):
        KubeTokenValidator(KubeConfig(CLUSTER, GATEWAY), validator)


def test_exported_api() -> None:
    assert set(kube.__all__) == {
        "KubeConfig", "KubeIdentity", "KubeTokenValidator", "kube_identity",
    }  # fmt: skip
