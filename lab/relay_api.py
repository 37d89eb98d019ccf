"""A gateway API with two configured relays whose probes are scripted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.app import create_app
from gateway.appkeys import RELAY_PROBE
from identity.policy import Policy
from lab.api_client import Client, ClientFactory, RecordingBroker, create_key, enroll, make_settings
from lab.fakes import FakeClock
from relay.client.probe import PingResult
from relay.errors import RelayTimeout


class ScriptedProbe:
    """Answers per control address; ``None`` means silence (a RelayTimeout)."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, int], PingResult | None] = {}
        self.calls: list[tuple[tuple[str, int], float]] = []

    async def __call__(self, control: tuple[str, int], timeout: float) -> PingResult:
        self.calls.append((control, timeout))
        answer = self.answers.get(control)
        if answer is None:
            raise RelayTimeout("no PONG")
        return answer


RELAYS = ["relay-1=relay.example:3480", "relay-2=[2001:db8::1]:3480"]


CONTROL_1, CONTROL_2 = ("relay.example", 3480), ("2001:db8::1", 3480)


def both_up() -> ScriptedProbe:
    probe = ScriptedProbe()
    probe.answers[CONTROL_1] = PingResult(0.010, 0, 100)
    probe.answers[CONTROL_2] = PingResult(0.010, 0, 100)
    return probe


async def start(
    aiohttp_client: ClientFactory,
    tmp_path: Path,
    *,
    relays: list[str] | None = None,
    policy: Policy | None = None,
    probe: ScriptedProbe | None = None,
) -> Client:
    settings = make_settings(tmp_path, relays=RELAYS if relays is None else relays)
    broker = RecordingBroker(policy)
    app = create_app(settings, broker_factory=lambda _p: broker, clock=FakeClock())
    app[RELAY_PROBE] = both_up() if probe is None else probe
    return await aiohttp_client(app)


async def two_devices(client: Client, tags: tuple[str, str] = ("tag:a", "tag:a")) -> list[Any]:
    out = []
    for i, tag in enumerate(tags):
        secret = (await create_key(client, tags=[tag]))["secret"]
        resp = await enroll(client, secret, name=f"vm-{i}")
        assert resp.status == 201, await resp.text()
        out.append(await resp.json())
    return out
