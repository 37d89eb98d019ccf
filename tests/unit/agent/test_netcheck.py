"""NAT classification on synthetic STUN results, and the probe with a fake network."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.daemon import Agent
from agent.discovery import netcheck
from agent.discovery.candidates import merge_candidates
from agent.discovery.netcheck import (
    NatType,
    NetReport,
    Probe,
    RelayProbe,
    classify,
    run_netcheck,
)
from agent.discovery.rawudp import RawAnswer
from agent.state import Enrollment, StateDir
from lab.api_client import ClientFactory
from lab.relay_api import start, two_devices
from lab.relay_fixtures import loopback_forwarder
from relay.aio.forwarding import RelayForwarder
from relay.client.probe import PingResult
from relay.client.stun import BindingResponse
from relay.endpoints import RelayEndpoint
from relay.errors import RelayTimeout, StunTimeout
from wiregate.cli import options as cli_options
from wiregate.cli.device import format_netcheck
from wiregate.cli.main import main
from wiregate.errors import Unauthorized, Unavailable
from wiregate.settings import AgentSettings

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


def test_a_symmetric_nat_advertises_its_public_address_with_the_listen_port() -> None:
    """No peer can send to a symmetric mapping, but the address lets an address-filtering
    peer open its filter towards it; the listen port keeps the candidate stable."""
    report = classify([answered(S1, (WAN, 40001)), answered(S2, (WAN, 40002))], LOCAL, 0.0)
    assert report.advertised_reflexive == f"{WAN}:51820"
    eim = classify([answered(S1, (WAN, 3333)), answered(S2, (WAN, 3333))], LOCAL, 0.0)
    assert eim.advertised_reflexive == eim.usable_reflexive == f"{WAN}:3333"
    blocked = classify([silent(S1), silent(S2)], LOCAL, 0.0)
    assert blocked.advertised_reflexive is None


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
    assert doc["relays"] == []  # a report without relays: the old keys, and an empty list


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
    assert all(callable(getattr(netcheck, name)) for name in netcheck.__all__)
    assert {"NetReport", "classify", "run_netcheck", "RelayProbe", "check_relays"} <= set(
        netcheck.__all__
    ) and "fetch_relays" in netcheck.__all__


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
    assert ws.sent[0]["routes"] == []  # what it would enroll with now: nothing here
    assert agent.status()["netcheck"]["nat_type"] == "eim"


async def test_agent_advertises_its_host_routes_as_they_change(tmp_path: Path) -> None:
    settings = AgentSettings(
        state_dir=tmp_path, run_dir=tmp_path, stun_servers=[":".join(map(str, S1))],
        host_traffic="nonstrict", host_addresses=["192.0.2.7"],
    )  # fmt: skip
    agent = Agent(settings)
    ws = FakeWs()
    agent._ws = ws  # type: ignore[assignment]
    await agent._advertise()
    agent.settings = settings.model_copy(update={"host_addresses": ["192.0.2.7", "192.0.2.8"]})
    await agent._advertise()
    assert [m["routes"] for m in ws.sent] == [["192.0.2.7/32"], ["192.0.2.7/32", "192.0.2.8/32"]]


def test_cli_text_and_missing_server() -> None:
    text = format_netcheck(eim_report().to_dict())
    assert "nat type   eim" in text and f"{WAN}:51820" in text and "2.0ms" in text
    result = CliRunner().invoke(main, ["netcheck"], env={"WIREGATE_STUN_SERVERS": "[]"})
    assert result.exit_code == 2 and "no STUN server" in result.output


# --- relays ----------------------------------------------------------------------------------

R1 = RelayEndpoint("relay-1", "192.0.2.50", 3480)
R2 = RelayEndpoint("relay-2", "2001:db8::5", 3480)
R3 = RelayEndpoint("relay-3", "relay.invalid", 3480)


async def fake_ping(control: tuple[str, int], wait: float) -> PingResult:
    if control == ("192.0.2.50", 3480):
        return PingResult(0.0042, 1, 10)
    if control[0] == "relay.invalid":
        raise OSError(-2, "Name or service not known")
    raise RelayTimeout(f"no PONG from {control[0]}:{control[1]} within {wait}s")


async def test_relays_are_pinged_with_the_stun_probes() -> None:
    net = FakeNet({S1: (WAN, 51820), S2: (WAN, 51820)}, other=False)
    report = await run_netcheck([S1, S2], 51820, query=net, relays=[R1, R2, R3], ping=fake_ping)
    assert report.nat_type is NatType.EIM
    assert [r.to_dict() for r in report.relays] == [
        {"id": "relay-1", "control": "192.0.2.50:3480", "reachable": True, "rtt_ms": 4.2,
         "error": ""},
        {"id": "relay-2", "control": "[2001:db8::5]:3480", "reachable": False, "rtt_ms": None,
         "error": "no PONG from 2001:db8::5:3480 within 1.5s"},
        {"id": "relay-3", "control": "relay.invalid:3480", "reachable": False, "rtt_ms": None,
         "error": "Name or service not known"},
    ]  # fmt: skip
    assert report.to_dict()["relays"][0]["id"] == "relay-1"


def test_cli_text_shows_relays() -> None:
    report = classify(eim_report().probes, LOCAL, 0.0, [RelayProbe(R1, 0.0042), RelayProbe(R2)])
    text = format_netcheck(report.to_dict())
    relay_lines = [line for line in text.splitlines() if line.startswith("relay-")]
    assert relay_lines[0].split()[:4] == ["relay-1", "192.0.2.50:3480", "yes", "4.2ms"]
    assert relay_lines[1].split()[:4] == ["relay-2", "[2001:db8::5]:3480", "no", "-"]
    assert "RELAY" not in format_netcheck(eim_report().to_dict())


@pytest.fixture
async def forwarder() -> AsyncIterator[RelayForwarder]:
    fwd = await loopback_forwarder(())
    yield fwd
    fwd.close()


async def test_check_relays_pings_a_real_relay(forwarder: RelayForwarder) -> None:
    assert forwarder.control_address is not None
    host, port = forwarder.control_address
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        live = RelayEndpoint("live", host, port)
        dead = RelayEndpoint("dead", "127.0.0.1", silent.getsockname()[1])
        up, down = await netcheck.check_relays([live, dead], wait=0.3)
    finally:
        silent.close()
    assert up.reachable and up.rtt is not None and 0 < up.rtt < 0.3
    assert not down.reachable and "no PONG" in down.error


async def test_fetch_relays_from_the_gateway(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    me, _ = await two_devices(client)
    server = str(client.make_url("")).rstrip("/")
    relays = await netcheck.fetch_relays(server, me["token"])
    assert relays == (
        RelayEndpoint("relay-1", "relay.example", 3480),
        RelayEndpoint("relay-2", "2001:db8::1", 3480),
    )
    with pytest.raises(Unauthorized):
        await netcheck.fetch_relays(server, "wgd_nope")
    with pytest.raises(Unavailable, match="cannot get the relays"):
        await netcheck.fetch_relays("http://127.0.0.1:1", me["token"])


@pytest.fixture
def quiet_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI configures structlog for the whole process (cached loggers): not in tests."""
    monkeypatch.setattr(cli_options, "configure_logging", lambda *_args: None)


