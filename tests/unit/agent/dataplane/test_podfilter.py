"""Pod identity in the packet filter (pure): pods_from and pods_to as elements of a peer."""

from __future__ import annotations

from dataclasses import replace

from agent.dataplane.filterset import (
    ElementBook,
    PeerRule,
    listed_elements,
    peer_elements,
    table_script,
)
from agent.dataplane.firewall import Firewall
from lab.dataplane_fakes import netmap as dp_netmap
from lab.dataplane_fakes import peer as dp_peer
from lab.firewall_fakes import FakeNft, filtered_dataplane, netmap, peer

NODE = ("100.64.0.7/32", "fd7a::7/128", "10.244.1.0/24", "fd00:10:244:1::/64")


def node(
    pods_from: tuple[tuple[str, tuple[str, ...]], ...], flt: tuple[str, ...] | None = ()
) -> PeerRule:
    return PeerRule("node7", NODE, flt, None, "k7", pods_from=pods_from)


def test_pods_from_are_single_address_elements_in_the_peers_sets() -> None:
    got = peer_elements(node((
        ("10.244.1.5", ("tcp:5432", "icmp", "tcp:8000-8099")),
        ("fd00:10:244:1::5", ("udp:53",)),
    )))  # fmt: skip
    assert got.problems == () and got.restricted
    assert got.elements == {
        ("port4", "10.244.1.5 . 6 . 5432"),
        ("proto4", "10.244.1.5 . 1"),
        ("pod_port4_ranges", "10.244.1.5 . 6 . 8000-8099"),  # never overlapping the node's own
        ("port6", "fd00:10:244:1::5 . 17 . 53"),
    }


def test_a_pod_outside_the_peers_addresses_is_skipped_and_reported() -> None:
    got = peer_elements(node((("10.245.0.9", ("tcp:22",)), ("10.244.1.5", ("tcp:22",)))))
    assert got.elements == {("port4", "10.244.1.5 . 6 . 22")}
    assert got.problems == (
        "filter: peer node7: pod '10.245.0.9' is not among its addresses; skipped",
    )
    exit_node = PeerRule("x", ("0.0.0.0/0",), (), None, "kx", pods_from=(("10.9.9.9", ("tcp",)),))
    assert peer_elements(exit_node).elements == frozenset()  # under a default route only


def test_pod_rules_of_an_unrestricted_peer_add_nothing() -> None:
    open_node = node((("10.244.1.5", ("tcp:5432",)),), flt=None)
    assert peer_elements(open_node) == peer_elements(node((), flt=None))


def test_pods_to_match_the_peers_sources_and_the_pods_address() -> None:
    vm = PeerRule("vm", ("100.64.0.9/32", "10.50.0.0/16", "::/0"), ("icmp",), None, "k9",
                  pods_to=(("10.244.1.5", ("tcp:8080", "tcp:9000-9100")),))  # fmt: skip
    got = peer_elements(vm)
    assert got.elements - peer_elements(replace(vm, pods_to=())).elements == {
        ("to_port4", "100.64.0.9 . 10.244.1.5 . 6 . 8080"),
        ("to_port4_ranges", "100.64.0.9 . 10.244.1.5 . 6 . 9000-9100"),
        ("to_port4_ranges", "10.50.0.0/16 . 10.244.1.5 . 6 . 8080"),
        ("to_port4_ranges", "10.50.0.0/16 . 10.244.1.5 . 6 . 9000-9100"),
    }
    assert got.problems == ()
    exit_node = replace(vm, pods_to=(("fd00::5", ("tcp",)),))
    assert peer_elements(exit_node).problems == (
        "filter: peer vm: pod fd00::5: default route not opened",
    )


