"""The gateway signs relay tickets: signers endpoint, ticket endpoint, the signing key file.

Relay probes are scripted (:class:`ScriptedProbe`): the selection and failover
seen through the API, the relays' health route and its metrics.
"""

from __future__ import annotations

import asyncio
import base64
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from nacl.signing import SigningKey
from prometheus_client import generate_latest

from gateway.app import create_app
from gateway.appkeys import METRICS, RELAY_MONITOR, RELAY_SELECTOR, RELAY_SIGNER
from gateway.relays import KEY_FILE, load_or_create_signing_key
from identity.policy import Policy
from lab.api_client import (
    AUTH,
    Client,
    ClientFactory,
    RecordingBroker,
    assert_refused,
    make_settings,
)
from lab.fakes import FakeClock
from lab.relay_api import CONTROL_1, CONTROL_2, RELAYS, ScriptedProbe, both_up, start, two_devices
from lab.relay_fixtures import loopback_forwarder
from relay.aio.forwarding import parse_signers
from relay.client.probe import PingResult
from relay.endpoints import RelayEndpoint, parse_relays
from relay.tickets import DEFAULT_LIFETIME, Side, parse_ticket
from wiregate.errors import ConfigError
from wiregate.settings import GatewaySettings, load_settings


async def probe_round(client: Client) -> None:
    await client.app[RELAY_MONITOR].probe_all()


