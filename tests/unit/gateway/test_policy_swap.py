"""A policy change told as deltas: each agent's old map plus its update == its new full map."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings

from gateway.mapping.netmap import NetworkState, full_map
from gateway.mapping.policyswap import policy_fanout
from identity.policy import Policy
from lab.netmap_replay import apply_fanout, check, device, replay
from tests.unit.gateway.test_netmap_policy import operations, policies, policy_of


@settings(max_examples=150, deadline=None)
@given(policies, policies, operations)
def test_a_policy_change_rebuilds_every_map(
    old_policy: Policy, new_policy: Policy, ops: list[tuple[str, Any]]
) -> None:
    old = NetworkState(old_policy)
    version = max(replay(old, ops), default=0)
    maps = {d.id: full_map(old, d.id, version) for d in old}
    new = NetworkState(new_policy, old)
    fan = policy_fanout(old, new)
    apply_fanout(new, maps, fan, version + 1)  # every update is non-empty, and exact
    check(new, maps, version + 1)
    for agent in set(maps) - set(fan.updates):  # agents not told keep an unchanged map
        assert full_map(new, agent, version + 1).peers == full_map(old, agent, version).peers


def test_only_the_agents_whose_map_changed_are_told() -> None:
    web, db, vm = device(1, ("tag:web",)), device(2, ("tag:db",)), device(3, ("tag:vm",))
    before = policy_of({"acls": [{"src": ["tag:web"], "dst": ["tag:db"]}]})
    after = policy_of({"acls": [{"src": ["tag:web"], "dst": ["tag:db"], "ports": ["tcp:5432"]}]})
    old = NetworkState(before, [web, db, vm])
    fan = policy_fanout(old, NetworkState(after, old))
    assert set(fan.updates) == {"d2"}  # the db's filter on web; web's view of db is the same
    assert fan.updates["d2"].upsert == ("d1",) and fan.updates["d2"].filters == (("tcp:5432",),)
    assert policy_fanout(old, NetworkState(before, old)).updates == {}


def test_agents_told_the_same_share_one_update() -> None:
    devices = [device(i, ("tag:a",)) for i in range(4)] + [device(9, ("tag:b",))]
    old = NetworkState(policy_of({"acls": [{"src": ["tag:a"], "dst": ["tag:a"]}]}), devices)
    new = NetworkState(Policy.allow_all(), old)
    fan = policy_fanout(old, new)
    assert {fan.updates[f"d{i}"].upsert for i in range(4)} == {("d9",)}
    assert len({id(fan.updates[f"d{i}"]) for i in range(4)}) == 1
    assert fan.updates["d9"].upsert == ("d0", "d1", "d2", "d3")