def test_the_table_matches_pods_to_by_source_and_destination() -> None:
    script = table_script("wg0")
    assert "ip saddr . ip daddr . meta l4proto . th dport @to_port4 accept" in script
    assert "ip6 saddr . meta l4proto . th dport @pod_port6_ranges accept" in script
    assert "\tset to_port6_ranges {\n\t\ttype ipv6_addr . ipv6_addr . inet_proto" in script


def test_a_pod_change_is_that_pods_elements_only() -> None:
    pods = tuple((f"10.244.1.{i}", ("tcp:5432",)) for i in range(2, 202))
    others = [
        PeerRule(f"n{i}", (f"100.64.1.{i}/32",), ("tcp:22",), None, f"k{i}") for i in range(99)
    ]
    book = ElementBook()
    book.update([*others, node(pods)])
    moved = tuple((a, ("tcp:5432", "udp:53") if a == "10.244.1.9" else r) for a, r in pods)
    change = book.update([*others, node(moved)])
    assert change.delete == frozenset()
    assert change.add == {("port4", "10.244.1.9 . 17 . 53")}
    assert book.update([*others, node(moved)]) == type(change)(frozenset(), frozenset())
    churned = tuple((f"10.244.1.{i}", ("tcp:5432",)) for i in range(3, 203))  # 1 gone, 1 new
    change = book.update([*others, node(churned)])
    assert {e for _, e in change.delete} == {"10.244.1.2 . 6 . 5432", "10.244.1.9 . 17 . 53"}
    assert change.add == {("port4", "10.244.1.202 . 6 . 5432")}


def test_the_firewall_writes_a_pod_change_as_elements_and_reads_them_back() -> None:
    nft = FakeNft()
    fw = Firewall("wg0", nft)
    node_peer = replace(peer(7, (), "10.244.1.0/24"), pods_from=(("10.244.1.5", ("tcp:5432",)),))
    vm = replace(peer(9, ("icmp",)), pods_to=(("10.244.1.5", ("tcp:8080",)),))
    assert fw.apply(netmap(node_peer, vm)) == ()
    created = len(nft.scripts)
    moved = replace(node_peer, pods_from=(("10.244.1.6", ("tcp:5432",)),))
    assert fw.apply(netmap(moved, vm)) == ()
    assert nft.scripts[created:] == [
        "delete element inet wiregate port4 { 10.244.1.5 . 6 . 5432 }\n"
        "add element inet wiregate port4 { 10.244.1.6 . 6 . 5432 }\n"
    ]
    held = listed_elements(nft.query_json("list table inet wiregate"))
    assert ("to_port4", "100.64.0.9 . 10.244.1.5 . 6 . 8080") in held
    nft.elements["port4"].discard("10.244.1.6 . 6 . 5432")  # drift: repaired element by element
    assert fw.apply(netmap(moved, vm), repair=True) == ()
    assert "10.244.1.6 . 6 . 5432" in nft.elements["port4"]


def test_the_data_plane_writes_a_pod_change_as_that_peers_elements_only() -> None:
    nft = FakeNft()
    dp = filtered_dataplane(nft)
    node = replace(dp_peer(0, "10.244.1.0/24"), filter=(),
                   pods_from=(("10.244.1.5", ("tcp:5432",)),))  # fmt: skip
    other = replace(dp_peer(1, "10.244.2.0/24"), filter=(),
                    pods_from=(("10.244.2.5", ("tcp:5432",)),))  # fmt: skip
    assert dp.apply(dp_netmap([node, other])).problems == ()
    table = nft.types
    written = len(nft.scripts)
    moved = replace(node, pods_from=(("10.244.1.6", ("tcp:5432",)),))
    result = dp.apply(dp_netmap([moved, other], version=2))
    assert result.problems == () and result.writes == 0  # WireGuard untouched
    assert nft.types is table and nft.scripts[written:] == [
        "delete element inet wiregate port4 { 10.244.1.5 . 6 . 5432 }\n"
        "add element inet wiregate port4 { 10.244.1.6 . 6 . 5432 }\n"
    ]
    dp.teardown()
