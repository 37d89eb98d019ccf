"""Per-agent records of the broker: delta history, queued items, open streams.

Private to :mod:`gateway.mapping.broker`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from aiohttp import web

from wiregate.mapwire import encode_delta

__all__ = ["AgentDelta", "AgentLog", "CloseItem", "Item", "Stream"]


@dataclass(frozen=True, slots=True)
class AgentDelta:
    """One delta built for one agent; ``body`` is shared by every agent with the same update."""

    base: int
    version: int
    self_text: str | None
    body: str

    def render(self) -> str:
        return encode_delta(self.base, self.version, self.self_text, self.body)


@dataclass(frozen=True, slots=True)
class CloseItem:
    """Queued after a last message: the writer closes the stream with ``code``."""

    code: int
    reason: str


@dataclass(slots=True)
class AgentLog:
    """What an agent was last sent, and the deltas that led there (oldest first);
    ``away_from``: while no stream of the agent is open, the version it had been sent
    when the last one closed."""

    version: int
    entries: deque[AgentDelta]
    away_from: int | None = None

    def add(self, delta: AgentDelta) -> bool:
        """Append ``delta`` (the oldest falls out of a full history); whether the log is
        still of use: not once an agent that is away lost the first delta it missed, as
        it can only resume from that one or an older (it gets a full map)."""
        self.entries.append(delta)
        self.version = delta.version
        return self.away_from is None or self.entries[0].base <= self.away_from

    def since(self, version: int) -> list[AgentDelta] | None:
        """The deltas from ``version`` to the latest, or None if ``version`` is not in reach."""
        for i, delta in enumerate(self.entries):
            if delta.base == version:
                return list(self.entries)[i:]
        return None


# (message, time of the change it carries, or None for non-delta messages)
Item = tuple[str | AgentDelta | CloseItem, float | None]


@dataclass(eq=False, slots=True)
class Stream:
    """One open map stream: its socket, outbound queue and writer/closer tasks."""

    device_id: str
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    queue: asyncio.Queue[Item]
    writer: asyncio.Task[None] | None = None
    closer: asyncio.Task[None] | None = None
    closing: bool = False
