"""PathBook (pure) and PathRunner (asyncio, with the network and the device faked)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from itertools import pairwise
from typing import Any

import pytest

from agent.dataplane.facade import PeerStatus
from agent.discovery.netcheck import NatType
from agent.paths.driver import PathBook, PathRunner, RelayHooks
from agent.paths.machine import (
    LocalNat,
    PathState,
    PathTimers,
    ReleaseRelay,
    RequestRelay,
    SetEndpoint,
)
from agent.paths.predict import MAX_PROBES, PredictionPlan
from agent.paths.relaylink import Addr, RelayBinding
from wiregate.errors import Unavailable
from wiregate.model import NetMap, Peer, SelfView

KEY_B = "B" * 43 + "="
KEY_C = "C" * 43 + "="
PUB_B = "203.0.113.5:51820"
RELAY = "198.51.100.9:40000"


def peer(pid: str, key: str, endpoints: tuple[str, ...]) -> Peer:
    return Peer(pid, pid, key, ("100.64.0.2/32",), ("100.64.0.2/32",), endpoints)


def netmap(*peers: Peer, version: int = 1) -> NetMap:
    me = SelfView("a", "a", "A" * 43 + "=", ("100.64.0.1/32",))
    return NetMap(version, me, {p.id: p for p in peers})


def status(key: str, latest: float | None, endpoint: str | None) -> PeerStatus:
    return PeerStatus(key, endpoint, latest, 0, 0, ())


def test_a_new_peer_is_probed_and_the_map_carries_the_chosen_endpoint() -> None:
    book = PathBook()
    book.local_nat(LocalNat(0.0, NatType.EIM))
    actions = book.update_map(netmap(peer("b", KEY_B, (PUB_B,))), now=1.0)
    assert actions == [SetEndpoint("b", PUB_B)]
    shaped = book.shape(netmap(peer("b", KEY_B, ("198.51.100.77:51820",))))
    assert shaped.peers["b"].endpoints == (PUB_B,)
    # a handshake at that endpoint makes it direct; the report says so
    book.handshakes([status(KEY_B, 2.0, PUB_B)], now=2.5)
    report = book.report("b")
    assert report is not None and report["path"] == "direct"
    assert report["endpoint"] == PUB_B and report["relay"] is None


def test_the_side_with_the_lower_device_id_leads() -> None:
    book = PathBook()
    book.update_map(netmap(peer("b", KEY_B, (PUB_B,)), peer("0", KEY_C, ())), now=1.0)
    assert book.machines["b"].leads and not book.machines["0"].leads  # this device is "a"


def test_invalid_endpoints_never_reach_a_machine() -> None:
    book = PathBook()
    actions = book.update_map(netmap(peer("b", KEY_B, ("127.0.0.1:1", "nonsense", PUB_B))), 1.0)
    assert actions == [SetEndpoint("b", PUB_B)]


def test_unchanged_map_changes_nothing_and_gone_peers_release_their_relay() -> None:
    book = PathBook(PathTimers(probe_timeout=1.0))
    m = netmap(peer("b", KEY_B, (PUB_B,)))
    book.update_map(m, 0.0)
    assert book.update_map(m, 0.5) == []
    book.tick(1.0)  # probe timed out: asks for a relay
    assert book.machines["b"].state is PathState.RELAY_PENDING
    assert book.update_map(netmap(version=2), 2.0) == [ReleaseRelay("b")]
    assert book.machines == {} and book.shape(netmap()).peers == {}


def test_every_direct_probe_resets_the_peer() -> None:
    book = PathBook(PathTimers(probe_timeout=1.0))
    book.update_map(netmap(peer("b", KEY_B, (PUB_B,))), 1.0)
    action = SetEndpoint("b", PUB_B)
    assert book.machines["b"].state is PathState.PROBING_DIRECT
    assert book.needs_reset(action)
    book.handshakes([status(KEY_B, 1.2, PUB_B)], 1.6)  # direct now: nothing to reset
    assert book.machines["b"].state is PathState.DIRECT
    assert not book.needs_reset(action)
    book.resetting.add("b")
    assert "b" not in book.shape(netmap(peer("b", KEY_B, (PUB_B,)))).peers


def test_the_relay_endpoint_resets_the_peer_until_a_handshake_goes_through() -> None:
    book = PathBook()
    book.local_nat(LocalNat(0.0, NatType.SYMMETRIC))
    sym = Peer("b", "b", KEY_B, ("100.64.0.2/32",), ("100.64.0.2/32",), (PUB_B,), nat="symmetric")
    assert book.update_map(netmap(sym), 1.0) == [RequestRelay("b")]
    binding = RelayBinding("r1", ("198.51.100.9", 3480), RELAY, True)
    (action,) = book.relay_ready("b", binding, 1.5)
    assert action == SetEndpoint("b", RELAY) and book.needs_reset(action)
    assert book.tick(2.5) == [action] and book.needs_reset(action)  # a kick
    book.handshakes([status(KEY_B, 2.7, RELAY)], 2.8)
    assert not book.needs_reset(action) and book.next_deadline() is None


def test_a_nat_verdict_during_a_probe_asks_for_a_relay_at_once() -> None:
    book = PathBook()
    sym = Peer("b", "b", KEY_B, ("100.64.0.2/32",), ("100.64.0.2/32",), (PUB_B,), nat="symmetric")
    assert book.update_map(netmap(sym), 0.0) == []  # a symmetric peer's address: waited on
    assert book.local_nat(LocalNat(0.1, NatType.SYMMETRIC)) == [RequestRelay("b")]


class FakeNet:
    """The gateway's tickets and the relays, in memory."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, tuple[str, ...]]] = []
        self.dead: set[str] = set()
        self.relays = ["r1", "r2"]

    async def ticket(self, peer_id: str, avoid: Sequence[str]) -> str:
        self.asked.append((peer_id, tuple(avoid)))
        choice = [r for r in self.relays if r not in avoid]
        if not choice:
            raise Unavailable("no relay is up")
        return choice[0]

    async def bind(self, relay_id: Any) -> RelayBinding:
        port = 40000 if relay_id == "r1" else 41000
        host = "198.51.100.1" if relay_id == "r1" else "198.51.100.2"
        return RelayBinding(str(relay_id), (host, 3480), f"{host}:{port}", True)

    async def probe(self, control: Addr) -> None:
        if control[0] == "198.51.100.1" and "r1" in self.dead:
            raise Unavailable("no pong")


