"""The packet filter's sets (pure): each peer's elements, the book's diff, the listing read back."""

from __future__ import annotations

import json
from pathlib import Path

from agent.dataplane import mss
from agent.dataplane.filterset import (
    SETS,
    ElementBook,
    PeerRule,
    element_script,
    listed_elements,
    peer_elements,
    peer_rules,
    skeleton_of,
    table_script,
)
from lab.firewall_fakes import netmap, peer

LISTING = Path(__file__).with_name("nft_listing.json")  # `nft -j list table` from the kernel

# The rules the listing was made from (a restricted peer, an open one, an exit node).
CAPTURED = [
    PeerRule("a", ("100.64.0.2/32", "fd7a::2/128", "10.244.0.0/16"),
             ("tcp:5432", "icmp", "tcp:8000-8099", "udp"), 1216, "ka"),
    PeerRule("b", ("100.64.0.3/32", "fd7a::3/128", "10.245.0.0/16"), None, None, "kb"),
    PeerRule("x", ("0.0.0.0/0", "::/0"), ("tcp:22", "tcp:20-30", "udp:53"), 1300, "kx"),
]  # fmt: skip


def test_a_restricted_peer_gets_one_element_per_source_and_allowance() -> None:
    rule = PeerRule("a", ("100.64.0.2/32", "fd7a::2/128", "10.244.0.0/16"),
                    ("tcp:5432", "icmp", "tcp:8000-8099", "udp"))  # fmt: skip
    got = peer_elements(rule)
    assert got.restricted and got.problems == () and got.anywhere == frozenset()
    assert got.elements == {
        ("port4", "100.64.0.2 . 6 . 5432"),
        ("port4_ranges", "100.64.0.2 . 6 . 8000-8099"),
        ("proto4", "100.64.0.2 . 1"),
        ("proto4", "100.64.0.2 . 17"),
        ("port6", "fd7a::2 . 6 . 5432"),
        ("port6_ranges", "fd7a::2 . 6 . 8000-8099"),
        ("proto6", "fd7a::2 . 58"),
        ("proto6", "fd7a::2 . 17"),
        ("port4_ranges", "10.244.0.0/16 . 6 . 5432"),
        ("port4_ranges", "10.244.0.0/16 . 6 . 8000-8099"),
        ("proto4_ranges", "10.244.0.0/16 . 1"),
        ("proto4_ranges", "10.244.0.0/16 . 17"),
    }


def test_an_open_peer_gets_its_addresses_and_prefixes_open() -> None:
    got = peer_elements(PeerRule("b", ("100.64.0.3/32", "fd7a::3/128", "10.245.0.0/16"), None))
    assert not got.restricted
    assert got.elements == {
        ("open4", "100.64.0.3"),
        ("open6", "fd7a::3"),
        ("proto4_ranges", "10.245.0.0/16 . 0-255"),
    }
    assert peer_elements(PeerRule("c", ("100.64.0.4/32",), ())).elements == frozenset()


def test_overlaps_within_a_peer_are_merged_so_no_two_elements_overlap() -> None:
    rule = PeerRule("m", ("10.0.0.0/16", "10.0.5.0/24", "10.1.0.0/16", "100.64.0.9/32"),
                    ("tcp:20-30", "tcp:22", "tcp:31", "udp", "udp:53", "tcp:100"))  # fmt: skip
    got = peer_elements(rule).elements
    assert ("port4_ranges", "10.0.0.0/15 . 6 . 20-31") in got  # nested and adjacent, merged
    assert ("proto4_ranges", "10.0.0.0/15 . 17") in got  # every UDP port: no UDP port element
    assert not any(". 17 . 53" in text for _, text in got)
    assert ("port4", "100.64.0.9 . 6 . 100") in got
    assert len(got) == 6


def test_bad_entries_are_skipped_and_reported() -> None:
    got = peer_elements(PeerRule("x", ("100.64.0.9/32", "not-an-ip"), ("tcp:99999", "tcp:22")))
    assert got.elements == {("port4", "100.64.0.9 . 6 . 22")}
    assert len(got.problems) == 2 and "not-an-ip" in got.problems[0]


def test_default_routes_go_to_the_any_sets_merged_over_peers() -> None:
    book = ElementBook()
    book.update(
        [
            PeerRule("x", ("0.0.0.0/0",), ("tcp:22", "tcp:20-30", "icmp"), 1300, "kx"),
            PeerRule("y", ("0.0.0.0/0", "::/0"), ("tcp:25-40", "udp"), 1400, "ky"),
        ]
    )
    assert book.elements() == {
        ("any_port", "ipv4 . 6 . 20-40"),
        ("any_proto", "ipv4 . 1"),
        ("any_proto", "ipv4 . 17"),
        ("any_proto", "ipv6 . 17"),
        ("any_port", "ipv6 . 6 . 25-40"),
        ("mss_any", "ipv4 : 1260"),  # the lower of the two path MTUs
        ("mss_any", "ipv6 : 1340"),
    }
    change = book.update([PeerRule("y", ("::/0",), None, None, "ky")])
    assert book.elements() == {("any_open", "ipv6")} == change.add
    assert len(change.delete) == 7


