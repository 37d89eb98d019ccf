"""The STUN server's default per-source budget against what an agent's netcheck sends.

The netcheck is measured, not assumed: the real ``run_netcheck`` and
``raw_stun_query`` run with their own retransmission schedule against STUN
servers that never answer (the worst case: every retransmission is sent), with
only the raw socket faked so that the datagrams are counted instead of sent.
Then that many requests per agent, from many agents behind one NAT address, all
at the same instant, must all be answered by a server with the default limits.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from agent.discovery import rawudp
from agent.discovery.netcheck import run_netcheck
from relay.stun_core import SOURCE_BURST, SOURCE_RATE, StunServer
from wiregate.settings import AgentSettings, RelaySettings

RELAY = "198.51.100.7"
SERVERS = [(RELAY, 3478), (RELAY, 3479), (RELAY, 3480)]  # three addresses of one relay host
AGENTS_BEHIND_ONE_NAT = 100


class CountingRawSocket:
    """Stands in for the raw socket: counts what would be sent, never receives."""

    sent: Counter[tuple[str, int]] = Counter()
    payloads: list[bytes] = []

    def __enter__(self) -> CountingRawSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def keep_only(self, server: tuple[str, int], local_port: int) -> None:
        pass

    async def send(self, src_port: int, dst: tuple[str, int], payload: bytes) -> None:
        self.sent[dst] += 1
        self.payloads.append(payload)

    async def receive(self) -> rawudp.UdpDatagram:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_crowd_of_netchecks_behind_one_address_is_never_limited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    CountingRawSocket.sent.clear()
    CountingRawSocket.payloads.clear()
    monkeypatch.setattr(rawudp, "RawUdpSocket", CountingRawSocket)
    report = await run_netcheck(SERVERS, 51820)  # the agent's own wait and schedule
    assert report.reflexive is None  # nobody answered: every retransmission went out
    assert dict(CountingRawSocket.sent) == {server: 3 for server in SERVERS}
    requests = list(CountingRawSocket.payloads)
    outcomes: Counter[str] = Counter()
    server = StunServer([(RELAY, 3478)], observe=lambda o, n: outcomes.update({o: n}))
    nat = "203.0.113.1"
    for agent in range(AGENTS_BEHIND_ONE_NAT):
        batch = [(data, (nat, 20000 + agent)) for data in requests]
        assert len(server.handle_batch(batch, (RELAY, 3478), 1000.0)) == len(requests)
    assert outcomes == {"success": AGENTS_BEHIND_ONE_NAT * len(requests)}
    assert AGENTS_BEHIND_ONE_NAT * len(requests) <= SOURCE_BURST


def test_sustained_netchecks_stay_far_below_the_source_rate() -> None:
    """Every agent behind one address probing every netcheck_interval (default 60 s),
    every request retransmitted: the per-source rate is not approached."""
    per_agent = 3 * len(SERVERS) / AgentSettings.model_fields["netcheck_interval"].default
    assert AGENTS_BEHIND_ONE_NAT * per_agent < SOURCE_RATE / 10


def test_the_settings_defaults_are_the_cores() -> None:
    from relay.stun_core import GLOBAL_BURST, GLOBAL_RATE

    fields = RelaySettings.model_fields
    assert fields["stun_rate"].default == SOURCE_RATE
    assert fields["stun_burst"].default == SOURCE_BURST
    assert fields["stun_global_rate"].default == GLOBAL_RATE
    assert fields["stun_global_burst"].default == GLOBAL_BURST