def _clock() -> Any:
    """Seconds since the test began, like the machines' own timeline (starting at 0)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    return lambda: loop.time() - start


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_runner_binds_at_a_relay_and_moves_when_it_dies() -> None:
    net = FakeNet()
    book = PathBook(PathTimers(probe_timeout=0.05))
    book.local_nat(LocalNat(0.0, NatType.SYMMETRIC))
    applied: list[NetMap] = []
    m = netmap(peer("b", KEY_B, (PUB_B,)))

    async def read_status() -> Sequence[PeerStatus]:
        return [status(KEY_B, None, None)]

    async def reapply() -> None:
        applied.append(book.shape(m))

    hooks = RelayHooks(net.ticket, net.bind, net.probe, ping_interval=0.02, misses=2)
    runner = PathRunner(book, hooks, read_status, reapply, clock=_clock())
    await runner.perform(book.update_map(m, 0.0))
    task = asyncio.create_task(runner.run())
    try:
        await _until(lambda: book.relays.get("b") == "r1")
        assert applied[-1].peers["b"].endpoints == ("198.51.100.1:40000",)
        report = book.report("b")
        assert report is not None and report["path"] == "relayed" and report["relay"] == "r1"
        net.dead.add("r1")
        await _until(lambda: book.relays.get("b") == "r2")
        assert applied[-1].peers["b"].endpoints == ("198.51.100.2:41000",)
        assert net.asked[-1] == ("b", ("r1",))  # the dead relay is avoided
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.asyncio
async def test_runner_reports_a_failed_path_when_no_relay_can_be_had() -> None:
    net = FakeNet()
    net.relays = []
    book = PathBook(PathTimers(probe_timeout=0.05))
    book.local_nat(LocalNat(0.0, NatType.UDP_BLOCKED))
    m = netmap(peer("b", KEY_B, (PUB_B,)))

    async def read_status() -> Sequence[PeerStatus]:
        return []

    async def reapply() -> None:
        return None

    hooks = RelayHooks(net.ticket, net.bind, net.probe)
    runner = PathRunner(book, hooks, read_status, reapply, clock=_clock())
    await runner.perform(book.update_map(m, 0.0))
    await _until(lambda: book.machines["b"].state is PathState.FAILED)
    report = book.report("b")
    assert report is not None
    assert report["reason"] == (
        "UDP blocked on this network; no relay: cannot bind at a relay: no relay is up"
    )


def test_the_peers_nat_type_from_the_map_skips_futile_probes() -> None:
    book = PathBook()
    book.local_nat(LocalNat(0.0, NatType.SYMMETRIC))
    sym = Peer("b", "b", KEY_B, ("100.64.0.2/32",), ("100.64.0.2/32",), (PUB_B,), nat="symmetric")
    assert book.update_map(netmap(sym), 1.0) == [RequestRelay("b")]
    report = book.report("b")
    assert (
        report is not None
        and report["reason"] == "asking for a relay: both sides behind symmetric NAT"
    )


@pytest.mark.asyncio
async def test_a_changed_nat_mapping_renews_relay_bindings_at_once() -> None:
    net = FakeNet()
    binds: list[str] = []

    async def bind(relay_id: Any) -> RelayBinding:
        binds.append(str(relay_id))
        return await net.bind(relay_id)

    book = PathBook(PathTimers(probe_timeout=0.05))
    book.local_nat(LocalNat(0.0, NatType.SYMMETRIC))
    m = netmap(peer("b", KEY_B, (PUB_B,)))

    async def read_status() -> Sequence[PeerStatus]:
        return []

    async def reapply() -> None:
        return None

    hooks = RelayHooks(net.ticket, bind, net.probe, ping_interval=0.02, rebind_interval=3600)
    runner = PathRunner(book, hooks, read_status, reapply, clock=_clock())
    await runner.perform(book.update_map(m, 0.0))
    task = asyncio.create_task(runner.run())
    try:
        await _until(lambda: len(binds) == 1)
        await asyncio.sleep(0.1)
        assert len(binds) == 1  # nothing renews before the hour is up...
        runner.rebind_all()
        await _until(lambda: len(binds) == 2)  # ...but a new mapping renews at once
        assert book.relays["b"] == "r1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_side_waiting_for_its_peer_rebinds_sooner_until_the_peer_is_bound() -> None:
    """The relay expires an allocation that forwards nothing: a side whose peer has not
    bound yet binds again after ping_interval, doubling, and once the peer is bound
    only every rebind_interval."""
    net = FakeNet()
    binds: list[float] = []
    clock = None

    async def bind(relay_id: Any) -> RelayBinding:
        assert clock is not None
        binds.append(clock())
        fresh = await net.bind(relay_id)
        return replace(fresh, peer_bound=len(binds) >= 4)  # the peer binds at the 4th

    book = PathBook(PathTimers(probe_timeout=0.05))
    book.local_nat(LocalNat(0.0, NatType.SYMMETRIC))
    m = netmap(peer("b", KEY_B, (PUB_B,)))

    async def read_status() -> Sequence[PeerStatus]:
        return []

    async def reapply() -> None:
        return None

    hooks = RelayHooks(net.ticket, bind, net.probe, ping_interval=0.02, rebind_interval=3600)
    clock = _clock()
    runner = PathRunner(book, hooks, read_status, reapply, clock=clock)
    await runner.perform(book.update_map(m, 0.0))
    task = asyncio.create_task(runner.run())
    try:
        await _until(lambda: len(binds) == 4)
        gaps = [b - a for a, b in pairwise(binds)]
        assert 0.015 <= gaps[0] < gaps[2]  # sooner while waiting, the wait doubling
        await asyncio.sleep(0.3)
        assert len(binds) == 4  # the peer is bound: nothing before the hour is up
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


SYM_B = "198.51.100.14:51820"  # a symmetric-NAT peer's public address (listen port)


@pytest.mark.asyncio
async def test_an_easy_side_predicts_towards_a_symmetric_peer_without_resetting_it() -> None:
    """Behind an endpoint-independent mapping, a peer behind symmetric NAT: the runner
    sends a bounded port prediction towards the peer's published address, and never
    removes and re-adds the peer for that address (the peer's handshake must land)."""
    net = FakeNet()
    book = PathBook(PathTimers(probe_timeout=0.2))
    book.local_nat(LocalNat(0.0, NatType.EIM, "198.51.100.10:51820"))
    sym = Peer("b", "b", KEY_B, ("100.64.0.2/32",), ("100.64.0.2/32",), (SYM_B,), nat="symmetric")
    plans: list[PredictionPlan] = []

    async def predict(plan: PredictionPlan) -> int:
        plans.append(plan)
        return len(plan.ports)

    async def read_status() -> Sequence[PeerStatus]:
        return []

    async def reapply() -> None:
        return None

    hooks = RelayHooks(net.ticket, net.bind, net.probe)
    runner = PathRunner(book, hooks, read_status, reapply, clock=_clock(), predict=predict)
    actions = book.update_map(netmap(sym), 0.0)
    assert not any(book.needs_reset(a) for a in actions if isinstance(a, SetEndpoint))
    await runner.perform(actions)
    await _until(lambda: bool(plans))
    assert plans[0].address == "198.51.100.14" and plans[0].ports[0] == 51820
    assert len(plans[0].ports) <= MAX_PROBES


@pytest.mark.asyncio
async def test_a_reset_does_not_throw_away_the_session_the_peer_just_set_up() -> None:
    """The peer's handshake lands between the runner's poll and a reset that a new map
    asks for: the read just before the reset shows the new session, so the peer is not
    removed and re-added (which would destroy the session on this side only) and the
    path is direct where the peer came from. Without a new session the reset happens."""
    book = PathBook(PathTimers(probe_timeout=5.0, kick=1.0))
    book.local_nat(LocalNat(0.0, NatType.OPEN, "198.51.100.10:51820"))
    roamed = "198.51.100.16:37850"
    device: list[PeerStatus] = [status(KEY_B, None, None)]
    resets: list[set[str]] = []

    async def read_status() -> Sequence[PeerStatus]:
        return device

    async def reapply() -> None:
        resets.append(set(book.resetting))

    now = [0.0]
    runner = PathRunner(book, RelayHooks(FakeNet().ticket, FakeNet().bind, FakeNet().probe),
                        read_status=read_status, reapply=reapply, clock=lambda: now[0])  # fmt: skip
    await runner.perform(book.update_map(netmap(peer("b", KEY_B, (PUB_B,))), 0.0))
    assert resets[0] == {"b"}  # the first probe resets: the read before it shows nothing
    now[0] = 0.5
    await runner.perform(book.handshakes(device, 0.5))  # the poll: nothing yet
    now[0] = 0.8
    device[:] = [status(KEY_B, 0.7, roamed)]  # the peer's handshake, after the poll
    resets.clear()
    moved = netmap(peer("b", KEY_B, ("203.0.113.6:51820",)), version=2)
    await runner.perform(book.update_map(moved, 0.8))
    assert book.machines["b"].state is PathState.DIRECT
    assert all(not r for r in resets) and book.chosen["b"] == roamed
