"""The map under a policy file: filters per peer, groups, refused routes, deltas == full."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mapping.netmap import (
    NetworkState,
    apply_upsert,
    encode_full,
    full_map,
)
from identity.policy import Policy
from identity.policy_file import parse_policy
from lab.netmap_replay import IDS, device, replay
from wiregate.mapwire import build_full, build_peer, build_self, read_peer, read_self

TAGS = ["tag:a", "tag:b", "tag:c"]
GROUPS = ["g1", "g2"]
ENTRIES = [*TAGS, "group:g1", "group:g2", "*"]
PORTS = ["tcp:5432", "icmp", "udp:53", "tcp:8000-8099"]
ROUTES = ["10.1.0.0/24", "10.2.0.0/24", "fd00:1::/64"]


def policy_of(doc: dict[str, Any]) -> Policy:
    base = {"groups": {g: {"issuer": "https://idp.test", "claim": "groups", "values": [g]}
                       for g in GROUPS}}  # fmt: skip
    return parse_policy({**base, **doc}).policy


def test_a_one_way_acl_with_ports_filters_the_peer() -> None:
    policy = policy_of({"acls": [{"src": ["group:g1"], "dst": ["tag:db"], "ports": ["tcp:5432"]}]})
    laptop, db = device(1, groups=("g1",)), device(2, ("tag:db",))
    other = device(3, ("tag:x",))
    state = NetworkState(policy, [laptop, db, other])
    db_map, laptop_map = full_map(state, "d2", 1), full_map(state, "d1", 1)
    assert db_map.peers["d1"].filter == ("tcp:5432",)
    assert laptop_map.peers["d2"].filter == ()
    assert "d3" not in db_map.peers and full_map(state, "d3", 1).peers == {}
    assert json.loads(encode_full(state, "d2", 1)) == build_full(db_map)
    assert build_full(db_map)["peers"][0]["filter"] == ["tcp:5432"]
    assert "group" not in json.dumps(build_full(db_map))  # memberships are never sent


def test_refused_routes_are_withheld_and_reported() -> None:
    policy = policy_of(
        {
            "acls": [{"src": ["*"], "dst": ["*"]}],
            "routes": [{"tags": ["tag:node"], "allow": ["10.1.0.0/16"]}],
        }
    )
    node = device(1, ("tag:node",), routes=("10.1.2.0/24", "10.9.0.0/16"))
    state = NetworkState(policy, [node, device(2)])
    peer = full_map(state, "d2", 1).peers["d1"]
    assert peer.allowed_ips == ("100.64.0.2/32", "fd7a::2/128", "10.1.2.0/24")
    own = full_map(state, "d1", 1).self_view
    assert own.refused_routes == ("10.9.0.0/16",)
    assert json.loads(encode_full(state, "d1", 1))["self"]["refused_routes"] == ["10.9.0.0/16"]


def test_a_group_change_refilters_peers_that_stay() -> None:
    policy = policy_of(
        {
            "acls": [
                {"src": ["*"], "dst": ["*"], "ports": ["icmp"]},
                {"src": ["group:g1"], "dst": ["*"], "ports": ["tcp:22"]},
            ]
        }
    )
    state = NetworkState(policy, [device(1), device(2)])
    fan = apply_upsert(state, device(1, groups=("g1",)))  # same tags: the same PEER text
    assert fan.updates["d2"].upsert == ("d1",)
    assert fan.updates["d2"].filters == (("icmp", "tcp:22"),)
    assert full_map(state, "d2", 2).peers["d1"].filter == ("icmp", "tcp:22")


def test_the_wire_fields_round_trip_and_unknown_fields_are_ignored() -> None:
    peer = replace(device(1).to_peer(), filter=("icmp",))
    wire = build_peer(peer)
    assert read_peer(wire) == peer
    assert read_peer({**wire, "some_future_field": [1]}) == peer
    assert "filter" not in build_peer(device(1).to_peer())  # unfiltered: the old bytes
    view = replace(device(1).to_self(), refused_routes=("10.0.0.0/8",))
    assert read_self({**build_self(view), "x": 1}) == view
    assert "refused_routes" not in build_self(device(1).to_self())


# --- the property: deltas applied to each agent's map == the map from scratch ---

acls = st.fixed_dictionaries(
    {
        "src": st.lists(st.sampled_from(ENTRIES), min_size=1, max_size=2, unique=True),
        "dst": st.lists(st.sampled_from(ENTRIES), min_size=1, max_size=2, unique=True),
    },
    optional={"ports": st.lists(st.sampled_from(PORTS), min_size=1, max_size=2, unique=True)},
)
route_rules = st.fixed_dictionaries(
    {
        "tags": st.lists(st.sampled_from(ENTRIES), min_size=1, max_size=2, unique=True),
        "allow": st.lists(st.sampled_from(["10.1.0.0/16", "fd00::/16"]), min_size=1, unique=True),
    }
)
policies = st.builds(
    lambda a, r: policy_of({"acls": a, "routes": r}),
    st.lists(acls, max_size=3),
    st.lists(route_rules, max_size=2),
)
upserts = st.builds(
    lambda i, tags, groups, ep, routes: (
        "upsert",
        device(i, tuple(tags), tuple(groups), endpoints=ep, routes=tuple(routes)),
    ),
    st.integers(0, len(IDS) - 1),
    st.lists(st.sampled_from(TAGS), max_size=2, unique=True),
    st.lists(st.sampled_from(GROUPS), max_size=2, unique=True),
    st.sampled_from([(), ("192.0.2.1:51820",)]),
    st.lists(st.sampled_from(ROUTES), max_size=2, unique=True),
)
removes = st.builds(lambda i: ("remove", i), st.sampled_from(IDS))
operations = st.lists(st.one_of(upserts, removes), max_size=25)


@settings(max_examples=500, deadline=None)
@given(policies, operations)
def test_deltas_rebuild_the_full_map_under_filters(
    policy: Policy, ops: list[tuple[str, Any]]
) -> None:
    for _ in replay(NetworkState(policy), ops):
        pass
