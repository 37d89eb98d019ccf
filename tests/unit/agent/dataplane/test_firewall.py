"""When the packet filter writes what: the table once, then element operations, repairs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from agent.dataplane.backend import MemoryBackend
from agent.dataplane.facade import DataPlane
from agent.dataplane.firewall import Firewall
from lab.dataplane_fakes import IFACE, PRIVATE, MemoryLinks
from lab.dataplane_fakes import netmap as dp_netmap
from lab.dataplane_fakes import peer as dp_peer
from lab.firewall_fakes import FakeNft, filtered_dataplane, netmap, peer


def test_the_table_is_created_once_then_changed_by_elements() -> None:
    nft = FakeNft()
    fw = Firewall("wg0", nft)
    assert fw.apply(netmap(peer(2, ("icmp",)), peer(3, None)), repair=True) == ()
    # no table yet: created empty (its shape noted), then filled
    assert (
        fw.enforced and len(nft.scripts) == 2 and nft.scripts[0].startswith("table inet wiregate {")
    )
    assert nft.scripts[1].startswith("add element")
    assert nft.elements["proto4"] == {"100.64.0.2 . 1"} and nft.elements["open6"] == {"fd7a::3"}
    assert fw.apply(netmap(peer(2, ("icmp",)), peer(3, None))) == ()
    assert len(nft.scripts) == 2  # nothing changed: nothing written
    fw.apply(netmap(peer(2, ("tcp:22",)), peer(3, None)))
    assert nft.scripts[-1] == (
        "delete element inet wiregate proto4 { 100.64.0.2 . 1 }\n"
        "delete element inet wiregate proto6 { fd7a::2 . 58 }\n"
        "add element inet wiregate port4 { 100.64.0.2 . 6 . 22 }\n"
        "add element inet wiregate port6 { fd7a::2 . 6 . 22 }\n"
    )
    fw.teardown()
    assert nft.scripts[-1] == "table inet wiregate\ndelete table inet wiregate\n"
    assert not fw.enforced and nft.types is None


def test_a_repair_fixes_drifted_elements_one_by_one() -> None:
    nft = FakeNft()
    fw = Firewall("wg0", nft)
    nm = netmap(peer(2, ("icmp",)), peer(3, None))
    fw.apply(nm, repair=True)
    nft.elements["open4"].clear()  # someone deleted an element...
    nft.elements["port4"].add("100.64.0.9 . 6 . 22")  # ... and added one
    assert fw.apply(nm) == ()  # believed in sync: not read back
    assert fw.apply(nm, repair=True) == ()
    assert nft.scripts[-1] == (
        "delete element inet wiregate port4 { 100.64.0.9 . 6 . 22 }\n"
        "add element inet wiregate open4 { 100.64.0.3 }\n"
    )
    queries = nft.queries
    fw.apply(nm, repair=True)  # in sync: read back, nothing written
    assert nft.queries == queries + 1 and len(nft.scripts) == 3


def test_a_changed_rule_or_a_deleted_table_is_created_again() -> None:
    nft = FakeNft()
    fw = Firewall("wg0", nft)
    nm = netmap(peer(2, ("icmp",)))
    fw.apply(nm, repair=True)
    nft.tamper()
    fw.apply(nm, repair=True)
    assert nft.scripts[-1].startswith("table inet wiregate\ndelete table inet wiregate\n")
    assert "table inet wiregate {" in nft.scripts[-1] and len(nft.scripts) == 3  # one transaction
    assert nft.chains["from_tunnel"][-1] == 'counter name "dropped" drop'
    nft.run("table inet wiregate\ndelete table inet wiregate\n")
    assert fw.apply(nm, repair=True) == () and nft.elements["proto4"] == {"100.64.0.2 . 1"}


def test_a_refused_element_write_is_repaired_at_once() -> None:
    nft = FakeNft()
    fw = Firewall("wg0", nft)
    fw.apply(netmap(peer(2, None), peer(3, None), peer(4, ("udp",))), repair=True)
    nft.elements["open4"].discard("100.64.0.3")  # the delete below will be refused
    assert fw.apply(netmap(peer(2, None), peer(4, ("udp",)))) == ()
    assert nft.elements["open4"] == {"100.64.0.2"} and fw.enforced
    nft.refuse = "Error: Could not process rule: Device or resource busy"
    problems = fw.apply(netmap(peer(2, ("icmp",)), peer(4, ("udp",))))
    assert problems == () and nft.elements["proto4"] == {"100.64.0.2 . 1", "100.64.0.4 . 17"}


def test_connections_are_tracked_only_while_a_peer_is_restricted() -> None:
    nft = FakeNft()
    fw = Firewall("wg0", nft)
    stateful = "ct state established,related accept"
    fw.apply(netmap(peer(2, None)), repair=True)
    assert fw.enforced and stateful not in nft.chains["from_tunnel"]  # nothing to track
    assert nft.elements["open4"] == {"100.64.0.2"}
    fw.apply(netmap(peer(2, None), peer(3, None)))
    assert nft.scripts[-1] == (
        "add element inet wiregate open4 { 100.64.0.3 }\n"
        "add element inet wiregate open6 { fd7a::3 }\n"
    )
    fw.apply(netmap(peer(2, None), peer(3, ("tcp:22",))))  # the first restricted peer
    assert nft.scripts[-1].startswith("table inet wiregate\ndelete table inet wiregate\n")
    assert nft.chains["from_tunnel"][0] == stateful  # in one transaction with the elements
    assert nft.elements["port4"] == {"100.64.0.3 . 6 . 22"}
    fw.apply(netmap(peer(2, None), peer(3, ("tcp:80",))))
    assert nft.scripts[-1].startswith("delete element")  # same mode: elements only
    scripts = len(nft.scripts)
    assert fw.apply(netmap(peer(2, None), peer(3, ("tcp:80",))), repair=True) == ()
    assert len(nft.scripts) == scripts  # a repair keeps the stateful table
    fw.apply(netmap(peer(2, None), peer(3, None)))  # the last restricted peer goes
    assert stateful not in nft.chains["from_tunnel"] and "table inet" in nft.scripts[-1]
    assert nft.elements["open4"] == {"100.64.0.2", "100.64.0.3"} and not nft.elements["port4"]


def test_a_failing_nftables_is_a_problem_and_retried() -> None:
    nft = FakeNft()
    fw = Firewall("wg0", nft)
    nft.refuse = "nftables: Error: Could not process rule: Operation not supported"
    problems = fw.apply(netmap(peer(2, None)), repair=True)
    assert problems == ("packet filter not enforced: nftables: Error: Could not process rule: "
                        "Operation not supported",)  # fmt: skip
    assert not fw.enforced
    assert fw.apply(netmap(peer(2, None))) == () and fw.enforced  # retried on the next map


def test_missing_nftables_is_a_problem_only_when_a_peer_is_restricted() -> None:
    fw = Firewall("wg0", FakeNft(missing=True))
    problems = fw.apply(netmap(peer(2, ("icmp",))))
    assert problems == ("packet filter not enforced: nftables not found (install nftables)",)
    assert not fw.enforced
    assert fw.apply(netmap(peer(2, None))) == ()  # nothing to enforce: nothing to report
    fw.teardown()  # no nftables: nothing to remove


def test_bad_filter_entries_are_reported_on_every_apply() -> None:
    fw = Firewall("wg0", FakeNft())
    nm = netmap(peer(2, ("tcp:99999", "tcp:22")))
    assert len(fw.apply(nm, repair=True)) == 1
    assert len(fw.apply(nm)) == 1


def test_the_clamp_follows_probed_path_mtus_by_elements() -> None:
    nft = FakeNft()
    fw = Firewall("wg0", nft)
    nm = netmap(peer(2, None))
    fw.apply(nm, repair=True)
    assert "maxseg size set rt mtu" in nft.scripts[0] and nft.elements["mss4"] == set()
    fw.path_mtu = {nm.peers["d2"].public_key: 1216}
    fw.apply(nm)
    assert nft.scripts[-1] == (
        "add element inet wiregate mss4 { 100.64.0.2 : 1176 }\n"
        "add element inet wiregate mss6 { fd7a::2 : 1156 }\n"
    )
    unclamped = FakeNft()
    Firewall("wg0", unclamped, clamp=False).apply(nm)
    assert unclamped.types is not None and "mss4" not in unclamped.types


def test_the_data_plane_filters_what_it_configured_and_reports_a_missing_nft() -> None:
    nft = FakeNft()
    dp = filtered_dataplane(nft)
    good = replace(dp_peer(0), filter=("tcp:5432",))
    bad = replace(dp_peer(1), public_key="not a key")  # refused by the agent
    result = dp.apply(dp_netmap([good, bad]))
    assert result.peers == 1 and len(result.problems) == 1  # the refused peer, nothing else
    assert nft.elements["port4"] == {"100.64.0.2 . 6 . 5432"}
    assert not any("100.64.0.3" in e for elements in nft.elements.values() for e in elements)
    dp.apply(dp_netmap([good, bad], version=2))
    assert len(nft.scripts) == 2  # same elements: nothing written
    dp.teardown()
    assert nft.types is None

    other = MemoryBackend()
    other.create(IFACE)
    missing = DataPlane(
        interface=IFACE, private_key=PRIVATE, listen_port=51820, fwmark=0xCA6C, table=51820,
        rule_priority=5210, mtu=1420, run_dir=Path("/nonexistent"), wireguard=other,
        links=MemoryLinks(),
    )  # fmt: skip
    missing.setup()
    problems = missing.apply(dp_netmap([good])).problems
    assert problems == ("packet filter not enforced: no packet filter with an in-memory link "
                        "layer (inject a Firewall)",)  # fmt: skip
