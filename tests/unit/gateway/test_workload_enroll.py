"""Enrollment with a workload token: ``POST /api/v1/enroll`` with ``workload_token``.

Tokens come from the hand-rolled issuer of ``_tokenkit`` (allowed for unit
tests of the validator); the gateway is the real app on aiohttp's test client.
The Kubernetes-shaped test serves discovery + JWKS over HTTPS with a
self-signed CA, because a real kube-apiserver cannot run here.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from agent.gateway_client import (
    KUBERNETES_TOKEN_PATH,
    ControlClient,
    read_workload_token,
    workload_token_source,
)
from gateway.api.workload import build_verifier
from gateway.app import create_app
from gateway.appkeys import STORE, WORKLOAD
from identity.jwks import Fetched
from lab.api_client import RecordingBroker
from lab.fakes import new_key
from lab.tokenkit import (
    ISSUER,
    T0,
    FakeClock,
    FakeIdP,
    b64,
    hand_made,
    hs256,
    idp_app,
    public_jwk,
    public_key_forms,
    rsa_key,
    sign,
)
from lab.tokenkit import self_signed as make_ca
from wiregate.errors import ConfigError, Unavailable
from wiregate.model import Identity
from wiregate.settings import GatewaySettings, WorkloadIssuerSettings

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]
GATEWAY = "https://gw.example.com"
CLUSTER = "https://kubernetes.default.svc.cluster.local"
KUBE_AUD = "wiregate-gateway"
POLICY = f"""
groups:
  ci: {{issuer: "{ISSUER}", claim: sub, values: [ci-runner-7]}}
tag_rules:
  - {{group: ci, tags: [tag:ci]}}
  - {{issuer: "{ISSUER}", claim: repository, match: "acme/*", tags: [tag:acme]}}
  - {{issuer: "{CLUSTER}", claim: sub, match: "system:serviceaccount:wiregate:*",
     tags: [tag:node]}}
  - {{issuer: "{CLUSTER}", claim: kubernetes.io/node, values: [node-1], tags: [tag:node-1]}}
acls:
  - {{src: ["*"], dst: ["*"]}}
