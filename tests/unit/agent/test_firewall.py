"""The agent's nftables renderer (golden output) and when the ruleset is (re)written."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from agent.dataplane.backend import MemoryBackend
from agent.dataplane.facade import DataPlane
from agent.dataplane.firewall import Firewall, NftMissing, PeerRule, peer_rules, render
from lab.dataplane_fakes import IFACE, PRIVATE, MemoryLinks
from lab.dataplane_fakes import netmap as dp_netmap
from lab.dataplane_fakes import peer as dp_peer
from lab.firewall_fakes import Recorder, netmap, peer
from wiregate.errors import DataPlaneError
from wiregate.model import Peer

GOLDEN = """\
table inet wiregate
delete table inet wiregate
table inet wiregate {
\tcounter dropped {
\t}
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname "wg0" jump from_tunnel
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "wg0" jump from_tunnel
\t}
\tchain from_tunnel {
\t\tct state established,related accept
\t\tip saddr { 100.64.0.2/32 } tcp dport 5432 accept
\t\tip saddr { 100.64.0.2/32 } meta l4proto icmp accept
\t\tip6 saddr { fd7a::2/128 } tcp dport 5432 accept
\t\tip6 saddr { fd7a::2/128 } meta l4proto ipv6-icmp accept
\t\tip saddr { 10.244.0.0/16, 100.64.0.3/32 } accept
\t\tip6 saddr { fd7a::3/128 } accept
\t\tip saddr { 100.64.0.5/32 } tcp dport 8000-8099 accept
\t\tip saddr { 100.64.0.5/32 } meta l4proto udp accept
\t\tcounter name "dropped" drop
\t}
}
"""


def test_golden_ruleset() -> None:
    nm = netmap(
        peer(2, ("tcp:5432", "icmp")),
        peer(3, None, "10.244.0.0/16"),
        peer(4, ()),  # may open nothing: only replies to this device pass
        Peer(
            "d5",
            "host5",
            "k",
            ("100.64.0.5/32",),
            ("100.64.0.5/32",),
            filter=("tcp:8000-8099", "udp"),
        ),
    )
    rendered = render("wg0", peer_rules(nm))
    assert rendered.script == GOLDEN
    assert rendered.restricted and rendered.problems == ()


def test_bad_entries_are_skipped_and_reported() -> None:
    rule = PeerRule("x", ("100.64.0.9/32", "not-an-ip"), ("tcp:99999", "tcp:22"))
    rendered = render("wg0", [rule])
    assert "tcp dport 22 accept" in rendered.script
    assert "99999" not in rendered.script and "not-an-ip" not in rendered.script
    assert len(rendered.problems) == 2


def test_nothing_restricted_still_drops_unknown_sources() -> None:
    rendered = render("wg0", peer_rules(netmap(peer(2, None))))
    assert not rendered.restricted
    assert rendered.script.rstrip().endswith('counter name "dropped" drop\n\t}\n}')


def test_rewritten_only_when_the_rendering_changes() -> None:
    nft = Recorder()
    fw = Firewall("wg0", nft)
    assert fw.apply(netmap(peer(2, ("icmp",)))) == ()
    assert fw.apply(netmap(peer(2, ("icmp",)))) == ()
    assert len(nft.scripts) == 1 and fw.enforced
    fw.apply(netmap(peer(2, ("icmp",))), repair=True)
    fw.apply(netmap(peer(2, ("tcp:22",))))
    assert len(nft.scripts) == 3
    fw.teardown()
    assert nft.scripts[-1] == "table inet wiregate\ndelete table inet wiregate\n"
    assert not fw.enforced


def test_missing_nft_is_a_problem_not_a_crash() -> None:
    fw = Firewall("wg0", Recorder(NftMissing("nft not found", hint="install nftables")))
    problems = fw.apply(netmap(peer(2, ("icmp",))))
    assert problems == ("packet filter not enforced: nft not found (install nftables)",)
    assert not fw.enforced
    assert fw.apply(netmap(peer(2, None))) == ()  # nothing to enforce: nothing to report
    fw.teardown()  # no nft: nothing to remove


def test_a_refused_ruleset_is_reported_and_retried() -> None:
    nft = Recorder(DataPlaneError("nft refused the ruleset: syntax"))
    fw = Firewall("wg0", nft)
    assert fw.apply(netmap(peer(2, None)))[0].startswith("packet filter not enforced: nft refused")
    fw.apply(netmap(peer(2, None)))
    assert len(nft.scripts) == 2


def test_peers_the_agent_refused_get_no_rule() -> None:
    nm = netmap(peer(2, None), peer(3, ("icmp",)))
    rules = peer_rules(nm, keys={nm.peers["d3"].public_key})
    assert [r.name for r in rules] == ["host3"]
    assert "100.64.0.2" not in render("wg0", rules).script


def test_the_data_plane_filters_what_it_configured_and_reports_a_missing_nft() -> None:
    backend, links = MemoryBackend(), MemoryLinks()
    backend.create(IFACE)
    nft = Recorder()
    dp = DataPlane(
        interface=IFACE, private_key=PRIVATE, listen_port=51820, fwmark=0xCA6C, table=51820,
        rule_priority=5210, mtu=1420, run_dir=Path("/nonexistent"), wireguard=backend,
        links=links, firewall=Firewall(IFACE, nft),
    )  # fmt: skip
    dp.setup()
    good = replace(dp_peer(0), filter=("tcp:5432",))
    bad = replace(dp_peer(1), public_key="not a key")  # refused by the agent
    result = dp.apply(dp_netmap([good, bad]))
    assert result.peers == 1 and len(result.problems) == 1  # the refused peer, nothing else
    [script] = nft.scripts
    assert "ip saddr { 100.64.0.2/32 } tcp dport 5432 accept" in script
    assert "100.64.0.3" not in script
    dp.apply(dp_netmap([good, bad], version=2))
    assert len(nft.scripts) == 1  # same rendering: not rewritten
    dp.teardown()
    assert nft.scripts[-1].endswith("delete table inet wiregate\n")

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
