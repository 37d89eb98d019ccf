"""The agent's map stream state machine: full maps, delta chains, gaps and revocation."""

from __future__ import annotations

from typing import Any

from agent.session import Action, MapSession
from wiregate.mapwire import build_peer, build_self
from wiregate.model import Device, Identity


def _dev(n: int) -> Device:
    return Device(
        id=f"d{n}",
        name=f"host{n}",
        public_key=f"k{n}",
        identity=Identity("i", "s"),
        ipv4=f"100.64.0.{n}",
        ipv6=f"fd7a::{n}",
    )


def _full(version: int, peers: list[int]) -> dict[str, Any]:
    return {
        "type": "full",
        "version": version,
        "self": build_self(_dev(1).to_self()),
        "peers": [build_peer(_dev(n).to_peer()) for n in peers],
    }


def test_full_then_deltas_in_chain() -> None:
    s = MapSession()
    assert s.receive(_full(5, [2, 3])).action is Action.APPLY
    out = s.receive(
        {
            "type": "delta",
            "base": 5,
            "version": 9,
            "upsert": [build_peer(_dev(4).to_peer())],
            "remove": ["d2"],
        }
    )
    assert out.action is Action.APPLY
    assert s.netmap is not None and set(s.netmap.peers) == {"d3", "d4"} and s.version == 9


def test_gap_asks_for_resync_and_keeps_the_map() -> None:
    s = MapSession()
    s.receive(_full(5, [2]))
    out = s.receive({"type": "delta", "base": 6, "version": 7, "upsert": [], "remove": ["d2"]})
    assert out.action is Action.RESYNC
    assert s.netmap is not None and "d2" in s.netmap.peers and s.version == 5


def test_delta_before_full_resyncs() -> None:
    assert MapSession().receive({"type": "delta", "base": 0, "version": 1}).action is Action.RESYNC


def test_sync_at_our_version_is_a_noop() -> None:
    s = MapSession()
    s.receive(_full(5, [2]))
    assert s.receive({"type": "sync", "version": 5}).action is Action.NOTHING
    assert s.receive({"type": "sync", "version": 4}).action is Action.RESYNC


def test_revoked_and_garbage() -> None:
    s = MapSession()
    assert s.receive({"type": "revoked", "reason": "gone"}).action is Action.REVOKED
    assert s.receive(["not", "a", "dict"]).action is Action.RESYNC
    assert s.receive({"type": "full", "version": "x"}).action is Action.RESYNC
    assert s.receive({"type": "nope"}).action is Action.RESYNC