"""


def oidc_claims(now: float = T0, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISSUER, "sub": "ci-runner-7", "aud": GATEWAY,
                            "exp": int(now) + 300, "iat": int(now),
                            "repository": "acme/web"}  # fmt: skip
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def sa_claims(node: str = "node-1", **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": CLUSTER, "aud": [KUBE_AUD], "exp": T0 + 3600, "iat": T0, "nbf": T0,
        "sub": "system:serviceaccount:wiregate:wiregate-agent",
        "kubernetes.io": {
            "namespace": "wiregate",
            "node": {"name": node, "uid": "0a1b2c3d-0000-4000-8000-000000000001"},
            "pod": {"name": "agent-x7k2p", "uid": "0a1b2c3d-0000-4000-8000-000000000002"},
            "serviceaccount": {"name": "wiregate-agent",
                               "uid": "0a1b2c3d-0000-4000-8000-000000000003"},
        },
    }  # fmt: skip
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


class Issuers:
    """Discovery + JWKS of the CI issuer and the cluster, counting fetches."""

    def __init__(self) -> None:
        self.idps = [
            FakeIdP(keys=[public_jwk(rsa_key(), "k1", use="sig")]),
            FakeIdP(issuer=CLUSTER, jwks_uri=CLUSTER + "/openid/v1/jwks",
                    keys=[public_jwk(rsa_key(), "k1", "RS256")]),
        ]  # fmt: skip
        self.calls: list[str] = []
        self.delay = 0.0

    async def fetch(self, url: str) -> Fetched:
        self.calls.append(url)
        await asyncio.sleep(self.delay)
        for idp in self.idps:
            doc = idp.documents().get(url)
            if doc is not None:
                return doc
        raise Unavailable(f"fetching {url} failed: HTTP 404")

    def jwks_fetches(self) -> int:
        return sum(self.calls.count(idp.jwks_uri) for idp in self.idps)


ISSUER_SETTINGS = [
    WorkloadIssuerSettings(name="ci", issuer=ISSUER, tags=["tag:workload"]),
    WorkloadIssuerSettings(name="cluster", issuer=CLUSTER, kind="kubernetes", audience=KUBE_AUD),
]


def settings(tmp_path: Path, *, policy: bool = True, **kw: Any) -> GatewaySettings:
    policy_file = None
    if policy:
        policy_file = tmp_path / "policy.yaml"
        policy_file.write_text(POLICY)
    values: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "admin_socket": tmp_path / "gw.sock",
        "public_url": GATEWAY,
        "policy_file": policy_file,
        "workload_issuers": ISSUER_SETTINGS,
    }
    return GatewaySettings(**{**values, **kw})


class Gateway:
    def __init__(self, client: Client, issuers: Issuers, broker: RecordingBroker) -> None:
        self.client, self.issuers, self.broker = client, issuers, broker

    async def enroll(self, token: str, name: str = "node-1", **extra: Any) -> Any:
        body = {"workload_token": token, "public_key": new_key(), "name": name, **extra}
        return await self.client.post("/api/v1/enroll", json=body)

    async def audit(self) -> list[Any]:
        return await self.client.app[STORE].list_audit()


async def make_gateway(aiohttp_client: ClientFactory, cfg: GatewaySettings) -> Gateway:
    issuers, broker = Issuers(), RecordingBroker()
    app = create_app(cfg, broker_factory=lambda p: broker, clock=FakeClock())
    app[WORKLOAD] = build_verifier(cfg, FakeClock(), fetcher=lambda _source: issuers)
    return Gateway(await aiohttp_client(app), issuers, broker)


@pytest.fixture
async def gw(aiohttp_client: ClientFactory, tmp_path: Path) -> Gateway:
    return await make_gateway(aiohttp_client, settings(tmp_path))


# -- enrollment ------------------------------------------------------------------------


async def test_oidc_workload_token_enrolls_with_policy_tags(
    gw: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = sign(oidc_claims())
    resp = await gw.enroll(token, name="ci-7", endpoints=["192.0.2.7:51820"])
    assert resp.status == 201, await resp.text()
    data = await resp.json()
    assert data["token"] and data["device"]["name"] == "ci-7"
    record = await gw.client.app[STORE].get_device(data["device"]["id"])
    assert record.device.identity == Identity(ISSUER, "ci-runner-7")
    assert set(record.device.tags) == {"tag:workload", "tag:ci", "tag:acme"}
    assert record.device.groups == ("ci",)
    [entry] = [a for a in await gw.audit() if a.action == "device.enroll"]
    assert entry.actor == f"workload:{ISSUER}#ci-runner-7"
    assert entry.detail["issuer_name"] == "ci" and entry.detail["kind"] == "oidc"
    stored = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir())
    assert token.encode() not in stored and token.split(".")[2].encode() not in stored
    assert token.split(".")[2] not in "".join(capsys.readouterr())


async def test_kubernetes_token_maps_serviceaccount_and_node_to_tags(gw: Gateway) -> None:
    resp = await gw.enroll(sign(sa_claims()), name="node-1")
    assert resp.status == 201, await resp.text()
    record = await gw.client.app[STORE].get_device((await resp.json())["device"]["id"])
    assert record.device.identity.subject == "system:serviceaccount:wiregate:wiregate-agent"
    assert set(record.device.tags) == {"tag:node", "tag:node-1"}
    other = await gw.enroll(sign(sa_claims(node="node-2")), name="node-2")
    assert other.status == 201
    record2 = await gw.client.app[STORE].get_device((await other.json())["device"]["id"])
    assert set(record2.device.tags) == {"tag:node"}
    [entry, _] = [a for a in await gw.audit() if a.action == "device.enroll"]
    assert entry.detail["node"] in ("node-1", "node-2") and entry.detail["kind"] == "kubernetes"


async def test_kubernetes_token_bound_to_another_node_is_refused(gw: Gateway) -> None:
    resp = await gw.enroll(sign(sa_claims(node="node-1")), name="node-2")
    assert resp.status == 403
    body = await resp.json()
    assert body["error"] == "node_mismatch" and "node-1" in body["message"]
    assert await gw.client.app[STORE].list_devices() == []


async def test_reenrollment_replaces_only_the_same_identity_and_name(gw: Gateway) -> None:
    first = await (await gw.enroll(sign(sa_claims()), name="node-1")).json()
    ci = await (await gw.enroll(sign(oidc_claims()), name="node-1x")).json()
    again = await gw.enroll(sign(sa_claims()), name="node-1")  # reinstalled: a new key
    assert again.status == 201, await again.text()
    second = await again.json()
    ids = {r.device.id for r in await gw.client.app[STORE].list_devices()}
    assert ids == {second["device"]["id"], ci["device"]["id"]}
    assert ("remove", first["device"]["id"]) in [e[:2] for e in gw.broker.events]
    [replace] = [a for a in await gw.audit() if a.action == "device.replace"]
    assert replace.target == first["device"]["id"]
    assert replace.actor == f"workload:{CLUSTER}#system:serviceaccount:wiregate:wiregate-agent"
    # the same name from another identity is a new device, not a replacement
    other = await gw.enroll(sign(oidc_claims(sub="ci-runner-8")), name="node-1x")
    assert other.status == 201
    assert len(await gw.client.app[STORE].list_devices()) == 3


async def test_without_a_policy_file_the_issuer_tags_apply(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    gw = await make_gateway(aiohttp_client, settings(tmp_path, policy=False))
    resp = await gw.enroll(sign(oidc_claims()), name="ci-7")
    assert resp.status == 201
    record = await gw.client.app[STORE].get_device((await resp.json())["device"]["id"])
    assert record.device.tags == ("tag:workload",)


# -- refusals (SECURITY.md "Tokens") ----------------------------------------------------

FORMS = public_key_forms()
PEM = FORMS["pem"]
HEADER = {"alg": "RS256", "kid": "k1"}
REFUSED: list[tuple[str, Callable[[], str], str]] = [
    ("alg none", lambda: hand_made({"alg": "none", "kid": "k1"}, oidc_claims()), "unsigned"),
    ("alg NoNe", lambda: hand_made({"alg": "NoNe", "kid": "k1"}, oidc_claims(), b"x"), "unsigned"),
    ("HS256 with the public key", lambda: hs256({"alg": "HS256", "kid": "k1"}, oidc_claims(), PEM),
     "symmetric"),
    ("stripped signature", lambda: sign(oidc_claims()).rsplit(".", 1)[0] + ".", "unsigned"),
    ("wrong audience", lambda: sign(oidc_claims(aud="https://other.example.com")), "aud"),
    ("audience of the cluster token", lambda: sign(oidc_claims(aud=KUBE_AUD)), "aud"),
    ("expired", lambda: sign(oidc_claims(now=T0 - 3600)), "expired"),
    ("not yet valid", lambda: sign(oidc_claims(nbf=T0 + 3600)), "nbf"),
    ("too long-lived", lambda: sign(oidc_claims(exp=T0 + 30 * 86400)), "too far"),
    ("unknown issuer", lambda: sign(oidc_claims(iss="https://evil.example.com")),
     "trusted workload issuer"),
    ("issuer with a trailing slash", lambda: sign(oidc_claims(iss=ISSUER + "/")),
     "trusted workload issuer"),
    ("issuer in upper case", lambda: sign(oidc_claims(iss=ISSUER.upper())),
     "trusted workload issuer"),
    ("issuer over http", lambda: sign(oidc_claims(iss=ISSUER.replace("https", "http"))),
     "trusted workload issuer"),
    ("no issuer", lambda: sign(oidc_claims(iss=None)), "iss missing"),
    ("bad signature", lambda: sign(oidc_claims(), key=rsa_key(7)), "bad signature"),
    ("tampered payload", lambda: _tamper(sign(oidc_claims())), "bad signature"),
    ("jku header", lambda: sign(oidc_claims(), headers={"jku": "https://evil.example/k"}), "jku"),
    ("x5u header", lambda: sign(oidc_claims(), headers={"x5u": "https://evil.example/c"}), "x5u"),
    ("embedded jwk", lambda: sign(oidc_claims(key=None), key=rsa_key(7),
                                  headers={"jwk": public_jwk(rsa_key(7), "k1")}), "jwk"),
    ("logout token", lambda: sign(oidc_claims(), headers={"typ": "logout+jwt"}), "logout"),
    ("unknown kid", lambda: sign(oidc_claims(), kid="nope"), "unknown key id"),
    ("not a JWT", lambda: "not-a-token", "compact JWS"),
    ("alg None", lambda: hand_made({"alg": "None", "kid": "k1"}, oidc_claims(), b"x"), "unsigned"),
    ("HS256 with the SSH public key",
     lambda: hs256({"alg": "HS256", "kid": "k1"}, oidc_claims(), FORMS["ssh"]), "symmetric"),
    ("HS256 with the JWK JSON",
     lambda: hs256({"alg": "HS256", "kid": "k1"}, oidc_claims(), FORMS["jwk"]), "symmetric"),
    ("huge kid", lambda: sign(oidc_claims(), kid="k" * 500), "kid"),
    ("path-like kid", lambda: sign(oidc_claims(), kid="../../etc/passwd"), "kid"),
    ("non-string kid", lambda: hand_made({"alg": "RS256", "kid": 7}, oidc_claims(), b"x"), "kid"),
    ("another tenant", lambda: sign(oidc_claims(iss=ISSUER.replace("tenant-a", "tenant-b"))),
     "trusted workload issuer"),
    ("no audience", lambda: sign(oidc_claims(aud=None)), "aud"),
    ("an extra untrusted audience", lambda: sign(oidc_claims(aud=[GATEWAY, "other"], azp=GATEWAY)),
     "untrusted audience"),
    ("azp of another client", lambda: sign(oidc_claims(azp="someone-else")), "azp"),
    ("no exp", lambda: sign(oidc_claims(exp=None)), "exp and iat are required"),
    ("exp not a number", lambda: sign(oidc_claims(exp="tomorrow")), "not a number"),
    ("huge exp", lambda: sign(oidc_claims(exp=2**53)), "out of range"),
    ("iat far in the future", lambda: sign(oidc_claims(iat=T0 + 3600)), "iat"),
    ("expired just past the leeway", lambda: sign(oidc_claims(exp=T0 - 60)), "expired"),
    ("a cluster token typed as an access token",
     lambda: sign(sa_claims(), headers={"typ": "at+jwt"}), "access token"),
    ("cluster token for another audience", lambda: sign(sa_claims(aud=["api"])), "aud"),
    ("cluster token with a forged sub", lambda: sign(sa_claims(sub="system:serviceaccount:x:y")),
     "sub does not match"),
]  # fmt: skip


def _tamper(token: str) -> str:
    header, _payload, signature = token.split(".")
    return f"{header}.{b64(oidc_claims(sub='admin'))}.{signature}"


@pytest.mark.parametrize(("case", "make", "reason"), REFUSED, ids=[c[0] for c in REFUSED])
async def test_refused_tokens_say_why_and_change_nothing(
    gw: Gateway, case: str, make: Callable[[], str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    token = make()
    version = await gw.client.app[STORE].map_version()  # the policy file's, stored at start
    resp = await gw.enroll(token, name="node-1")
    text = await resp.text()
    assert resp.status == 401, text
    body = json.loads(text)
    assert body["error"] == "invalid_token" and reason in body["message"], body
    signature = token.split(".")[-1]
    logged = capsys.readouterr()
    for seen in (text, logged.out, logged.err):  # never echoed, never logged
        assert token not in seen and (len(signature) < 16 or signature not in seen)
    assert await gw.client.app[STORE].list_devices() == []
    assert await gw.client.app[STORE].map_version() == version
    if reason == "trusted workload issuer":  # refused before any network traffic
        assert gw.issuers.calls == []


async def test_leeway_boundary_and_the_issuers_own_access_tokens(gw: Gateway) -> None:
    inside = await gw.enroll(sign(oidc_claims(exp=T0 - 59)), name="late")
    assert inside.status == 201, await inside.text()  # within the 60 s leeway
    typed = await gw.enroll(sign(oidc_claims(), headers={"typ": "at+jwt"}), name="rfc9068")
    assert typed.status == 201, await typed.text()  # RFC 9068, for kind = "oidc" only


async def test_discovery_naming_another_issuer_is_refused(gw: Gateway) -> None:
    gw.issuers.idps[0].discovery_issuer = "https://evil.example.com"
    resp = await gw.enroll(sign(oidc_claims()), name="ci")
    assert resp.status == 503
    assert (await resp.json())["error"] == "issuer_mismatch"
    assert await gw.client.app[STORE].list_devices() == []


async def test_unknown_kid_flood_costs_one_jwks_fetch(gw: Gateway) -> None:
    for i in range(40):
        resp = await gw.enroll(sign(oidc_claims(), kid=f"flood-{i}"))
        assert resp.status == 401
    assert gw.issuers.jwks_fetches() == 1  # then the cool-down: no fetch per request


async def test_concurrent_first_enrollments_share_one_fetch(gw: Gateway) -> None:
    gw.issuers.delay = 0.2  # the cold cache's fetch is in flight while others arrive
    names = [f"node-{i}" for i in range(5)]
    tokens = [sign(sa_claims(node=name)) for name in names]
    pairs = zip(tokens, names, strict=True)
    answers = await asyncio.gather(*(gw.enroll(t, name=n) for t, n in pairs))
    assert [a.status for a in answers] == [201] * 5, [await a.text() for a in answers]
    assert gw.issuers.jwks_fetches() == 1


async def test_exactly_one_credential(gw: Gateway) -> None:
    body = {"public_key": new_key(), "name": "vm-1"}
    for extra in ({}, {"auth_key": "wgk_x", "workload_token": sign(oidc_claims())}):
        resp = await gw.client.post("/api/v1/enroll", json={**body, **extra})
        assert resp.status == 400
        assert "exactly one of auth_key and workload_token" in await resp.text()
    resp = await gw.client.post("/api/v1/enroll", json={**body, "workload_token": "a" * 20000})
    assert resp.status in (400, 413) and "a" * 100 not in await resp.text()


async def test_no_trusted_issuer_configured(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    gw = await make_gateway(aiohttp_client, settings(tmp_path, workload_issuers=[]))
    resp = await gw.enroll(sign(oidc_claims()))
    assert resp.status == 401
    assert "trusts no workload issuer" in (await resp.json())["message"]


def test_issuer_configuration_is_checked(tmp_path: Path) -> None:
    bad = [
        {"name": "a", "issuer": ISSUER, "algorithms": ["HS256"]},
        {"name": "a", "issuer": "http://idp.example.com"},
        {"name": "a", "issuer": ISSUER, "tags": ["vm"]},
        {"name": "a", "issuer": ISSUER, "ca_bundle": str(tmp_path / "missing.pem")},
    ]
    for entry in bad:
        cfg = settings(tmp_path, workload_issuers=[WorkloadIssuerSettings(**entry)])
        with pytest.raises(ConfigError):
            create_app(cfg)
    only = [WorkloadIssuerSettings(name="a", issuer=ISSUER)]
    no_audience = settings(tmp_path, public_url="", workload_issuers=only)
    with pytest.raises(ConfigError, match="no audience"):
        create_app(no_audience)
    twice = [WorkloadIssuerSettings(name="a", issuer=ISSUER)] * 2
    with pytest.raises(ConfigError, match="twice"):
        create_app(settings(tmp_path, workload_issuers=twice))


# -- a Kubernetes-shaped issuer over HTTPS with its own CA ------------------------------


async def test_kubernetes_issuer_over_https_with_a_cluster_ca(
    aiohttp_client: ClientFactory, aiohttp_server: Any, tmp_path: Path
) -> None:
    cert, key = make_ca(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await aiohttp_server(idp_app([public_jwk(rsa_key(), "k1", "RS256")]), ssl=context)
    issuer = str(server.make_url("")).rstrip("/")
    cluster = WorkloadIssuerSettings(name="cluster", issuer=issuer, kind="kubernetes",
                                     audience=KUBE_AUD, ca_bundle=cert)  # fmt: skip
    policy = tmp_path / "cluster-policy.yaml"
    policy.write_text(
        f'tag_rules:\n  - {{issuer: "{issuer}", claim: kubernetes.io/namespace,'
        " values: [wiregate], tags: [tag:k8s]}\n"
    )
    cfg = settings(tmp_path, workload_issuers=[cluster], policy_file=policy)
    client = await aiohttp_client(create_app(cfg))  # the real clock, the real HTTPS fetcher
    now = time.time()
    token = sign(sa_claims(iss=issuer, exp=int(now) + 600, iat=int(now), nbf=int(now)))
    body = {"workload_token": token, "public_key": new_key(), "name": "node-1"}
    resp = await client.post("/api/v1/enroll", json=body)
    assert resp.status == 201, await resp.text()
    record = await client.app[STORE].get_device((await resp.json())["device"]["id"])
    assert record.device.identity.issuer == issuer
    assert record.device.tags == ("tag:k8s",)
    # without the cluster CA the issuer's keys cannot be fetched: 503, nothing enrolled
    (tmp_path / "b").mkdir()
    no_ca = cluster.model_copy(update={"ca_bundle": None})
    untrusted = settings(tmp_path / "b", workload_issuers=[no_ca])
    other = await aiohttp_client(create_app(untrusted))
    resp = await other.post("/api/v1/enroll", json={**body, "public_key": new_key()})
    assert resp.status == 503 and token not in await resp.text()


# -- the agent side --------------------------------------------------------------------


def test_agent_token_source(tmp_path: Path) -> None:
    assert workload_token_source("", kubernetes=False, auth_key="file:/k") is None
    assert (
        workload_token_source("", kubernetes=True, auth_key="") == "file:" + KUBERNETES_TOKEN_PATH
    )
    assert workload_token_source("", kubernetes=True, auth_key="file:/k") is None
    assert workload_token_source("file:/t", kubernetes=False, auth_key="file:/k") == "file:/t"
    for bad in ("env:TOKEN", "file:", "eyJhbGciOi"):
        with pytest.raises(ConfigError, match="file:PATH"):
            workload_token_source(bad, kubernetes=False, auth_key="")
    path = tmp_path / "token"
    path.write_text("first\n")
    assert read_workload_token(f"file:{path}") == "first"
    path.write_text("rotated\n")  # the kubelet rotated it: the next attempt reads the new one
    assert read_workload_token(f"file:{path}") == "rotated"
    path.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_workload_token(f"file:{path}")
    with pytest.raises(ConfigError, match="cannot read"):
        read_workload_token(f"file:{tmp_path / 'missing'}")


async def test_control_client_enrolls_with_a_workload_token(gw: Gateway) -> None:
    control = ControlClient(str(gw.client.make_url("")), gw.client.session)
    enrollment = await control.enroll(
        "", new_key(), "node-1", [], [], workload_token=sign(sa_claims())
    )
    assert enrollment.name == "node-1" and enrollment.token
