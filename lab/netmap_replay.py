"""Replaying device upserts and removals against the map, checking deltas against full maps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from gateway.mapping.netmap import (
    Fanout,
    NetworkState,
    apply_remove,
    apply_upsert,
    encode_delta_body,
    encode_full,
    full_map,
    signature,
)
from wiregate.mapwire import (
    Delta,
    apply_delta,
    build_delta,
    build_full,
    encode_delta,
    parse_map_message,
)
from wiregate.model import Device, Identity, NetMap

IDS = [f"d{i}" for i in range(4)]


def device(i: int, tags: tuple[str, ...] = (), groups: tuple[str, ...] = (), **kw: Any) -> Device:
    return Device(
        id=f"d{i}",
        name=kw.pop("name", f"host{i}"),
        public_key=f"{i:043d}=",
        identity=Identity("test", f"s{i}"),
        ipv4=f"100.64.0.{i + 1}",
        ipv6=f"fd7a::{i + 1:x}",
        tags=tags,
        groups=groups,
        **kw,
    )


def check(state: NetworkState, maps: dict[str, NetMap], version: int) -> None:
    for agent, current in maps.items():
        fresh = full_map(state, agent, version)
        assert current.self_view == fresh.self_view, agent
        assert current.peers == fresh.peers, agent
        assert encode_full(state, agent, version) == wire_text(build_full(fresh))
        assert parse_map_message(encode_full(state, agent, version)) == fresh
        me = signature(state.device(agent))
        allowed = {d.id for d in state if d.id != agent and state.policy.may_peer(me, signature(d))}
        assert set(current.peers) == allowed, agent  # every allowed peer, and only those
        for pid, peer in current.peers.items():  # never a peer the policy does not allow
            other = signature(state.device(pid))
            assert state.policy.may_peer(me, other)
            assert peer.filter == state.policy.reach(me, other)
            approved, _ = state.policy.approve_routes(other, state.device(pid).routes)
            shown = peer.allowed_ips[2:]  # approved, less routes another device carries
            assert shown == tuple(r for r in approved if r in shown)
            assert all(state.route_owners(r) - {pid} for r in approved if r not in shown)


def apply_fanout(state: NetworkState, maps: dict[str, NetMap], fan: Fanout, version: int) -> None:
    for agent, update in fan.updates.items():
        assert update.upsert or update.remove or update.self_view, "empty update"
        if agent not in maps:
            continue
        own = state.self_text(agent) if update.self_view else None
        text = encode_delta(maps[agent].version, version, own, encode_delta_body(state, update))
        expected = expected_delta(fan, agent, maps[agent].version, version)
        assert text == wire_text(build_delta(expected))
        delta = parse_map_message(text)
        assert delta == expected and isinstance(delta, Delta)
        maps[agent] = apply_delta(maps[agent], delta)


def wire_text(wire: dict[str, Any]) -> str:
    """What the stream's encoder must give for a message's JSON form, byte for byte."""
    return json.dumps(wire, separators=(",", ":"))


def expected_delta(fan: Fanout, agent: str, base: int, version: int) -> Delta:
    """The ``delta`` telling ``agent`` its part of ``fan``, built from values."""
    update = fan.updates[agent]
    upsert = []
    for i, pid in enumerate(update.upsert):
        rule = update.filter_at(i)
        upsert.append(fan.peers[pid] if rule is None else replace(fan.peers[pid], filter=rule))
    return Delta(base, version, update.self_view, tuple(upsert), update.remove)


def replay(state: NetworkState, ops: list[tuple[str, Any]]) -> Iterator[int]:
    """Apply ``ops`` (each agent's map kept by its deltas), :func:`check` after each;
    yield each version."""
    maps: dict[str, NetMap] = {}
    for version, (kind, arg) in enumerate(ops, start=1):
        if kind == "upsert":
            apply_fanout(state, maps, apply_upsert(state, arg), version)
            maps.setdefault(arg.id, full_map(state, arg.id, version))
        else:
            fan = apply_remove(state, arg)
            maps.pop(arg, None)
            apply_fanout(state, maps, fan, version)
        check(state, maps, version)
        yield version
