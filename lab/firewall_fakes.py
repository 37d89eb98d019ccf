"""Peers with packet filters, and a recorder standing in for ``nft -f``."""

from __future__ import annotations

from wiregate.model import NetMap, Peer, SelfView


def peer(n: int, filter: tuple[str, ...] | None, *extra: str) -> Peer:
    cidrs = (f"100.64.0.{n}/32", f"fd7a::{n}/128")
    return Peer(f"d{n}", f"host{n}", f"{n:043d}=", cidrs, cidrs + extra, filter=filter)


def netmap(*peers: Peer) -> NetMap:
    me = SelfView("d1", "me", f"{1:043d}=", ("100.64.0.1/32",))
    return NetMap(1, me, {p.id: p for p in peers})


class Recorder:
    def __init__(self, error: Exception | None = None) -> None:
        self.scripts: list[str] = []
        self.error = error

    def __call__(self, script: str) -> None:
        self.scripts.append(script)
        if self.error is not None:
            raise self.error
