"""Path-MTU probing: the search, when peers are probed, the MSS clamp it feeds, status."""

from __future__ import annotations

import struct
import time
from dataclasses import replace
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.dataplane.facade import DataPlane, PeerStatus
from agent.dataplane.firewall import Firewall
from agent.dataplane.mss import mss_for
from agent.pmtu.prober import (
    PmtuProber,
    _is_reply,
    _request,
    _tunnel_target,
    icmp_checksum,
)
from agent.pmtu.search import FLOOR, HANDSHAKE_FRESH, MtuSearch, PeerSeen, PmtuBook
from lab.firewall_fakes import FakeNft, netmap, peer
from wiregate.cli.device import format_status
from wiregate.model import NetMap


def run_search(
    search: MtuSearch, passes: int, *, icmp_at: int | None = None, lossy: int = 0
) -> MtuSearch:
    """Drive ``search`` against a path carrying inner packets up to ``passes`` bytes.

    ``icmp_at``: the underlay PMTU a router reports (frag-needed) once a probe
    is too big; ``lossy``: the first so many probes are lost whatever their size.
    """
    underlay: int | None = None
    for _ in range(100):
        size = search.next_size()
        if size is None:
            return search
        if size > passes and icmp_at is not None:
            underlay = icmp_at
        if lossy:
            lossy -= 1
            search.lost(size, underlay)
        elif size <= passes:
            search.reply(size, underlay)
        else:
            search.lost(size, underlay)
    raise AssertionError("the search did not end")


def test_a_clean_path_costs_one_probe() -> None:
    search = run_search(MtuSearch(ceiling=1440, floor=576, overhead=60), passes=1440)
    assert (search.result, search.probes, search.frag_needed, search.black_hole) == (
        1440, 1, False, False,
    )  # fmt: skip


def test_frag_needed_caps_the_ceiling_at_once() -> None:
    search = run_search(MtuSearch(ceiling=1440, floor=576, overhead=60), passes=1216, icmp_at=1280)
    # 1280 - 60 = 1220, rounded down to WireGuard's 16-byte padding
    assert search.result == 1216 and search.frag_needed and not search.black_hole
    assert search.probes == 2  # the ceiling (lost, ICMP), then the capped ceiling


def test_a_black_hole_is_found_by_bisection() -> None:
    search = run_search(MtuSearch(ceiling=1440, floor=576, overhead=60), passes=1216)
    assert search.result == 1216 and search.black_hole and not search.frag_needed
    assert search.probes <= 2 * 12  # two tries per lost size, a dozen sizes at most


def test_a_silent_peer_has_no_result() -> None:
    search = run_search(MtuSearch(ceiling=1440, floor=576, overhead=60), passes=0)
    assert search.result is None and not search.black_hole
    assert search.probes == 4  # ceiling twice, floor twice


def test_one_lost_probe_is_retried_not_taken_as_the_limit() -> None:
    search = run_search(MtuSearch(ceiling=1440, floor=576, overhead=60), passes=1440, lossy=1)
    assert search.result == 1440 and not search.black_hole


@given(
    passes=st.integers(min_value=576, max_value=1500),
    ceiling=st.integers(min_value=1280, max_value=1500),
)
def test_the_search_finds_the_exact_limit(passes: int, ceiling: int) -> None:
    search = run_search(MtuSearch(ceiling=ceiling, floor=576, overhead=60), passes=passes)
    assert search.result == min(passes, ceiling)
    assert search.probes <= 2 * 12


def seen(key: str, handshake: float | None, endpoint: str = "192.0.2.1:51820") -> PeerSeen:
    return PeerSeen(key, endpoint, handshake)


def finished(mtu: int | None) -> MtuSearch:
    search = MtuSearch(ceiling=1440, floor=FLOOR[4], overhead=60)
    return run_search(search, passes=mtu or 0)


def test_peers_are_probed_after_a_handshake_then_on_the_interval() -> None:
    book = PmtuBook(interval=600, retry=60)
    now = 10_000.0
    assert book.due([seen("k1", None), seen("k2", now - HANDSHAKE_FRESH - 1)], now) is None
    peer = book.due([seen("k1", now - 5)], now)
    assert peer is not None and peer.public_key == "k1"
    assert book.record(peer, finished(1216), now)
    assert book.due([seen("k1", now)], now + 599) is None
    assert book.due([seen("k1", now + 600)], now + 600) == seen("k1", now + 600)
    assert not book.record(peer, finished(1216), now + 600)  # same result: nothing to re-apply
    assert book.path_mtus() == {"k1": 1216}


def test_a_moved_peer_is_probed_again_and_a_failed_one_sooner() -> None:
    book = PmtuBook(interval=600, retry=60)
    book.record(seen("k1", 1.0), finished(1440), 100.0)
    book.record(seen("k2", 1.0), finished(None), 100.0)
    assert book.due([seen("k1", 150.0, "198.51.100.7:51820")], 150.0) is not None
    assert book.due([seen("k2", 150.0)], 150.0) is None
    assert book.due([seen("k2", 160.0)], 160.0) is not None
    book.forget_except(["k2"])
    assert set(book.results) == {"k2"} and book.path_mtus() == {}
    assert book.to_dict()["searches"] == 2


def test_never_probed_peers_come_first() -> None:
    book = PmtuBook()
    book.record(seen("old", 1.0), finished(1440), 0.0)
    peer = book.due([seen("old", 900.0), seen("new", 900.0)], 1000.0)
    assert peer is not None and peer.public_key == "new"


