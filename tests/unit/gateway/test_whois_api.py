"""``GET /api/v1/devices/self/whois`` (``wiregate whois``): a device learns who owns
itself or a peer (issuer, subject, kind of owner) and its tags; a device it does not
peer with is not found, like a missing one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.gateway_client import ControlClient
from gateway.api.devices import owner_json
from gateway.app import create_app
from gateway.appkeys import STORE
from gateway.store.records import ADMIN_ISSUER, ENROLLMENT_ISSUER
from gateway.web.sessions import csrf_token
from identity.policy import Policy
from lab.api_client import (
    Client,
    ClientFactory,
    RecordingBroker,
    assert_refused,
    create_key,
    enroll,
    make_settings,
)
from lab.fakes import FakeClock
from tests.unit.gateway.test_api import _documented, _served
from tests.unit.gateway.test_web_pages import (
    form_headers,
    make_session,
    pending_code,
    sso_settings,
)
from wiregate.errors import RemoteError, Unauthorized
from wiregate.model import Identity
from wiregate.settings import GatewaySettings, OidcIssuerSettings, WorkloadIssuerSettings

PATH = "/api/v1/devices/self/whois"


async def start(
    aiohttp_client: ClientFactory, tmp_path: Path, policy: Policy | None = None
) -> Client:
    app = create_app(
        make_settings(tmp_path),
        broker_factory=lambda _p: RecordingBroker(policy),
        clock=FakeClock(),
    )
    return await aiohttp_client(app)


async def device(client: Client, name: str, tag: str) -> dict[str, Any]:
    key = await create_key(client, tags=[tag])
    resp = await enroll(client, key["secret"], name=name)
    assert resp.status == 201, await resp.text()
    data: dict[str, Any] = await resp.json()
    data["key_id"] = key["key"]["id"]
    return data


async def ask(client: Client, token: str | None, query: str) -> aiohttp.ClientResponse:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return await client.get(PATH + query, headers=headers)


async def test_a_device_learns_who_owns_a_peer_and_itself(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path)
    served = await _served(client)
    me, peer = await device(client, "me", "tag:a"), await device(client, "db", "tag:db")
    resp = await ask(client, me["token"], f"?device={peer['device']['id']}")
    assert resp.status == 200, await resp.text()
    doc = await _documented(served, "get", PATH, resp)
    assert doc["device"] == {"id": peer["device"]["id"], "name": "db", "tags": ["tag:db"]}
    assert doc["owner"] == {
        "issuer": ENROLLMENT_ISSUER,
        "subject": peer["key_id"],
        "kind": "enrollment-key",
        "via": None,
        "email": None,
        "name": None,
    }
    mine = await (await ask(client, me["token"], f"?device={me['device']['id']}")).json()
    assert mine["owner"]["subject"] == me["key_id"]


async def test_refusals(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    served = await _served(client)
    me, peer = await device(client, "me", "tag:a"), await device(client, "db", "tag:a")
    query = f"?device={peer['device']['id']}"
    for token, status in [(None, 401), ("wgd_nope", 401)]:
        resp = await ask(client, token, query)
        await assert_refused(client, resp, status)
        await _documented(served, "get", PATH, resp)
    for bad in ("", "?name=db", query + "&extra=1"):
        await assert_refused(client, await ask(client, me["token"], bad), 400)
    resp = await ask(client, me["token"], "?device=dev_nope")
    await assert_refused(client, resp, 404)
    await _documented(served, "get", PATH, resp)


async def test_a_device_it_does_not_peer_with_is_not_found(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    policy = Policy.from_dict({"rules": [{"src": ["tag:a"], "dst": ["tag:a"]}]})
    client = await start(aiohttp_client, tmp_path, policy)
    me, other = await device(client, "me", "tag:a"), await device(client, "other", "tag:b")
    resp = await ask(client, me["token"], f"?device={other['device']['id']}")
    await assert_refused(client, resp, 404)
    assert "other" not in await resp.text() and ENROLLMENT_ISSUER not in await resp.text()


SSO = OidcIssuerSettings(
    name="corp", issuer="https://idp.example/", client_id="web", client_secret="env:S"
)
CLUSTER = WorkloadIssuerSettings(name="prod", issuer="https://k8s.example", kind="kubernetes")
SHARED = WorkloadIssuerSettings(name="ci", issuer="https://idp.example", audience="wiregate")


@pytest.mark.parametrize(
    ("identity", "kind", "via"),
    [
        (Identity(ENROLLMENT_ISSUER, "key_1"), "enrollment-key", None),
        (Identity(ADMIN_ISSUER, "alice"), "person", "approved by an administrator"),
        (Identity("https://idp.example", "alice-sub"), "person", "corp"),
        (Identity("https://k8s.example", "system:serviceaccount:ns:app"), "workload", "prod"),
        # one IdP for people and workloads: a ServiceAccount subject is a workload
        (Identity("https://idp.example/", "system:serviceaccount:ci:runner"), "workload", "ci"),
        (Identity("https://gone.example", "x"), "identity", None),
    ],
)
def test_the_kind_of_owner(identity: Identity, kind: str, via: str | None) -> None:
    settings = GatewaySettings.model_construct(oidc=[SSO], workload_issuers=[CLUSTER, SHARED])
    owner = owner_json(identity, settings)
    assert owner == {"issuer": identity.issuer, "subject": identity.subject, "kind": kind,
                     "via": via, "email": None, "name": None}  # fmt: skip


async def test_the_agents_client_reads_the_answer(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path)
    me, peer = await device(client, "me", "tag:a"), await device(client, "db", "tag:a")
    async with aiohttp.ClientSession() as http:
        control = ControlClient(str(client.make_url("")).rstrip("/"), http)
        doc = await control.whois(me["token"], peer["device"]["id"])
        assert doc["owner"]["subject"] == peer["key_id"]
        with pytest.raises(RemoteError) as missing:
            await control.whois(me["token"], "dev_nope")
        assert (missing.value.status, missing.value.code) == (404, "not_found")
        with pytest.raises(Unauthorized):
            await control.whois("wgd_nope", peer["device"]["id"])


async def test_a_persons_email_and_name_come_from_their_web_approval(
    aiohttp_client: ClientFactory, tmp_path: Path, clock: FakeClock
) -> None:
    app = create_app(sso_settings(tmp_path), broker_factory=RecordingBroker, clock=clock)
    client = await aiohttp_client(app)
    me = replace(make_session("alice"), email="alice@example.com", name="Alice Liddell")
    code, _ = await pending_code(client, "laptop-7")
    form = {"user_code": code, "csrf": csrf_token(me)}
    done = await client.post("/login/approve", data=form, headers=form_headers(client, me))
    assert done.status == 200, await done.text()
    [laptop] = await client.app[STORE].devices_of(me.identity)
    peer = await device(client, "db", "tag:a")
    resp = await ask(client, peer["token"], f"?device={laptop.device.id}")
    assert resp.status == 200, await resp.text()
    owner = (await resp.json())["owner"]
    assert (owner["subject"], owner["email"], owner["name"]) == (
        "alice",
        "alice@example.com",
        "Alice Liddell",
    )
