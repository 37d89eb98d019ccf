"""The data plane's incremental applies (agent.dataplane.facade) on in-memory fakes.

The WireGuard side is :class:`MemoryBackend`; the link layer is :class:`MemoryLinks`
below; time is an injected clock. Out-of-band changes are made by editing the
fakes directly, behind the data plane's back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dataplane.backend import DeviceUpdate, MemoryBackend
from agent.dataplane.facade import DataPlane
from agent.dataplane.reconcile import diff
from lab.dataplane_fakes import IFACE, KEYS, PRIVATE, MemoryLinks, netmap, peer
from lab.fakes import FakeClock
from wiregate.errors import DataPlaneError
from wiregate.model import NetMap

RESYNC = 60.0


def make() -> tuple[DataPlane, MemoryBackend, MemoryLinks, FakeClock]:
    backend, links, clock = MemoryBackend(), MemoryLinks(), FakeClock(1000.0)
    backend.create(IFACE)
    dp = DataPlane(
        interface=IFACE,
        private_key=PRIVATE,
        listen_port=51820,
        fwmark=0xCA6C,
        table=51820,
        rule_priority=5210,
        mtu=1420,
        run_dir=Path("/nonexistent"),
        resync_interval=RESYNC,
        clock=clock,
        wireguard=backend,
        links=links,
    )
    dp.setup()
    return dp, backend, links, clock


def converged(dp: DataPlane, backend: MemoryBackend, links: MemoryLinks, nm: NetMap) -> bool:
    """A full read-back diff of the fakes against ``nm`` finds nothing to do."""
    config = dp._builder.build(nm)
    return diff(config.device, backend.read(IFACE), config.device).is_empty and (
        links.live.routes == config.link.routes
    )


def test_setup_read_serves_the_first_apply() -> None:
    dp, backend, links, _ = make()
    assert (backend.reads, links.reads) == (1, 1)
    result = dp.apply(netmap([peer(i) for i in range(5)]))
    assert result.peers == 5 and result.problems == ()
    assert (backend.reads, links.reads) == (1, 1)
    assert converged(dp, backend, links, netmap([peer(i) for i in range(5)]))


def test_noop_apply_writes_and_reads_nothing() -> None:
    dp, backend, links, _ = make()
    peers = [peer(i) for i in range(20)]
    dp.apply(netmap(peers))
    log, reads = len(backend.log), (backend.reads, links.reads)
    again = dp.apply(netmap([replace(p) for p in peers], version=2))  # equal, not identical
    assert again.writes == 0 and again.peers == 20
    assert len(backend.log) == log and (backend.reads, links.reads) == reads


def test_single_peer_change_writes_that_peer_only() -> None:
    dp, backend, links, _ = make()
    peers = [peer(i) for i in range(50)]
    dp.apply(netmap(peers))
    before = (backend.reads, links.reads, links.writes, len(backend.log))
    peers[7] = peer(7, "10.77.0.0/24")
    result = dp.apply(netmap(peers, version=2))
    assert (backend.reads, links.reads) == before[:2]  # nothing read back
    update = backend.log[-1][1]
    assert len(backend.log) == before[3] + 1
    assert [p.public_key for p in update.peers] == [KEYS[7]]
    assert update.peers[0].update_only and update.peers[0].endpoint is None
    assert links.writes == before[2] + 1  # the one new route
    assert result.writes == 2
    assert converged(dp, backend, links, netmap(peers, version=2))


def test_added_and_removed_peers_are_written_alone() -> None:
    dp, backend, links, _ = make()
    dp.apply(netmap([peer(i) for i in range(10)]))
    result = dp.apply(netmap([peer(i) for i in range(1, 11)], version=2))
    update = backend.log[-1][1]
    assert {p.public_key: p.remove for p in update.peers} == {KEYS[0]: True, KEYS[10]: False}
    assert result.writes == 1 + 4  # one device transaction; two routes out, two in
    assert converged(dp, backend, links, netmap([peer(i) for i in range(1, 11)], version=2))


def test_out_of_band_removal_is_repaired_by_the_periodic_resync() -> None:
    dp, backend, links, clock = make()
    nm = netmap([peer(i) for i in range(3)])
    dp.apply(nm)
    live = backend.devices[IFACE]
    peers = {k: p for k, p in live.peers.items() if k != KEYS[1]}
    backend.devices[IFACE] = replace(live, peers=peers)  # behind the agent's back
    links.live = replace(links.live, routes=links.live.routes - {next(iter(links.live.routes))})
    clock.now += RESYNC - 1
    assert dp.apply(nm).writes == 0  # not yet noticed: no read-back
    assert KEYS[1] not in backend.devices[IFACE].peers
    clock.now += 1
    repaired = dp.apply(nm)
    assert repaired.writes == 2  # the peer (one transaction) and the route
    assert [p.public_key for p in backend.log[-1][1].peers] == [KEYS[1]]
    assert converged(dp, backend, links, nm)
    assert dp.apply(nm).writes == 0


def test_roamed_endpoint_is_not_fought_across_resyncs() -> None:
    dp, backend, _, clock = make()
    nm = netmap([peer(0)])
    dp.apply(nm)
    live = backend.devices[IFACE]
    roamed = replace(live.peers[KEYS[0]], endpoint="198.51.100.9:40000")
    backend.devices[IFACE] = replace(live, peers={KEYS[0]: roamed})
    clock.now += RESYNC
    assert dp.apply(nm).writes == 0
    assert backend.devices[IFACE].peers[KEYS[0]].endpoint == "198.51.100.9:40000"
    moved = dp.apply(netmap([peer(0, endpoint=99)], version=2))  # the map moves it
    assert moved.writes == 1
    assert backend.devices[IFACE].peers[KEYS[0]].endpoint == "192.0.2.99:51820"


class FlakyBackend(MemoryBackend):
    """Fails the next ``fail`` writes after applying them halfway (the first peer only)."""

    fail = 0

    def begin_write(self, name: str, update: DeviceUpdate) -> Callable[[], int]:
        if self.fail and not update.is_empty:
            self.fail -= 1
            super().begin_write(name, replace(update, peers=update.peers[:1]))
            raise DataPlaneError("write refused")
        return super().begin_write(name, update)


def test_failed_write_makes_the_next_apply_read_back() -> None:
    backend, links = FlakyBackend(), MemoryLinks()
    backend.create(IFACE)
    dp, _, _, _ = make()
    dp._injected, dp._links = backend, links
    dp.setup()
    nm = netmap([peer(i) for i in range(4)])
    backend.fail = 1
    with pytest.raises(DataPlaneError):
        dp.apply(nm)
    reads = backend.reads
    result = dp.apply(nm)
    assert backend.reads == reads + 1
    assert result.peers == 4 and converged(dp, backend, links, nm)
    assert len(backend.log[-1][1].peers) == 3  # the one that made it is left alone


def test_resync_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DataPlane(
            interface=IFACE,
            private_key=PRIVATE,
            listen_port=0,
            fwmark=1,
            table=1,
            rule_priority=1,
            run_dir=Path("/nonexistent"),
            resync_interval=0,
        )


# --- property: incremental applies end where a full reconcile would ----------

maps_st = st.lists(
    st.lists(
        st.tuples(st.integers(0, 11), st.sampled_from(["", "10.9.0.0/16", "10.9.4.0/24"])),
        max_size=8,
        unique_by=lambda t: t[0],
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(maps_st, st.lists(st.booleans(), min_size=6, max_size=6))
def test_incremental_applies_converge(maps: list[list[tuple[int, str]]], ticks: list[bool]) -> None:
    dp, backend, links, clock = make()
    for n, (spec, tick) in enumerate(zip(maps, ticks, strict=False)):
        nm = netmap([peer(i, *([extra] if extra else [])) for i, extra in spec], version=n + 1)
        result = dp.apply(nm)
        assert converged(dp, backend, links, nm)
        assert result.peers == len(dp._builder.build(nm).device.peers)
        if tick:
            clock.now += RESYNC
