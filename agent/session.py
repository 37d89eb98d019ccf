"""The agent's side of the map stream, as a pure state machine.

Feed it each message (its decoded JSON) with :meth:`MapSession.receive`; it reads
it with :mod:`wiregate.mapwire` and returns what to do next. It holds the current
:class:`NetMap` and detects version gaps, in which case the agent reconnects with
``since=<version>`` and receives a full map.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from wiregate.mapwire import (
    Delta,
    MapWireError,
    Revoked,
    Sync,
    UnknownMessage,
    VersionGap,
    apply_delta,
    read_map_message,
)
from wiregate.model import NetMap

__all__ = ["Action", "MapSession", "Outcome"]


class Action(enum.Enum):
    APPLY = "apply"  # the map changed: reconcile the data plane
    NOTHING = "nothing"  # in sync, nothing to do
    RESYNC = "resync"  # gap or bad message: reconnect and ask from our version
    REVOKED = "revoked"  # the device was removed: tear down


@dataclass(frozen=True, slots=True)
class Outcome:
    action: Action
    reason: str = ""


class MapSession:
    """Tracks the agent's map across messages and reconnects."""

    def __init__(self, initial: NetMap | None = None) -> None:
        self.netmap = initial

    @property
    def version(self) -> int | None:
        return None if self.netmap is None else self.netmap.version

    def receive(self, message: object) -> Outcome:
        """Take one message (decoded JSON) of the stream; say what the agent does next."""
        try:
            parsed = read_map_message(message)
        except UnknownMessage as exc:
            return Outcome(Action.RESYNC, exc.message)
        except MapWireError as exc:
            kind = message.get("type") if isinstance(message, dict) else None
            return Outcome(Action.RESYNC, f"bad {kind} message: {exc.message}")
        if isinstance(parsed, NetMap):
            self.netmap = parsed
            return Outcome(Action.APPLY)
        if isinstance(parsed, Delta):
            return self._delta(parsed)
        if isinstance(parsed, Sync):
            return self._sync(parsed)
        assert isinstance(parsed, Revoked)
        return Outcome(Action.REVOKED, parsed.reason)

    def _delta(self, delta: Delta) -> Outcome:
        if self.netmap is None:
            return Outcome(Action.RESYNC, "delta before any full map")
        try:
            self.netmap = apply_delta(self.netmap, delta)
        except VersionGap as exc:
            return Outcome(Action.RESYNC, exc.message)
        return Outcome(Action.APPLY)

    def _sync(self, sync: Sync) -> Outcome:
        if self.netmap is None or sync.version != self.netmap.version:
            return Outcome(Action.RESYNC, "sync at a version we do not hold")
        return Outcome(Action.NOTHING)
