"""Host traffic through the tunnel: which node addresses are routed where (pure core)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.dataplane.backend import IPNetwork
from agent.dataplane.hosttraffic import (
    CLEAR,
    ENCRYPTED,
    EXEMPT,
    HELD,
    HostPlan,
    HostPolicy,
    HostTracker,
    host_addresses,
    host_ruleset,
    plan_host_traffic,
)
from wiregate.model import Peer

NOW = 1_800_000_000.0


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def node(n: int, *hosts: str, tags: tuple[str, ...] = ("tag:node",)) -> Peer:
    addresses = (f"100.64.0.{n}/32",)
    return Peer(
        id=f"d{n}",
        name=f"node-{n}",
        public_key=f"key{n}",
        addresses=addresses,
        allowed_ips=(*addresses, f"10.244.{n}.0/24", *hosts),
        tags=tags,
    )


def allowed(*peers: Peer) -> dict[str, frozenset[IPNetwork]]:
    return {p.public_key: frozenset(net(a) for a in p.allowed_ips) for p in peers}


def plan(peers: list[Peer], handshakes: dict[str, float | None], policy: HostPolicy) -> HostPlan:
    return plan_host_traffic(peers, allowed(*peers), handshakes, policy, NOW)


def states(p: HostPlan) -> dict[str, str]:
    return {str(d.address): d.state for d in p.destinations}


def test_host_addresses_are_single_addresses_other_than_tunnel_addresses() -> None:
    peer = node(2, "10.0.0.2/32", "2001:db8::2/128")
    nets = allowed(peer)["key2"]
    assert sorted(map(str, host_addresses(peer, nets, "tag:node"))) == [
        "10.0.0.2/32",
        "2001:db8::2/128",
    ]


def test_untagged_peers_have_no_host_destinations() -> None:
    vm = node(3, "192.168.1.3/32", tags=("tag:vm",))
    assert host_addresses(vm, allowed(vm)["key3"], "tag:node") == []


def test_off_plans_nothing_and_leaves_routes_alone() -> None:
    peer = node(2, "10.0.0.2/32")
    p = plan([peer], {}, HostPolicy())
    assert p.destinations == ()
    routes = allowed(peer)["key2"]
    assert p.routes(routes) == routes


def test_nonstrict_routes_only_peers_with_a_fresh_handshake() -> None:
    fresh, stale, never = node(2, "10.0.0.2/32"), node(3, "10.0.0.3/32"), node(4, "10.0.0.4/32")
    hs = {"key2": NOW - 10, "key3": NOW - 500, "key4": None}
    p = plan([fresh, stale, never], hs, HostPolicy(mode="nonstrict"))
    assert states(p) == {"10.0.0.2/32": ENCRYPTED, "10.0.0.3/32": CLEAR, "10.0.0.4/32": CLEAR}
    routes = frozenset().union(*allowed(fresh, stale, never).values())
    kept = p.routes(routes)
    assert net("10.0.0.2/32") in kept
    assert net("10.0.0.3/32") not in kept and net("10.0.0.4/32") not in kept
    assert net("10.244.3.0/24") in kept  # pod CIDRs are not host traffic: always routed
    assert p.stale_keys == {"key3", "key4"}
    assert p.peer_keys == {"key2", "key3", "key4"}
    assert p.guarded == frozenset()


def test_strict_always_routes_and_guards() -> None:
    peers = [node(2, "10.0.0.2/32"), node(3, "10.0.0.3/32")]
    p = plan(peers, {"key2": NOW - 1}, HostPolicy(mode="strict"))
    assert states(p) == {"10.0.0.2/32": ENCRYPTED, "10.0.0.3/32": HELD}
    routes = frozenset().union(*allowed(*peers).values())
    assert p.routes(routes) == routes
    assert p.guarded == {net("10.0.0.2/32"), net("10.0.0.3/32")}


@pytest.mark.parametrize("mode", ["nonstrict", "strict"])
def test_exempt_addresses_never_enter_the_tunnel(mode: str) -> None:
    # a control-plane node runs an agent: its InternalIP is the API server's address
    api = node(2, "10.0.0.2/32")
    policy = HostPolicy(mode=mode, exempt=frozenset({net("10.0.0.2/32"), net("10.1.0.0/16")}))
    p = plan([api, node(3, "10.1.2.3/32")], {"key2": NOW, "key3": NOW}, policy)
    assert set(states(p).values()) == {EXEMPT}
    routes = frozenset().union(*allowed(api).values())
    assert net("10.0.0.2/32") not in p.routes(routes)
    assert p.guarded == frozenset() and p.watched == frozenset()


def test_exempt_networks_of_the_other_family_do_not_match() -> None:
    policy = HostPolicy(mode="strict", exempt=frozenset({net("::/0")}))
    assert not policy.is_exempt(net("10.0.0.2/32"))


def test_refused_peers_contribute_nothing() -> None:
    peer = node(2, "10.0.0.2/32")
    p = plan_host_traffic([peer], {}, {}, HostPolicy(mode="strict"), NOW)
    assert p.destinations == ()


def test_bad_policy_values_are_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        HostPolicy(mode="paranoid")
    with pytest.raises(ValueError, match="fresh"):
        HostPolicy(mode="strict", fresh_seconds=0)


def test_tracker_counts_each_fall_back_once() -> None:
    peer = node(2, "10.0.0.2/32")
    policy, tracker = HostPolicy(mode="nonstrict"), HostTracker()
    assert tracker.observe(plan([peer], {}, policy)) == 1  # a new node: clear until handshake
    assert tracker.observe(plan([peer], {}, policy)) == 0
    assert tracker.observe(plan([peer], {"key2": NOW}, policy)) == 0
    assert tracker.observe(plan([peer], {"key2": NOW - 1000}, policy)) == 1
    assert tracker.fallbacks == 2


def test_ruleset_strict_drops_and_nonstrict_counts() -> None:
    peers = [node(2, "10.0.0.2/32", "2001:db8::2/128")]
    strict = plan(peers, {}, HostPolicy(mode="strict"))
    text = host_ruleset("wg0", 0xCA6C, strict)
    assert "elements = { 10.0.0.2 }" in text and "elements = { 2001:db8::2 }" in text
    assert 'counter name "clear_out" drop' in text
    assert "meta mark 0xca6c accept" in text and 'oifname "wg0" accept' in text
    assert "hook output" in text and "hook forward" in text  # sent and forwarded alike
    loose = host_ruleset("wg0", 0xCA6C, plan(peers, {}, HostPolicy(mode="nonstrict")))
    assert "drop" not in loose and 'counter name "clear_out"' in loose


def test_ruleset_of_an_empty_plan_deletes_the_table() -> None:
    assert host_ruleset("wg0", 1, HostPlan()).strip().endswith("delete table inet wiregate-host")


@given(
    st.lists(st.integers(2, 250), unique=True, max_size=8),
    st.dictionaries(st.integers(2, 250), st.floats(NOW - 1000, NOW), max_size=8),
    st.sampled_from(["nonstrict", "strict"]),
    st.sets(st.integers(2, 250), max_size=4),
)
def test_invariants(ids: list[int], shakes: dict[int, float], mode: str, exempt: set[int]) -> None:
    peers = [node(n, f"10.0.0.{n}/32") for n in ids]
    policy = HostPolicy(mode=mode, exempt=frozenset(net(f"10.0.0.{n}/32") for n in exempt))
    p = plan(peers, {f"key{n}": t for n, t in shakes.items()}, policy)
    routes = p.routes(frozenset().union(frozenset(), *allowed(*peers).values()))
    for d in p.destinations:
        if policy.is_exempt(d.address):  # never locked out
            assert d.address not in routes and d.address not in p.guarded
        elif mode == "strict":  # never in clear
            assert d.address in routes and d.address in p.guarded
        else:  # in the tunnel exactly when fresh
            fresh = NOW - shakes.get(int(str(d.address.network_address).split(".")[3]), 0) < 30
            assert (d.address in routes) == fresh