def test_a_one_peer_change_is_that_peers_elements_only() -> None:
    rules = [PeerRule(f"p{i}", (f"100.64.{i >> 8}.{i & 255}/32",), None, None, f"k{i}")
             for i in range(1000)]  # fmt: skip
    book = ElementBook()
    assert len(book.update(rules).add) == 1000
    rules[7] = PeerRule("p7", ("100.64.0.7/32", "10.77.0.0/24"), ("tcp:22",), None, "k7")
    change = book.update(rules)
    assert change.delete == {("open4", "100.64.0.7")}
    assert change.add == {
        ("port4", "100.64.0.7 . 6 . 22"),
        ("port4_ranges", "10.77.0.0/24 . 6 . 22"),
    }
    assert book.update(rules) == type(change)(frozenset(), frozenset())
    assert book.update(rules[:-1]).delete == {("open4", "100.64.3.231")}  # a peer removed


def test_an_address_moving_between_peers_in_one_map_is_not_touched() -> None:
    book = ElementBook()
    book.update([PeerRule("a", ("100.64.0.2/32",), None, None, "ka")])
    change = book.update([PeerRule("b", ("100.64.0.2/32",), None, None, "kb")])
    assert change.add == change.delete == frozenset()


def test_peer_rules_use_the_validated_peers_and_skip_the_refused() -> None:
    nm = netmap(peer(2, None), peer(3, ("icmp",)))
    rules = peer_rules(nm, keys={nm.peers["d3"].public_key})
    assert [r.name for r in rules] == ["host3"]
    assert peer_rules(nm, validated={}) == ()


def test_the_script_deletes_before_it_adds_grouped_by_set() -> None:
    script = element_script(
        [("open4", "100.64.0.3")], [("open4", "100.64.0.5"), ("open4", "100.64.0.4")]
    )
    assert script == (
        "delete element inet wiregate open4 { 100.64.0.3 }\n"
        "add element inet wiregate open4 { 100.64.0.4, 100.64.0.5 }\n"
    )
    assert element_script((), ()) == ""


def test_the_table_holds_every_set_and_fixed_rules() -> None:
    script = table_script("wg0")
    assert script.startswith("table inet wiregate\ndelete table inet wiregate\n")
    for name in SETS:
        assert f"\tset {name} {{\n" in script
    assert "ip saddr . meta l4proto . th dport @port4_ranges accept" in script
    assert script.count('iifname "wg0" jump from_tunnel') == 2
    assert script.rstrip().endswith('counter name "dropped" drop\n\t}\n}')
    assert "clamp_out" not in script and "mss4" not in script
    clamped = table_script("wg0", clamp=True)
    assert "\tmap mss4_ranges {\n" in clamped and "maxseg size set rt mtu" in clamped
    assert "\t\tct state established,related accept\n" in script  # stateful by default
    stateless = table_script("wg0", clamp=True, stateful=False)
    # no peer restricted: no ct, and the filter's chains are off the hooks (the clamp's stay)
    assert stateless == clamped.replace("\t\tct state established,related accept\n", "").replace(
        "\t\ttype filter hook input priority filter; policy accept;\n", "", 1
    ).replace("\t\ttype filter hook forward priority filter; policy accept;\n", "", 1)
    assert " ct " not in stateless and "type filter hook input priority mangle" in stateless


def test_the_kernels_listing_reads_back_as_the_elements_written() -> None:
    doc = json.loads(LISTING.read_text())
    book = ElementBook()
    book.update(CAPTURED)
    assert listed_elements(doc) == book.elements()
    shape = skeleton_of(doc)
    assert not any('"elem"' in item or '"handle"' in item for item in shape)
    assert any('"name": "from_tunnel"' in item for item in shape)


def test_mss_is_the_path_mtu_minus_ip_and_tcp_headers() -> None:
    assert (mss.mss_for(1216, 4), mss.mss_for(1216, 6), mss.mss_for(100, 4)) == (1176, 1156, 536)
    assert mss.element("100.64.0.2", 4, True, 1176) == ("mss4", "100.64.0.2 : 1176")
    assert mss.element("10.0.0.0/8", 4, False, 1176) == ("mss4_ranges", "10.0.0.0/8 . 6 : 1176")
    chains = mss.chains("wg0")
    assert chains["clamp_out"][-1] == "tcp option maxseg size set rt mtu"
    assert "tcp option maxseg size set ip6 saddr map @mss6" in chains["clamp_in"]
    assert 'oifname "wg0" tcp flags & (syn | rst) == syn jump clamp_out' in chains["mss_output"]