async def ask(client: Client, token: str | None, peer: str, avoid: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body: dict[str, Any] = {"peer": peer} if avoid is None else {"peer": peer, "avoid": avoid}
    return await client.post("/api/v1/relay/tickets", json=body, headers=headers)


async def relay_of(client: Client, me: Any, peer: Any, avoid: Any = None) -> str:
    resp = await ask(client, me["token"], peer["device"]["id"], avoid)
    assert resp.status == 201, await resp.text()
    relay_id: str = (await resp.json())["relay"]["id"]
    return relay_id


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
    assert data["relay"] == {"id": "relay-1", "control": "relay.example:3480"}  # tie: lowest id
    assert data["expires_in"] == DEFAULT_LIFETIME
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


async def test_no_relay_up_is_503_with_a_hint(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, probe=ScriptedProbe())
    me, peer = await two_devices(client)
    resp = await ask(client, me["token"], peer["device"]["id"])
    await assert_refused(client, resp, 503)
    body = await resp.json()
    assert body["error"] == "no_relay_up" and "/api/v1/relays" in body["hint"]


async def test_least_loaded_relay_and_both_sides_share_it(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    probe = both_up()
    probe.answers[CONTROL_1] = PingResult(0.001, 80, 100)
    probe.answers[CONTROL_2] = PingResult(0.050, 5, 100)
    client = await start(aiohttp_client, tmp_path, probe=probe)
    me, peer = await two_devices(client)
    assert await relay_of(client, me, peer) == "relay-2"
    assert await relay_of(client, peer, me) == "relay-2"  # the other side: the same relay


async def test_a_dead_relay_moves_its_pairs_and_they_stay_moved(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    probe = both_up()
    client = await start(aiohttp_client, tmp_path, probe=probe)
    me, peer = await two_devices(client)
    assert await relay_of(client, me, peer) == "relay-1"
    del probe.answers[CONTROL_1]
    await probe_round(client)
    assert await relay_of(client, peer, me) == "relay-1"  # one missed probe: still up
    await probe_round(client)
    assert await relay_of(client, peer, me) == "relay-2"  # two: down, the pair moves
    assert await relay_of(client, me, peer) == "relay-2"
    probe.answers[CONTROL_1] = PingResult(0.001, 0, 100)
    await probe_round(client)
    assert await relay_of(client, me, peer) == "relay-2"  # sticky while relay-2 is up


async def test_avoid_moves_the_pair_for_both_sides(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path)
    me, peer = await two_devices(client)
    assert await relay_of(client, me, peer) == "relay-1"
    assert await relay_of(client, me, peer, ["relay-1"]) == "relay-2"
    assert await relay_of(client, peer, me) == "relay-2"
    resp = await ask(client, peer["token"], me["device"]["id"], ["relay-1", "relay-2"])
    await assert_refused(client, resp, 503)


@pytest.mark.parametrize(
    "avoid",
    [
        [f"relay-{i}" for i in range(9)],  # more than eight
        ["bad id"],
        [""],
        ["x" * 65],
        "relay-1",
        [1],
    ],
)
async def test_avoid_is_validated(
    aiohttp_client: ClientFactory, tmp_path: Path, avoid: Any
) -> None:
    client = await start(aiohttp_client, tmp_path)
    me, peer = await two_devices(client)
    await assert_refused(client, await ask(client, me["token"], peer["device"]["id"], avoid), 400)


async def test_relays_route_for_devices_and_admins(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    probe = both_up()
    probe.answers[CONTROL_2] = None
    client = await start(aiohttp_client, tmp_path, probe=probe)
    me, _ = await two_devices(client)
    for headers in ({"Authorization": f"Bearer {me['token']}"}, AUTH):
        resp = await client.get("/api/v1/relays", headers=headers)
        assert resp.status == 200, await resp.text()
        first, second = (await resp.json())["relays"]
        assert first == {
            "id": "relay-1",
            "control": "relay.example:3480",
            "up": True,
            "rtt_ms": 10.0,
            "allocations": 0,
            "capacity": 100,
            "load": 0.0,
            "error": None,
        }
        assert second["id"] == "relay-2" and second["control"] == "[2001:db8::1]:3480"
        assert second["up"] is False and second["error"] == "no PONG"
    for bad in ({}, {"Authorization": "Bearer wgd_nope"}):
        await assert_refused(client, await client.get("/api/v1/relays", headers=bad), 401)


async def test_relay_gauges_on_the_metrics_registry(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    probe = both_up()
    probe.answers[CONTROL_1] = PingResult(0.004, 25, 100)
    probe.answers[CONTROL_2] = None
    client = await start(aiohttp_client, tmp_path, probe=probe)
    await client.get("/api/v1/relays", headers=AUTH)
    text = generate_latest(client.app[METRICS]).decode()
    assert 'wiregate_relay_up{relay="relay-1"} 1.0' in text
    assert 'wiregate_relay_up{relay="relay-2"} 0.0' in text
    assert 'wiregate_relay_rtt_seconds{relay="relay-1"} 0.004' in text
    assert 'wiregate_relay_load{relay="relay-1"} 0.25' in text
    assert 'wiregate_relay_rtt_seconds{relay="relay-2"}' not in text


async def test_real_relays_probed_and_a_dead_one_fails_over(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """Two real relay forwarders on loopback, real PINGs every 0.4 s: kill one, the pair moves."""
    forwarders = [await loopback_forwarder(()), await loopback_forwarder((), ports=8)]
    try:
        ports = [f.control_address[1] for f in forwarders if f.control_address]
        relays = [f"relay-{i}=127.0.0.1:{port}" for i, port in enumerate(ports)]
        settings = make_settings(tmp_path, relays=relays, relay_probe_interval=0.4)
        app = create_app(settings, broker_factory=lambda _p: RecordingBroker(), clock=FakeClock())
        client = await aiohttp_client(app)
        me, peer = await two_devices(client)
        status = (await (await client.get("/api/v1/relays", headers=AUTH)).json())["relays"]
        assert [(r["up"], r["capacity"]) for r in status] == [(True, 2), (True, 4)]
        assert all(0 < r["rtt_ms"] < 100 for r in status)
        used = await relay_of(client, me, peer)
        other = "relay-1" if used == "relay-0" else "relay-0"
        forwarders[int(used[-1])].close()
        for _ in range(100):  # two missed rounds: about 0.8 s
            await asyncio.sleep(0.05)
            if not client.app[RELAY_SELECTOR].is_up(used):
                break
        assert await relay_of(client, peer, me) == other
        assert await relay_of(client, me, peer) == other
        status = (await (await client.get("/api/v1/relays", headers=AUTH)).json())["relays"]
        (dead,) = (r for r in status if r["id"] == used)
        assert dead["up"] is False and "no PONG" in dead["error"]
    finally:
        for forwarder in forwarders:
            forwarder.close()


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
    with pytest.raises(ConfigError, match="readable by group or others"):
        load_or_create_signing_key(tmp_path)
    path.write_text("not a key\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not 32 bytes of base64"):
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