class RecordingNetcheck:
    def __init__(self) -> None:
        self.relays: list[Any] = []

    async def __call__(self, servers: Any, port: int, *, relays: Any = ()) -> NetReport:
        self.relays = list(relays)
        return classify(eim_report().probes, LOCAL, 0.0, [RelayProbe(r, 0.001) for r in relays])


def test_cli_relay_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, quiet_cli: None) -> None:
    fake = RecordingNetcheck()
    monkeypatch.setattr(netcheck, "run_netcheck", fake)
    args = ["netcheck", "--stun", "198.51.100.2:3478", "--json", "--state-dir", str(tmp_path)]
    result = CliRunner().invoke(main, [*args, "--relay", "r1=192.0.2.50:3480"])
    assert result.exit_code == 0, result.output
    assert fake.relays == [RelayEndpoint("r1", "192.0.2.50", 3480)]
    doc = json.loads(result.stdout)
    assert doc["relays"] == [
        {"id": "r1", "control": "192.0.2.50:3480", "reachable": True, "rtt_ms": 1.0, "error": ""}
    ]
    bad = CliRunner().invoke(main, [*args, "--relay", "192.0.2.50:3480"])
    assert bad.exit_code == 2 and "--relay" in bad.output


def test_cli_without_enrollment_notes_it_and_checks_no_relay(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, quiet_cli: None
) -> None:
    fake = RecordingNetcheck()
    monkeypatch.setattr(netcheck, "run_netcheck", fake)
    args = ["netcheck", "--stun", "198.51.100.2:3478", "--json", "--state-dir", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert fake.relays == [] and json.loads(result.stdout)["relays"] == []
    assert "not enrolled" in result.stderr


def test_cli_asks_the_gateway_with_the_device_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, quiet_cli: None
) -> None:
    fake, asked = RecordingNetcheck(), []

    async def fetch(
        server: str, token: str, *, ca_file: Path | None = None
    ) -> tuple[RelayEndpoint, ...]:
        asked.append((server, token))
        return (R1,)

    monkeypatch.setattr(netcheck, "run_netcheck", fake)
    monkeypatch.setattr(netcheck, "fetch_relays", fetch)
    StateDir(tmp_path).save_enrollment(Enrollment("dev_1", "vm", ("100.64.0.2",), "wgd_secret"))
    args = ["netcheck", "--stun", "198.51.100.2:3478", "--state-dir", str(tmp_path)]
    result = CliRunner().invoke(main, args, env={"WIREGATE_SERVER": "http://gw.example:8080"})
    assert result.exit_code == 0, result.output
    assert asked == [("http://gw.example:8080", "wgd_secret")] and fake.relays == [R1]
    assert "relay-1" in result.stdout and "wgd_secret" not in result.output
