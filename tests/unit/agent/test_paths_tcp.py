"""The path machine's relayed_tcp state: entered, explained, left for UDP and for direct."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dataplane.facade import PeerStatus
from agent.discovery.netcheck import NatType
from agent.paths.driver import PathBook, PathRunner, RelayHooks
from agent.paths.machine import (
    TRANSITIONS,
    Event,
    Handshake,
    LocalNat,
    PathMachine,
    PathState,
    PathTimers,
    PeerUpdate,
    RelayFailed,
    RelayReady,
    ReleaseRelay,
    RequestRelay,
    SetEndpoint,
    Tick,
)
from agent.paths.relaylink import RelayBinding, RelayGrant
from agent.paths.tcplink import TcpFallback
from wiregate.errors import Unavailable
from wiregate.model import NetMap, Peer, SelfView

PUB = "203.0.113.5:51820"
LINK = "10.0.0.7:38211"  # the tcp link's local endpoint
RELAY = "192.0.2.9:40000"
VIA = "TCP 443 via relay r1"


def state(m: PathMachine) -> PathState:
    """The machine's state (a call, so that type checkers do not narrow it)."""
    return m.state


def on_tcp() -> PathMachine:
    m = PathMachine("peer-1")
    m.handle(LocalNat(0.0, NatType.UDP_BLOCKED))
    assert m.handle(PeerUpdate(0.0, (PUB,), NatType.EIM)) == [RequestRelay("peer-1")]
    assert m.handle(RelayReady(1.0, LINK, via_tcp=VIA)) == [SetEndpoint("peer-1", LINK)]
    assert m.handle(Handshake(1.2, 1.1, LINK)) == []  # through the link: the kicks end
    return m


def test_udp_blocked_here_is_relayed_over_tcp_and_says_why() -> None:
    m = on_tcp()
    report = m.explain()
    assert state(m) is PathState.RELAYED_TCP
    assert (report.path, report.state, report.endpoint) == ("relayed", "relayed_tcp", LINK)
    assert report.reason == (
        "UDP blocked on this network: relayed over TCP 443 via relay r1; not retrying direct"
    )
    assert m.next_deadline() is None  # nothing to retry while netcheck says UDP is blocked


def test_udp_back_retries_direct_and_a_handshake_there_releases_the_relay() -> None:
    m = on_tcp()
    m.handle(LocalNat(20.0, NatType.EIM, "198.51.100.7:51820"))
    assert state(m) is PathState.RELAYED_TCP
    assert "retrying direct every 30 s" in m.explain().reason
    deadline = m.next_deadline()
    assert deadline is not None
    assert m.handle(Tick(deadline)) == [SetEndpoint("peer-1", PUB)]
    assert state(m) is PathState.RETRY_DIRECT
    assert m.handle(Handshake(deadline + 1, deadline + 1, PUB)) == [ReleaseRelay("peer-1")]
    assert state(m) is PathState.DIRECT


def test_a_failed_retry_goes_back_onto_tcp() -> None:
    m = on_tcp()
    m.handle(LocalNat(20.0, NatType.EIM, "198.51.100.7:51820"))
    deadline = m.next_deadline()
    assert deadline is not None
    m.handle(Tick(deadline))
    assert m.handle(Tick(deadline + 5.0)) == [SetEndpoint("peer-1", LINK)]
    assert state(m) is PathState.RELAYED_TCP


def test_the_runner_moving_to_udp_gives_plain_relayed() -> None:
    m = on_tcp()
    assert m.handle(RelayFailed(30.0, "relay r1 answers over UDP again")) == [
        RequestRelay("peer-1")
    ]
    assert m.handle(RelayReady(31.0, RELAY)) == [SetEndpoint("peer-1", RELAY)]
    assert state(m) is PathState.RELAYED
    assert "TCP" not in m.explain().reason


def test_relayed_tcp_has_a_row_for_every_event() -> None:
    kinds = {kind for _, kind in TRANSITIONS}
    assert {(PathState.RELAYED_TCP, kind) for kind in kinds} <= set(TRANSITIONS)


KEY_B = "B" * 43 + "="
TCP_BINDING = RelayBinding("r1", ("10.0.0.7", 38211), LINK, True, via_tcp=VIA)
UDP_BINDING = RelayBinding("r1", ("192.0.2.9", 3480), RELAY, True)


