"""The gateway signs relay tickets: signers endpoint, ticket endpoint, the signing key file."""

from __future__ import annotations

import base64
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from nacl.signing import SigningKey

from gateway.api.relay import RELAY_SIGNER
from gateway.app import create_app
from gateway.config import GatewaySettings, load_settings
from gateway.errors import ConfigError
from gateway.relays import KEY_FILE, RelayEndpoint, load_or_create_signing_key, parse_relays
from identity.policy import Policy
from relay.relay_server import parse_signers
from relay.tickets import Side, parse_ticket
from tests.unit.test_api import (
    Client,
    ClientFactory,
    FakeClock,
    RecordingBroker,
    assert_refused,
    create_key,
    enroll,
    make_settings,
)

RELAYS = ["relay-1=relay.example:3480", "relay-2=[2001:db8::1]:3480"]


async def start(
    aiohttp_client: ClientFactory,
    tmp_path: Path,
    *,
    relays: list[str] | None = None,
    policy: Policy | None = None,
) -> Client:
    settings = make_settings(tmp_path, relays=RELAYS if relays is None else relays)
    broker = RecordingBroker(policy)
    app = create_app(settings, broker_factory=lambda _p: broker, clock=FakeClock())
    return await aiohttp_client(app)


async def two_devices(client: Client, tags: tuple[str, str] = ("tag:a", "tag:a")) -> list[Any]:
    out = []
    for i, tag in enumerate(tags):
        secret = (await create_key(client, tags=[tag]))["secret"]
        resp = await enroll(client, secret, name=f"vm-{i}")
        assert resp.status == 201, await resp.text()
        out.append(await resp.json())
    return out


async def ask(client: Client, token: str | None, peer: str) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await client.post("/api/v1/relay/tickets", json={"peer": peer}, headers=headers)


async def signers(client: Client) -> dict[str, Any]:
    resp = await client.get("/api/v1/relay/signers")
    assert resp.status == 200
    data: dict[str, Any] = await resp.json()
    return data


async def test_signers_round_trip_into_trusted_signer(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path)
    doc = await signers(client)
    (signer,) = parse_signers(doc)
    assert signer.tenants == frozenset({"default"})
    assert base64.b64encode(signer.verify_key).decode() == doc["signers"][0]["public_key"]


async def test_ticket_parses_with_the_served_signer(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path)
    me, peer = await two_devices(client)
    resp = await ask(client, me["token"], peer["device"]["id"])
    assert resp.status == 201, await resp.text()
    data = await resp.json()
    assert data["relay"] == {"id": "relay-1", "control": "relay.example:3480"}  # the first
    trusted = parse_signers(await signers(client))
    ticket = parse_ticket(
        base64.b64decode(data["ticket"]), trusted, time.time(), relay_id="relay-1"
    )
    assert ticket.side is Side.A and ticket.tenant == "default"
    assert (ticket.own.device_id, ticket.own.public_key) == (
        me["device"]["id"],
        me["device"]["public_key"],
    )
    assert (ticket.peer.device_id, ticket.peer.public_key) == (
        peer["device"]["id"],
        peer["device"]["public_key"],
    )


async def test_ticket_needs_a_valid_device_token(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path)
    _, peer = await two_devices(client)
    await assert_refused(client, await ask(client, None, peer["device"]["id"]), 401)
    await assert_refused(client, await ask(client, "wgd_nope", peer["device"]["id"]), 401)


async def test_unknown_peer_is_404_and_self_is_400(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path)
    me, _ = await two_devices(client)
    await assert_refused(client, await ask(client, me["token"], "dev_nope"), 404)
    await assert_refused(client, await ask(client, me["token"], me["device"]["id"]), 400)
    headers = {"Authorization": f"Bearer {me['token']}"}
    resp = await client.post("/api/v1/relay/tickets", json={"peer": 1}, headers=headers)
    await assert_refused(client, resp, 400)


async def test_policy_refusal_is_403(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    policy = Policy.from_dict({"rules": [{"src": ["tag:a"], "dst": ["tag:a"]}]})
    client = await start(aiohttp_client, tmp_path, policy=policy)
    me, peer = await two_devices(client, ("tag:a", "tag:b"))
    await assert_refused(client, await ask(client, me["token"], peer["device"]["id"]), 403)


async def test_no_relay_is_503(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, relays=[])
    me, peer = await two_devices(client)
    await assert_refused(client, await ask(client, me["token"], peer["device"]["id"]), 503)


async def test_signing_key_file_is_private_and_survives_a_restart(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    first = (await signers(await start(aiohttp_client, tmp_path)))["signers"][0]["public_key"]
    path = tmp_path / "state" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    again = (await signers(await start(aiohttp_client, tmp_path)))["signers"][0]["public_key"]
    assert again == first


async def test_private_key_never_in_responses_or_logs(
    aiohttp_client: ClientFactory, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with structlog.testing.capture_logs() as logs:
        client = await start(aiohttp_client, tmp_path)
        me, peer = await two_devices(client)
        bodies = [await (await ask(client, me["token"], peer["device"]["id"])).text()]
        bodies.append(await (await client.get("/api/v1/relay/signers")).text())
        bodies.append(await (await client.get("/api/v1/openapi.json")).text())
        signer_repr = repr(client.app[RELAY_SIGNER])
    seed = base64.b64decode((tmp_path / "state" / KEY_FILE).read_bytes())
    secrets = [
        base64.b64encode(seed).decode(),
        seed.hex(),
        base64.b64encode(bytes(SigningKey(seed))).decode(),
    ]
    out, err = capfd.readouterr()
    for secret in secrets:
        for text in (*bodies, repr(logs), out, err, signer_repr):
            assert secret not in text
    assert "relay_ticket_issued" in {entry["event"] for entry in logs}


def test_key_file_refusals(tmp_path: Path) -> None:
    load_or_create_signing_key(tmp_path)
    path = tmp_path / KEY_FILE
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_or_create_signing_key(tmp_path)
    path.write_text("not a key\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="32-byte seed"):
        load_or_create_signing_key(tmp_path)


def test_parse_relays() -> None:
    assert parse_relays(RELAYS)[1] == RelayEndpoint("relay-2", "2001:db8::1", 3480)
    assert parse_relays(RELAYS)[1].control == "[2001:db8::1]:3480"
    for bad in ("relay.example:3480", "r1=host", "r1=host:0", "bad id=h:1", "r1=:5"):
        with pytest.raises(ConfigError, match="relays"):
            parse_relays([bad])


@pytest.mark.parametrize(
    ("relays", "why"),
    [(["nope"], "id=HOST:PORT"), (["r1=h:1", "r1=h:2"], "repeat"), (["r1=h:70000"], "port")],
)
def test_gateway_settings_refuse_bad_relays(relays: list[str], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load_settings(GatewaySettings, None, relays=relays)
