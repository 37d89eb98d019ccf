"""Host traffic wired into the data plane (agent.dataplane.facade + hostplane), on fakes."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

from agent.dataplane.backend import LivePeer, MemoryBackend
from agent.dataplane.facade import DataPlane
from agent.dataplane.hosttraffic import HostPolicy
from lab.dataplane_fakes import IFACE, PRIVATE, MemoryLinks, netmap, peer
from lab.fakes import FakeClock
from wiregate.errors import DataPlaneError
from wiregate.model import NetMap, Peer

WALL = 1_800_000_000.0
HOST2, HOST3 = ipaddress.ip_network("10.0.0.2/32"), ipaddress.ip_network("10.0.0.3/32")


class FakeNft:
    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.fail = False

    def run(self, script: str) -> None:
        if self.fail:
            raise DataPlaneError("nft: Operation not permitted")
        self.scripts.append(script)


def make(
    mode: str, **kw: object
) -> tuple[DataPlane, MemoryBackend, MemoryLinks, FakeNft, list[float]]:
    backend, links, nft, wall = MemoryBackend(), MemoryLinks(), FakeNft(), [WALL]
    backend.create(IFACE)
    policy = HostPolicy(mode=mode, **kw)  # type: ignore[arg-type]
    dp = DataPlane(
        interface=IFACE, private_key=PRIVATE, listen_port=51820, fwmark=0xCA6C, table=51820,
        rule_priority=5210, mtu=1420, run_dir=Path("/nonexistent"), clock=FakeClock(1000.0),
        wireguard=backend, links=links, host_policy=policy, host_nft=nft, wall=lambda: wall[0],
    )  # fmt: skip
    dp.setup()
    return dp, backend, links, nft, wall


def nodes() -> NetMap:
    a = replace(peer(0, "10.244.1.0/24", "10.0.0.2/32"), tags=("tag:node",))
    b = replace(peer(1, "10.244.2.0/24", "10.0.0.3/32"), tags=("tag:node",))
    return netmap([a, b])


def shake(backend: MemoryBackend, nm: NetMap, index: int, when: float) -> None:
    device = backend.devices[IFACE]
    key = list(nm.peers.values())[index].public_key
    peers = dict(device.peers)
    peers[key] = replace(peers[key], last_handshake=when)
    backend.devices[IFACE] = replace(device, peers=peers)


def test_nonstrict_adds_a_host_route_once_the_peer_shakes_hands() -> None:
    dp, backend, links, nft, wall = make("nonstrict")
    nm = nodes()
    dp.apply(nm)
    assert HOST2 not in links.live.routes and HOST3 not in links.live.routes
    assert ipaddress.ip_network("10.244.1.0/24") in links.live.routes  # pods: always
    assert dp.host.tracker.fallbacks == 2  # both start in clear
    assert "drop" not in nft.scripts[-1] and "10.0.0.2" in nft.scripts[-1]
    shake(backend, nm, 0, WALL - 5)
    assert dp.refresh_host_traffic(nm) is True
    assert HOST2 in links.live.routes and HOST3 not in links.live.routes
    assert dp.refresh_host_traffic(nm) is False  # nothing changed: no apply
    wall[0] += 200  # the handshake goes stale: back to clear, counted
    assert dp.refresh_host_traffic(nm) is True
    assert HOST2 not in links.live.routes and dp.host.tracker.fallbacks == 3
    doc = dp.host.to_dict()
    assert doc["mode"] == "nonstrict" and doc["fallbacks"] == 3
    assert {d["address"]: d["state"] for d in doc["destinations"]} == {
        "10.0.0.2/32": "clear",
        "10.0.0.3/32": "clear",
    }


def test_strict_routes_at_once_and_drops_clear_traffic() -> None:
    dp, _, links, nft, _ = make("strict")
    dp.apply(nodes())
    assert {HOST2, HOST3} <= links.live.routes
    assert 'counter name "clear_out" drop' in nft.scripts[-1]
    assert dp.host.plan.counts()["held"] == 2


def test_exempt_address_stays_out_of_the_tunnel_and_the_filter() -> None:
    dp, _, links, nft, _ = make("strict", exempt=frozenset({HOST2}))
    dp.apply(nodes())
    assert HOST2 not in links.live.routes and HOST3 in links.live.routes
    assert "10.0.0.2" not in nft.scripts[-1]


def test_off_keeps_todays_behaviour_and_removes_a_left_over_filter_once() -> None:
    dp, _, links, nft, _ = make("off")
    dp.apply(nodes())
    assert {HOST2, HOST3} <= links.live.routes
    assert len(nft.scripts) == 1 and "delete table inet wiregate-host" in nft.scripts[0]
    dp.apply(replace(nodes(), version=2))
    assert len(nft.scripts) == 1 and dp.refresh_host_traffic(nodes()) is False


def test_off_without_nftables_is_no_problem() -> None:
    dp, _, _, nft, _ = make("off")
    nft.fail = True
    assert dp.apply(nodes()).problems == ()


def test_teardown_after_a_restart_removes_the_table_a_previous_run_wrote() -> None:
    dp, _, _, nft, _ = make("strict")  # a new agent process: it wrote nothing yet
    dp.teardown()
    assert nft.scripts[-1].rstrip().endswith("delete table inet wiregate-host")


def test_a_filter_failure_is_a_problem_not_a_crash() -> None:
    dp, _, links, nft, _ = make("strict")
    nft.fail = True
    result = dp.apply(nodes())
    assert any("host traffic filter" in p for p in result.problems)
    assert HOST2 in links.live.routes


def test_teardown_removes_the_table() -> None:
    dp, _, _, nft, _ = make("strict")
    dp.apply(nodes())
    dp.teardown()
    assert nft.scripts[-1].rstrip().endswith("delete table inet wiregate-host")


def test_vm_peers_single_routes_are_not_host_traffic() -> None:
    dp, _, links, _, _ = make("nonstrict")
    vm: Peer = peer(0, "192.168.9.9/32")  # no tag:node
    dp.apply(netmap([vm]))
    assert ipaddress.ip_network("192.168.9.9/32") in links.live.routes


def test_live_peer_handshake_is_seen_on_apply() -> None:
    dp, backend, links, _, _ = make("nonstrict")
    nm = nodes()
    dp.apply(nm)
    shake(backend, nm, 1, WALL - 1)
    dp._belief.forget()  # the next apply reads the device back
    dp.apply(replace(nm, version=2))
    assert HOST3 in links.live.routes
    assert isinstance(backend.devices[IFACE].peers[nm.peers["d1"].public_key], LivePeer)


def test_a_live_idle_peer_stays_fresh_by_what_it_sends() -> None:
    dp, backend, links, _, wall = make("nonstrict")
    nm = nodes()
    dp.apply(nm)
    shake(backend, nm, 0, WALL - 5)
    dp.refresh_host_traffic(nm)
    key = nm.peers["d0"].public_key
    for _ in range(10):  # 100 s without a new handshake, but a keepalive each time
        wall[0] += 10
        device = backend.devices[IFACE]
        peers = dict(device.peers)
        peers[key] = replace(peers[key], rx=peers[key].rx + 32)
        backend.devices[IFACE] = replace(device, peers=peers)
        dp.refresh_host_traffic(nm)
        assert HOST2 in links.live.routes
    wall[0] += 31  # then silence: stale, back to clear
    dp.refresh_host_traffic(nm)
    assert HOST2 not in links.live.routes
