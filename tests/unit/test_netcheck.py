"""NAT classification on synthetic STUN results, and the probe with a fake network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gateway.agent import netcheck
from gateway.agent.candidates import merge_candidates
from gateway.agent.daemon import Agent
from gateway.agent.netcheck import NatType, NetReport, Probe, classify, run_netcheck
from gateway.agent.rawudp import RawAnswer
from gateway.cli import _format_netcheck, main
from gateway.config import AgentSettings
from relay.client import BindingResponse
from relay.errors import StunTimeout

S1, S2 = ("198.51.100.2", 3478), ("198.51.100.2", 3479)
LOCAL = ("192.0.2.2", 51820)
WAN = "198.51.100.10"


def answered(server: tuple[str, int], mapped: tuple[str, int]) -> Probe:
    return Probe(server, mapped, 0.002)


def silent(server: tuple[str, int]) -> Probe:
    return Probe(server, error="no STUN answer")


def test_same_mapping_for_both_servers_is_eim() -> None:
    report = classify([answered(S1, (WAN, 51820)), answered(S2, (WAN, 51820))], LOCAL, 5.0)
    assert report.nat_type is NatType.EIM
    assert report.reflexive == (WAN, 51820)
    assert report.usable_reflexive == f"{WAN}:51820"
    assert "same mapping" in report.evidence and report.checked_at == 5.0


def test_different_mappings_are_symmetric() -> None:
    report = classify([answered(S1, (WAN, 40001)), answered(S2, (WAN, 40002))], LOCAL, 0.0)
    assert report.nat_type is NatType.SYMMETRIC
    assert report.reflexive is None and report.usable_reflexive is None
    assert "40001" in report.evidence and "40002" in report.evidence


def test_local_address_seen_unchanged_is_open() -> None:
    report = classify([answered(S1, LOCAL), answered(S2, LOCAL)], LOCAL, 0.0)
    assert report.nat_type is NatType.OPEN
    assert report.usable_reflexive == "192.0.2.2:51820"


def test_no_answer_is_udp_blocked() -> None:
    report = classify([silent(S1), silent(S2)], LOCAL, 0.0)
    assert report.nat_type is NatType.UDP_BLOCKED
    assert report.reflexive is None
    assert "198.51.100.2:3478" in report.evidence


def test_one_translated_answer_is_unknown() -> None:
    report = classify([answered(S1, (WAN, 51820)), silent(S2)], LOCAL, 0.0)
    assert report.nat_type is NatType.UNKNOWN
    assert report.reflexive == (WAN, 51820) and report.usable_reflexive is None


def test_one_answer_with_the_local_address_is_open() -> None:
    assert classify([answered(S1, LOCAL)], LOCAL, 0.0).nat_type is NatType.OPEN


def test_same_ip_other_port_is_not_open() -> None:
    mapped = (LOCAL[0], 1234)
    report = classify([answered(S1, mapped), answered(S2, mapped)], LOCAL, 0.0)
    assert report.nat_type is NatType.EIM


def test_to_dict() -> None:
    report = classify([answered(S1, (WAN, 51820)), silent(S2)], LOCAL, 1.0)
    doc = report.to_dict()
    assert doc["nat_type"] == "unknown" and doc["reflexive"] == f"{WAN}:51820"
    assert doc["local"] == "192.0.2.2:51820"
    assert doc["servers"] == [
        {"server": "198.51.100.2:3478", "reachable": True, "mapped": f"{WAN}:51820",
         "rtt_ms": 2.0, "error": ""},
        {"server": "198.51.100.2:3479", "reachable": False, "mapped": None, "rtt_ms": None,
         "error": "no STUN answer"},
    ]  # fmt: skip


class FakeNet:
    """Answers STUN queries from a table: server -> mapped (or absent: timeout)."""

    def __init__(self, table: dict[tuple[str, int], tuple[str, int]], other: bool) -> None:
        self.table, self.other, self.asked = table, other, list[tuple[str, int]]()

    async def __call__(self, server: tuple[str, int], port: int, wait: float) -> RawAnswer:
        self.asked.append(server)
        if server not in self.table:
            raise StunTimeout("no STUN answer")
        other = S2 if self.other and server == S1 else None
        return RawAnswer(BindingResponse(self.table[server], server, other), 0.001)


async def test_single_server_uses_its_other_address() -> None:
    net = FakeNet({S1: (WAN, 51820), S2: (WAN, 51820)}, other=True)
    report = await run_netcheck([S1], 51820, query=net, clock=lambda: 7.0)
    assert net.asked == [S1, S2]
    assert report.nat_type is NatType.EIM and report.checked_at == 7.0


async def test_two_servers_symmetric() -> None:
    net = FakeNet({S1: (WAN, 1), S2: (WAN, 2)}, other=False)
    report = await run_netcheck([S1, S2], 51820, query=net)
    assert report.nat_type is NatType.SYMMETRIC
    assert [p.mapped for p in report.probes] == [(WAN, 1), (WAN, 2)]


async def test_blocked_and_no_other_address() -> None:
    net = FakeNet({}, other=True)
    report = await run_netcheck([S1], 51820, query=net)
    assert net.asked == [S1]
    assert report.nat_type is NatType.UDP_BLOCKED


async def test_needs_a_server() -> None:
    with pytest.raises(ValueError, match="at least one"):
        await run_netcheck([], 51820, query=FakeNet({}, other=False))


def test_exports() -> None:
    assert set(netcheck.__all__) == {"NatType", "NetReport", "Probe", "classify", "run_netcheck"}


def test_candidates_order_configured_reflexive_local() -> None:
    got = merge_candidates(
        ["203.0.113.9:51820"], f"{WAN}:51820", ["192.0.2.2:51820", f"{WAN}:51820"]
    )
    assert got == ["203.0.113.9:51820", f"{WAN}:51820", "192.0.2.2:51820"]


def test_candidates_without_reflexive() -> None:
    assert merge_candidates([], None, ["192.0.2.2:51820"]) == ["192.0.2.2:51820"]


class FakeWs:
    """The map stream's websocket, recording what the agent sends."""

    closed = False

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send_json(self, doc: Any) -> None:
        self.sent.append(doc)


def eim_report() -> NetReport:
    return classify([answered(S1, (WAN, 51820)), answered(S2, (WAN, 51820))], LOCAL, 0.0)


async def test_agent_advertises_reflexive_once(tmp_path: Path) -> None:
    settings = AgentSettings(
        state_dir=tmp_path, run_dir=tmp_path, stun_servers=[":".join(map(str, S1))],
        endpoints=["203.0.113.9:51820"],
    )  # fmt: skip
    agent = Agent(settings)
    agent.netreport = eim_report()
    ws = FakeWs()
    agent._ws = ws  # type: ignore[assignment]
    await agent._advertise()
    await agent._advertise()  # unchanged: not sent again
    assert len(ws.sent) == 1
    assert ws.sent[0]["endpoints"][:2] == ["203.0.113.9:51820", f"{WAN}:51820"]
    assert agent.status()["netcheck"]["nat_type"] == "eim"


def test_cli_text_and_missing_server() -> None:
    text = _format_netcheck(eim_report().to_dict())
    assert "nat type   eim" in text and f"{WAN}:51820" in text and "2.0ms" in text
    result = CliRunner().invoke(main, ["netcheck"], env={"WIREGATE_STUN_SERVERS": "[]"})
    assert result.exit_code == 2 and "no STUN server" in result.output
