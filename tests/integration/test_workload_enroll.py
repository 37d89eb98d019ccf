"""Workload enrollment with a token minted by a real OpenID Provider.

panva's oidc-provider (tests/idp) issues an RFC 9068 JWT access token to the
client ``wiregate-workload`` by the ``client_credentials`` grant, audience =
the gateway (its resource indicator); the gateway (the real app, in process)
verifies it against the provider's discovery document and JWKS and enrolls a
device with the tags of the policy file's tag_rules.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from agent.gateway_client import ControlClient, read_workload_token, workload_token_source
from gateway.app import create_app
from gateway.appkeys import STORE
from lab.fakes import new_key
from lab.idp import RunningIdp
from wiregate.model import Identity
from wiregate.settings import GatewaySettings, WorkloadIssuerSettings

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]
AUDIENCE = "https://gateway.wiregate.test"  # the provider's resource for wiregate-workload
CLIENT, SECRET = "wiregate-workload", "wiregate-test-secret-workload"


async def mint(idp: RunningIdp, *, resource: str = AUDIENCE) -> tuple[int, dict[str, Any]]:
    """A client_credentials token request at the provider's token endpoint."""
    form = {"grant_type": "client_credentials", "scope": "wiregate:enroll", "resource": resource}
    basic = base64.b64encode(f"{CLIENT}:{SECRET}".encode()).decode()
    headers = {"Authorization": f"Basic {basic}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(idp.issuer + "/token", data=form, headers=headers) as r,
    ):
        return r.status, await r.json()


def gateway_settings(tmp_path: Path, idp: RunningIdp, audience: str = AUDIENCE) -> GatewaySettings:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "tag_rules:\n"
        f'  - {{issuer: "{idp.issuer}", claim: client_id, values: [{CLIENT}], tags: [tag:ci]}}\n'
        f'  - {{issuer: "{idp.issuer}", claim: scope, match: "*enroll*", tags: [tag:enroll]}}\n'
    )
    issuer = WorkloadIssuerSettings(
        name="test-idp", issuer=idp.issuer, audience=audience, insecure_http=True
    )
    return GatewaySettings(
        state_dir=tmp_path / "state",
        admin_socket=tmp_path / "gw.sock",
        policy_file=policy,
        workload_issuers=[issuer],
    )


async def test_token_from_the_real_provider_enrolls_a_device(
    idp: RunningIdp, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    status, minted = await mint(idp)
    assert status == 200, minted
    token = minted["access_token"]
    token_file = tmp_path / "workload-token"
    token_file.write_text(token + "\n")
    client = await aiohttp_client(create_app(gateway_settings(tmp_path, idp)))
    # the agent's path: file:PATH, read at the attempt, sent as workload_token
    source = workload_token_source(f"file:{token_file}", kubernetes=False, auth_key="")
    assert source is not None
    control = ControlClient(str(client.make_url("")), client.session)
    enrollment = await control.enroll(
        "", new_key(), "ci-runner", [], [], workload_token=read_workload_token(source)
    )
    record = await client.app[STORE].get_device(enrollment.device_id)
    assert record.device.identity == Identity(idp.issuer, CLIENT)  # sub = client_id (RFC 9068)
    assert record.device.tags == ("tag:ci", "tag:enroll")
    [entry] = [a for a in await client.app[STORE].list_audit() if a.action == "device.enroll"]
    assert entry.actor == f"workload:{idp.issuer}#{CLIENT}"


async def test_the_real_providers_token_for_another_audience_is_refused(
    idp: RunningIdp, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    _status, minted = await mint(idp)
    settings = gateway_settings(tmp_path, idp, audience="https://other-gateway.test")
    client = await aiohttp_client(create_app(settings))
    body = {"workload_token": minted["access_token"], "public_key": new_key(), "name": "ci"}
    resp = await client.post("/api/v1/enroll", json=body)
    assert resp.status == 401
    assert "aud" in (await resp.json())["message"]
    assert await client.app[STORE].list_devices() == []


async def test_the_provider_mints_for_the_gateway_only(idp: RunningIdp) -> None:
    status, body = await mint(idp, resource="https://elsewhere.example")
    assert status == 400 and body["error"] == "invalid_target"


@pytest.mark.parametrize("tamper", ["payload", "signature"])
async def test_a_tampered_provider_token_is_refused(
    idp: RunningIdp, aiohttp_client: ClientFactory, tmp_path: Path, tamper: str
) -> None:
    _status, minted = await mint(idp)
    header, payload, signature = minted["access_token"].split(".")
    if tamper == "payload":
        payload = payload[:-4] + ("AAAA" if payload[-4:] != "AAAA" else "BBBB")
    else:
        signature = signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")
    client = await aiohttp_client(create_app(gateway_settings(tmp_path, idp)))
    body = {"workload_token": f"{header}.{payload}.{signature}", "public_key": new_key(),
            "name": "ci"}  # fmt: skip
    resp = await client.post("/api/v1/enroll", json=body)
    assert resp.status == 401
