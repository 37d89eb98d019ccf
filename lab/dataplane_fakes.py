"""An in-memory link layer for the data plane, with keys, peers and maps to apply."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from agent.dataplane.routes import LinkUpdate, LiveLink, RuleSpec, after_link_update
from wiregate.keys import encode_key, generate_private_key, public_from_private
from wiregate.model import NetMap, Peer, SelfView

PRIVATE = generate_private_key()


KEYS = [encode_key(public_from_private(generate_private_key())) for _ in range(60)]


IFACE = "wg0"


class MemoryLinks:
    """An in-memory link layer counting reads and writes like LinkManager does."""

    ipr: Any = None

    def __init__(self) -> None:
        self.live = LiveLink(7, frozenset(), frozenset(), frozenset(), 1500, False)
        self.reads = 0
        self.writes = 0

    def index(self, interface: str) -> int | None:
        return self.live.index

    def default_route(self) -> tuple[int, int] | None:
        return None

    def read(self, interface: str, rule: RuleSpec) -> LiveLink:
        self.reads += 1
        return self.live

    def apply(self, update: LinkUpdate, index: int, rule: RuleSpec) -> int:
        self.live = after_link_update(self.live, update)
        sets = (update.add_addresses, update.remove_addresses, update.add_routes)
        count = sum(map(len, sets)) + len(update.remove_routes) + len(update.add_rules)
        count += (update.mtu is not None) + update.up
        self.writes += count
        return count

    def remove(self, interface: str, rule: RuleSpec) -> int:
        self.live = replace(self.live, routes=frozenset(), rule_families=frozenset())
        return 0

    def close(self) -> None:
        pass


def peer(i: int, *extra: str, endpoint: int | None = None) -> Peer:
    ips = (f"100.64.0.{i + 2}/32", f"fd7a:7767:6174::{i + 2:x}/128")
    return Peer(
        id=f"d{i}",
        name=f"p{i}",
        public_key=KEYS[i],
        addresses=ips,
        allowed_ips=ips + extra,
        endpoints=(f"192.0.2.{endpoint if endpoint is not None else i + 2}:51820",),
    )


def netmap(peers: list[Peer], version: int = 1) -> NetMap:
    me = SelfView("me", "me", encode_key(public_from_private(PRIVATE)), ("100.64.0.1/32",))
    return NetMap(version=version, self_view=me, peers={p.id: p for p in peers})
