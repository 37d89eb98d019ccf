"""The relays' TLS/TCP addresses: configured on the gateway, handed out with tickets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from gateway.api.openapi import DOCUMENT
from gateway.app import create_app
from gateway.appkeys import RELAY_MONITOR, RELAY_PROBE
from lab.api_client import ClientFactory, RecordingBroker, make_settings
from lab.fakes import FakeClock
from lab.relay_api import RELAYS, both_up, two_devices
from wiregate.settings import GatewaySettings


async def ticket_relay(aiohttp_client: ClientFactory, tmp_path: Path, tcp: list[str]) -> Any:
    settings = make_settings(tmp_path, relays=RELAYS, relay_tcp=tcp)
    broker = RecordingBroker(None)
    app = create_app(settings, broker_factory=lambda _p: broker, clock=FakeClock())
    probe = both_up()
    app[RELAY_PROBE] = probe  # type: ignore[misc]  # a scripted Probe (see lab.relay_api)
    client = await aiohttp_client(app)
    await client.app[RELAY_MONITOR].probe_all()
    me, peer = await two_devices(client)
    resp = await client.post(
        "/api/v1/relay/tickets",
        json={"peer": peer["device"]["id"]},
        headers={"Authorization": f"Bearer {me['token']}"},
    )
    assert resp.status == 201, await resp.text()
    relay = (await resp.json())["relay"]
    schema = DOCUMENT["components"]["schemas"]["Ticket"]["properties"]["relay"]
    assert [e.message for e in Draft202012Validator(schema).iter_errors(relay)] == []
    return relay


async def test_a_relay_with_a_tcp_listener_is_handed_out_with_it(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    relay = await ticket_relay(aiohttp_client, tmp_path, ["relay-1=relay.example:443"])
    assert relay == {"id": "relay-1", "control": "relay.example:3480", "tcp": "relay.example:443"}


async def test_without_one_the_answer_is_what_older_agents_know(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    relay = await ticket_relay(aiohttp_client, tmp_path, ["relay-2=[2001:db8::1]:443"])
    assert relay == {"id": "relay-1", "control": "relay.example:3480"}


@pytest.mark.parametrize(
    ("tcp", "message"),
    [
        (["relay-9=relay.example:443"], "'relay-9' is not one of relays"),
        (["relay-1=a:443", "relay-1=b:443"], "relay ids repeat"),
        (["relay-1=relay.example"], "not"),
    ],
)
def test_bad_relay_tcp_entries_are_refused(tmp_path: Path, tcp: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GatewaySettings(state_dir=tmp_path, relays=RELAYS, relay_tcp=tcp)
