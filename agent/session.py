"""The agent's side of the map stream, as a pure state machine.

Feed it each decoded message with :meth:`MapSession.receive`; it returns what to
do next. It holds the current :class:`NetMap` and detects version gaps, in which
case the agent reconnects with ``since=<version>`` and receives a full map.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from wiregate.model import NetMap, apply_delta

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

    def receive(self, message: Any) -> Outcome:
        if not isinstance(message, dict):
            return Outcome(Action.RESYNC, "message is not an object")
        kind = message.get("type")
        try:
            if kind == "full":
                self.netmap = NetMap.from_wire(message)
                return Outcome(Action.APPLY)
            if kind == "delta":
                return self._delta(message)
        except (KeyError, TypeError, ValueError) as exc:
            return Outcome(Action.RESYNC, f"bad {kind} message: {exc}")
        if kind == "sync":
            return self._sync(message)
        if kind == "revoked":
            return Outcome(Action.REVOKED, str(message.get("reason", "")))
        return Outcome(Action.RESYNC, f"unknown message type {kind!r}")

    def _delta(self, message: dict[str, Any]) -> Outcome:
        if self.netmap is None:
            return Outcome(Action.RESYNC, "delta before any full map")
        self.netmap = apply_delta(self.netmap, message)
        return Outcome(Action.APPLY)

    def _sync(self, message: dict[str, Any]) -> Outcome:
        if self.netmap is None or message.get("version") != self.netmap.version:
            return Outcome(Action.RESYNC, "sync at a version we do not hold")
        return Outcome(Action.NOTHING)