def test_mss_is_the_path_mtu_minus_ip_and_tcp_headers() -> None:
    assert (mss_for(1216, 4), mss_for(1216, 6), mss_for(100, 4)) == (1176, 1156, 536)


def test_the_firewall_clamps_by_default_and_writes_only_when_an_mtu_changes() -> None:
    nm = netmap(peer(2, None))
    nft = FakeNft()
    fw = Firewall("wg0", nft)
    fw.apply(nm, repair=True)
    assert "rt mtu" in nft.scripts[0] and "1176" not in nft.scripts[0]
    fw.apply(nm)
    fw.path_mtu = {nm.peers["d2"].public_key: 1216}
    fw.apply(nm)
    fw.apply(nm)
    assert len(nft.scripts) == 3 and nft.elements["mss4"] == {"100.64.0.2 : 1176"}
    fw.path_mtu = {nm.peers["d2"].public_key: 1300}
    fw.apply(nm)
    assert nft.elements["mss4"] == {"100.64.0.2 : 1260"} and len(nft.scripts) == 4


def test_echo_requests_are_padded_to_the_size_and_replies_matched() -> None:
    request = _request(4, 0x1234, 7, 1216)
    assert len(request) + 20 == 1216 and icmp_checksum(request) == 0
    reply = bytes([0x45]) + b"\0" * 19 + struct.pack("!BBHHH", 0, 0, 0, 0x1234, 7)
    assert _is_reply(4, reply, 0x1234, 7) and not _is_reply(4, reply, 0x1234, 8)
    assert len(_request(6, 1, 1, 1280)) + 40 == 1280
    assert _is_reply(6, struct.pack("!BBHHH", 129, 0, 0, 1, 1), 1, 1)
    assert not _is_reply(6, b"\x81", 1, 1)


def test_the_probe_targets_the_peers_ipv4_tunnel_address() -> None:
    nm = netmap(peer(2, None))
    assert _tunnel_target(nm, nm.peers["d2"].public_key) == "100.64.0.2"
    assert _tunnel_target(nm, "unknown") is None and _tunnel_target(None, "k") is None


@pytest.mark.parametrize("mtu", [1216, None])
def test_status_text_shows_the_path_mtu(mtu: int | None) -> None:
    doc = {"peers": [{"name": "b", "addresses": ["100.64.0.2/32"], "path_mtu": mtu}]}
    assert ("path MTU 1216" in format_status(doc)) is (mtu is not None)


class FakeDataPlane:
    """What the prober uses of the data plane: the interface, live peers, the firewall."""

    def __init__(self, peers: list[PeerStatus]) -> None:
        self.interface = "wg0"
        self.peers = peers
        self.firewall = Firewall("wg0", FakeNft())

    def status(self) -> tuple[PeerStatus, ...]:
        return tuple(self.peers)


async def test_the_prober_searches_a_fresh_peer_and_reclamps_once() -> None:
    nm = netmap(peer(2, None))
    key = nm.peers["d2"].public_key
    live = PeerStatus(key, "192.0.2.9:51820", time.time(), 0, 0, ())
    dataplane = FakeDataPlane([live])
    sent: list[tuple[str, int]] = []
    applied: list[int] = []

    def send(interface: str, target: str, size: int, timeout: float, seq: int) -> bool:
        sent.append((target, size))
        return size <= 1216  # a black hole above 1216 bytes

    async def apply(netmap_: NetMap) -> None:
        applied.append(netmap_.version)

    prober = PmtuProber(
        cast(DataPlane, dataplane), lambda: nm, apply, fwmark=0x5747,
        send=send, underlay=lambda _e, _m: (1500, 4), link_mtu=lambda _i: 1440,
    )  # fmt: skip
    assert await prober.step(time.time())
    assert sent[0] == ("100.64.0.2", 1440) and dataplane.firewall.path_mtu == {key: 1216}
    assert applied == [1]  # the map re-applied: the clamp follows the new MTU
    assert prober.peer_doc(key)["path_mtu"] == 1216 and prober.peer_doc("x")["pmtu"] is None
    assert prober.to_dict()["black_holes"] == 1
    assert not await prober.step(time.time())  # probed: nothing due until the interval
    assert applied == [1]


async def test_a_map_that_arrives_during_the_search_is_the_one_reapplied() -> None:
    old, new = netmap(peer(2, None)), netmap(peer(2, None), peer(3, None))
    new = replace(new, version=2)
    maps = [old]
    key = old.peers["d2"].public_key
    dataplane = FakeDataPlane([PeerStatus(key, "192.0.2.9:51820", time.time(), 0, 0, ())])
    applied: list[int] = []

    def send(interface: str, target: str, size: int, timeout: float, seq: int) -> bool:
        maps.append(new)  # the stream delivered a newer map while probes were in flight
        return size <= 1216

    async def apply(netmap_: NetMap) -> None:
        applied.append(netmap_.version)

    prober = PmtuProber(
        cast(DataPlane, dataplane), lambda: maps[-1], apply, fwmark=0x5747,
        send=send, underlay=lambda _e, _m: (1500, 4), link_mtu=lambda _i: 1440,
    )  # fmt: skip
    assert await prober.step(time.time())
    assert applied == [2]  # never the map from before the search: it would drop peer d3