async def test_the_runner_goes_over_tcp_and_back_to_udp_when_the_relay_answers() -> None:
    book = PathBook(PathTimers(probe_timeout=0.05))
    book.local_nat(LocalNat(0.0, NatType.UDP_BLOCKED))
    me = SelfView("a", "a", "A" * 43 + "=", ("100.64.0.1/32",))
    peer = Peer("b", "b", KEY_B, ("100.64.0.2/32",), ("100.64.0.2/32",), (PUB,))
    m = NetMap(1, me, {"b": peer})
    udp_works = [False]
    released: list[RelayBinding] = []
    applied: list[tuple[str, ...]] = []

    async def ticket(peer_id: str, avoid: Sequence[str]) -> str:
        return "grant"

    async def bind(grant: object) -> RelayBinding:
        return UDP_BINDING if udp_works[0] else TCP_BINDING

    async def probe(control: tuple[str, int]) -> None:
        return None

    async def udp_back(binding: RelayBinding) -> bool:
        return udp_works[0]

    async def read_status() -> Sequence[PeerStatus]:
        return []

    async def reapply() -> None:
        applied.append(book.shape(m).peers["b"].endpoints)

    hooks = RelayHooks(ticket, bind, probe, released.append, udp_back, ping_interval=0.02)
    loop = asyncio.get_running_loop()
    runner = PathRunner(book, hooks, read_status, reapply, clock=loop.time)
    await runner.perform(book.update_map(m, loop.time()))
    task = asyncio.create_task(runner.run())
    try:
        await _until(lambda: book.machines["b"].state is PathState.RELAYED_TCP)
        report = book.report("b")
        assert report is not None and report["relay"] == "r1" and applied[-1] == (LINK,)
        assert report["reason"].startswith("UDP blocked on this network: relayed over " + VIA)
        udp_works[0] = True
        await _until(lambda: book.machines["b"].state is PathState.RELAYED)
        assert released == [TCP_BINDING] and applied[-1] == (RELAY,)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not predicate():
            await asyncio.sleep(0.01)


@st.composite
def events(draw: st.DrawFn, now: float) -> Event:
    kind = draw(st.sampled_from(["nat", "peer", "handshake", "ready", "failed", "tick"]))
    if kind == "nat":
        return LocalNat(now, draw(st.sampled_from(list(NatType))), "198.51.100.7:51820")
    if kind == "peer":
        return PeerUpdate(now, draw(st.sampled_from([(PUB,), ()])), NatType.EIM)
    if kind == "handshake":
        return Handshake(now, now - draw(st.sampled_from([0.0, 1.0, 500.0])), PUB)
    if kind == "ready":
        return RelayReady(
            now, draw(st.sampled_from([LINK, RELAY])), draw(st.sampled_from([VIA, ""]))
        )
    if kind == "failed":
        return RelayFailed(now, "relay r1 answers over UDP again")
    return Tick(now)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_sequence_through_relayed_tcp_stays_in_the_table(data: st.DataObject) -> None:
    m, now = on_tcp(), 1.0
    for _ in range(data.draw(st.integers(1, 40))):
        now += data.draw(st.sampled_from([0.0, 1.0, 5.0, 31.0]))
        m.handle(data.draw(events(now)))  # an outcome outside the table raises
        report = m.explain()
        assert report.reason
        if report.state == "relayed_tcp":
            assert report.path == "relayed" and f"relayed over {VIA}" in report.reason


def test_the_tcp_link_endpoint_restarts_the_handshake_like_a_relay() -> None:
    m = PathMachine("peer-1")
    m.handle(LocalNat(0.0, NatType.UDP_BLOCKED))
    m.handle(PeerUpdate(0.0, (PUB,), NatType.EIM))
    assert m.handle(RelayReady(1.0, LINK, via_tcp=VIA)) == [SetEndpoint("peer-1", LINK)]
    assert state(m) is PathState.RELAYED_TCP and m.wants_fresh_handshake()
    assert m.handle(Tick(2.0)) == [SetEndpoint("peer-1", LINK)]
    m.handle(Handshake(2.3, 2.2, LINK))
    assert not m.wants_fresh_handshake() and m.next_deadline() is None


async def test_the_fallback_skips_udp_to_a_relay_netcheck_found_silent() -> None:
    tried: list[RelayGrant] = []

    async def udp_bind(grant: RelayGrant) -> RelayBinding:
        tried.append(grant)
        return UDP_BINDING

    async def udp_probe(control: tuple[str, int]) -> None:
        return None

    with socket.socket() as closed:  # a TCP port nothing listens on: refused at once
        closed.bind(("127.0.0.1", 0))
        tcp = closed.getsockname()
    grant = RelayGrant("r1", ("192.0.2.9", 3480), b"t" * 32, tcp=tcp)
    blocked = [True]
    fallback = TcpFallback(
        udp_bind=udp_bind, udp_probe=udp_probe, wg_port=9, udp_silent=lambda r: blocked[0]
    )
    with pytest.raises(Unavailable, match="over tcp"):
        await fallback.bind(grant)
    assert tried == []  # straight to TLS: no UDP attempt to wait for
    blocked[0] = False
    assert await fallback.bind(grant) == UDP_BINDING and tried == [grant]
