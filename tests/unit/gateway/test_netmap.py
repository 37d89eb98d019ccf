"""The network-map core: groups, viewers, fan-outs, and the delta == full property."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mapping.netmap import (
    AgentUpdate,
    Fanout,
    NetworkState,
    apply_remove,
    apply_upsert,
    encode_delta_body,
    encode_full,
    full_map,
)
from identity.policy import Policy, Rule
from lab.netmap_replay import expected_delta, wire_text
from wiregate.mapwire import (
    Delta,
    apply_delta,
    build_delta,
    build_full,
    build_peer,
    encode_delta,
    encode_peer,
    parse_map_message,
)
from wiregate.mapwire import dumps as wire_dumps
from wiregate.model import Device, Identity, NetMap

TAGS = ["tag:a", "tag:b", "tag:c"]
IDS = [f"d{i}" for i in range(6)]


def device(n: int | str, *tags: str, endpoint: str = "", name: str = "") -> Device:
    i = int(str(n).lstrip("d"))
    return Device(
        id=f"d{i}",
        name=name or f"host{i}",
        public_key=f"{i:043d}=",
        identity=Identity("test", f"s{i}"),
        ipv4=f"100.64.0.{i + 1}",
        ipv6=f"fd7a::{i + 1:x}",
        tags=tags,
        endpoints=(endpoint,) if endpoint else (),
    )


def web_db() -> Policy:
    return Policy(rules=(Rule(frozenset({"tag:web"}), frozenset({"tag:db"})),))


def test_viewers_follow_the_policy_between_groups() -> None:
    state = NetworkState(web_db(), [device(1, "tag:web"), device(2, "tag:db"), device(3, "tag:db")])
    assert state.viewers("d1") == {"d2", "d3"}
    assert state.viewers("d2") == {"d1"}
    assert state.groups == 2


def test_full_map_lists_the_peers() -> None:
    state = NetworkState(None, [device(1), device(2)])
    nm = full_map(state, "d1", 7)
    assert nm.version == 7
    assert nm.self_view == device(1).to_self()
    assert list(nm.peers) == ["d2"]
    assert json.loads(encode_full(state, "d1", 7)) == build_full(nm)
    assert parse_map_message(encode_full(state, "d1", 7)) == nm


def test_every_self_view_carries_the_pool() -> None:
    pool = ("100.64.0.0/16", "fd7a::/64")
    state = NetworkState(None, [device(1), device(2)], pool=pool)
    assert full_map(state, "d1", 1).self_view == replace(device(1).to_self(), pool=pool)
    assert json.loads(encode_full(state, "d1", 1))["self"]["pool"] == list(pool)
    fan = apply_upsert(state, device(1, name="renamed"))
    own = fan.updates["d1"].self_view
    assert own is not None and own.pool == pool
    assert NetworkState(None, state).pool == ()  # what a caller does not pass is not sent


def test_endpoint_change_reaches_every_viewer_once() -> None:
    state = NetworkState(None, [device(i) for i in range(4)])
    fan = apply_upsert(state, device(0, endpoint="192.0.2.1:51820"))
    assert set(fan.updates) == {"d1", "d2", "d3"}
    assert {u for u in fan.updates.values()} == {AgentUpdate(upsert=("d0",))}
    assert fan.peers["d0"].endpoints == ("192.0.2.1:51820",)


def test_unchanged_device_fans_out_nothing() -> None:
    state = NetworkState(None, [device(1), device(2)])
    assert apply_upsert(state, device(1)) == Fanout()


def test_rename_changes_self_and_peers() -> None:
    state = NetworkState(None, [device(1), device(2)])
    fan = apply_upsert(state, device(1, name="renamed"))
    assert fan.updates["d2"] == AgentUpdate(upsert=("d1",))
    own = fan.updates["d1"]
    assert own.self_view is not None and own.self_view.name == "renamed"
    assert own.upsert == () and own.remove == ()


def test_tag_change_moves_the_device_between_groups() -> None:
    state = NetworkState(
        web_db(), [device(1, "tag:web"), device(2, "tag:db"), device(3, "tag:web")]
    )
    fan = apply_upsert(state, device(1, "tag:db"))
    assert fan.updates["d2"] == AgentUpdate(remove=("d1",))
    assert fan.updates["d3"] == AgentUpdate(upsert=("d1",))
    own = fan.updates["d1"]
    assert (own.upsert, own.remove) == (("d3",), ("d2",))
    assert set(fan.peers) == {"d1", "d3"}


def test_remove_revokes_and_tells_viewers() -> None:
    state = NetworkState(None, [device(1), device(2)])
    fan = apply_remove(state, "d1")
    assert fan.revoked == ("d1",)
    assert fan.updates == {"d2": AgentUpdate(remove=("d1",))}
    assert apply_remove(state, "d1") == Fanout()
    assert "d1" not in state and state.groups == 1


def test_empty_groups_are_dropped() -> None:
    state = NetworkState(web_db(), [device(1, "tag:web"), device(2, "tag:db")])
    apply_upsert(state, device(1, "tag:x"))
    assert state.groups == 2
    assert state.viewers("d2") == set()


def test_encoded_delta_matches_the_dict_form() -> None:
    state = NetworkState(web_db(), [device(1, "tag:web"), device(2, "tag:db")])
    fan = apply_upsert(state, device(1, "tag:web", "tag:db", endpoint="192.0.2.9:1"))
    for agent, update in fan.updates.items():
        self_text = state.self_text(agent) if update.self_view else None
        text = encode_delta(3, 4, self_text, encode_delta_body(state, update))
        expected = expected_delta(fan, agent, 3, 4)
        assert text == wire_text(build_delta(expected))  # byte for byte
        assert parse_map_message(text) == expected


# --- the property: deltas applied to each agent's map == the map from scratch ---

policies = st.lists(
    st.builds(
        Rule,
        src=st.frozensets(st.sampled_from([*TAGS, "*"]), min_size=1),
        dst=st.frozensets(st.sampled_from([*TAGS, "*"]), min_size=1),
    ),
    max_size=3,
).map(lambda rules: Policy(rules=tuple(rules)))

upserts = st.builds(
    lambda i, tags, ep, name: ("upsert", device(i, *tags, endpoint=ep, name=name)),
    st.sampled_from(IDS),
    st.lists(st.sampled_from(TAGS), max_size=3, unique=True),
    st.sampled_from(["", "192.0.2.1:51820", "[2001:db8::1]:51820"]),
    st.sampled_from(["", "renamed"]),
)
removes = st.builds(lambda i: ("remove", i), st.sampled_from(IDS))
operations = st.lists(st.one_of(upserts, removes), max_size=25)


def check_against_scratch(state: NetworkState, maps: dict[str, NetMap], version: int) -> None:
    assert set(maps) == {d.id for d in state}
    for agent, current in maps.items():
        fresh = full_map(state, agent, version)
        assert current.self_view == fresh.self_view, agent
        assert current.peers == fresh.peers, agent
        brute = {
            d.id
            for d in state
            if d.id != agent and state.policy.may_peer(state.device(agent).tags, d.tags)
        }
        assert state.viewers(agent) == brute


def apply_fanout(state: NetworkState, maps: dict[str, NetMap], fan: Fanout, version: int) -> None:
    for agent, update in fan.updates.items():
        assert update.upsert or update.remove or update.self_view, "empty update"
        if agent not in maps:  # a new device: it will get a full map on connect
            continue
        expected = expected_delta(fan, agent, maps[agent].version, version)
        self_text = state.self_text(agent) if update.self_view else None
        text = encode_delta(
            maps[agent].version, version, self_text, encode_delta_body(state, update)
        )
        assert text == wire_text(build_delta(expected))
        delta = parse_map_message(text)
        assert isinstance(delta, Delta) and delta == expected
        maps[agent] = apply_delta(maps[agent], delta)


@settings(max_examples=300, deadline=None)
@given(policies, operations)
def test_deltas_rebuild_the_full_map(policy: Policy, ops: list[tuple[str, object]]) -> None:
    state = NetworkState(policy)
    maps: dict[str, NetMap] = {}
    for version, (kind, arg) in enumerate(ops, start=1):
        if kind == "upsert":
            assert isinstance(arg, Device)
            fan = apply_upsert(state, arg)
            apply_fanout(state, maps, fan, version)
            if arg.id not in maps:
                maps[arg.id] = full_map(state, arg.id, version)
        else:
            assert isinstance(arg, str)
            fan = apply_remove(state, arg)
            assert fan.revoked == ((arg,) if arg in maps else ())
            assert arg not in fan.updates
            maps.pop(arg, None)
            apply_fanout(state, maps, fan, version)
        check_against_scratch(state, maps, version)


def test_upsert_cost_follows_affected_peers() -> None:
    """A change inside a small group touches only that group."""
    policy = Policy(
        rules=tuple(Rule(frozenset({f"tag:g{g}"}), frozenset({f"tag:g{g}"})) for g in range(10))
    )
    state = NetworkState(policy, [device(i, f"tag:g{i % 10}") for i in range(200)])
    fan = apply_upsert(state, replace(device(5, "tag:g5"), endpoints=("192.0.2.5:1",)))
    assert len(fan.updates) == 19


def test_a_changed_peer_is_serialized_once_for_all_viewers(monkeypatch: pytest.MonkeyPatch) -> None:
    state = NetworkState(None, [device(i) for i in range(50)])
    calls = []

    def counting(dev: Device) -> str:
        calls.append(dev.id)
        return encode_peer(dev)

    monkeypatch.setattr("wiregate.mapwire.encode_peer", counting)
    fan = apply_upsert(state, device(7, endpoint="192.0.2.7:1"))
    bodies = {id(u): encode_delta_body(state, u) for u in fan.updates.values()}
    assert len(fan.updates) == 49 and len(bodies) == 1
    assert calls == ["d7"]


# --- the direct PEER encoder: byte for byte what build_peer + the stream encoder give ---

texts = st.text(max_size=12)  # any code point: escapes, surrogates, non-ASCII
short_tuples = st.lists(texts, max_size=3).map(tuple)
random_devices = st.builds(
    Device,
    id=texts,
    name=texts,
    public_key=texts,
    identity=st.builds(Identity, texts, texts),
    ipv4=texts,
    ipv6=texts,
    tags=short_tuples,
    endpoints=short_tuples,
    routes=short_tuples,
    keepalive=st.none() | st.integers(min_value=-(2**70), max_value=2**70),
    nat=st.none() | texts,
)


@settings(max_examples=500, deadline=None)
@given(random_devices)
def test_encode_peer_equals_the_peer_wire_form(dev: Device) -> None:
    text = encode_peer(dev)
    assert text == wire_dumps(build_peer(dev.to_peer()))
    assert text == json.dumps(build_peer(dev.to_peer()), separators=(",", ":"))


def test_encode_peer_falls_back_for_values_that_are_not_strings() -> None:
    dev = replace(device(3), keepalive=True, tags=(7,))  # type: ignore[arg-type]
    assert encode_peer(dev) == wire_dumps(build_peer(dev.to_peer()))


@settings(max_examples=100, deadline=None)
@given(st.lists(random_devices, max_size=6))
def test_cold_full_map_text_equals_the_netmap_wire_form(devices: list[Device]) -> None:
    unique = list({d.id: d for d in devices}.values())
    state = NetworkState(None, unique)
    for dev in unique:
        expected = build_full(full_map(state, dev.id, 5))
        cold = NetworkState(None, unique)
        assert encode_full(cold, dev.id, 5) == wire_dumps(expected)
