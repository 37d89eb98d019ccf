"""What the agent tells the gateway of its path to each peer (pure: ``now`` is passed in).

Each peer's entry (:class:`wiregate.pathwire.PathEntry`) is put together from the path
machine's report (:meth:`agent.paths.driver.PathBook.report`), the last path-MTU probe
and its counts (:class:`agent.pmtu.search.PmtuBook`), WireGuard's latest handshake and
the probe's round trip: :func:`entry_for`, which keeps every value inside what the
gateway accepts (:data:`wiregate.pathwire.LIMITS`) so that a report is never refused.

:class:`PathReporter` decides when to send: a peer whose entry changed (path MTU,
black hole, counts, path kind, relay, reason; not the handshake's age or the RTT,
which move all the time) at most every ``min_interval`` seconds, and every entry
every ``refresh`` seconds and on each new stream; each message holds at most
:data:`wiregate.pathwire.MAX_PATH_ENTRIES` peers. A stream closed with 1008 (policy
violation) after a ``paths`` message went out on it means the gateway refused it (a
gateway older than ``paths``, or an entry it finds wrong): reports stop until the agent
restarts, rather than costing a reconnect every few seconds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.pmtu.search import PmtuCounters, PmtuResult
from wiregate.pathwire import (
    LIMITS,
    MAX_PATH_ENTRIES,
    MAX_REASON,
    PATH_KINDS,
    PathEntry,
    build_paths,
)

__all__ = ["POLICY_VIOLATION", "PathReporter", "entry_for"]

POLICY_VIOLATION = 1008  # the WebSocket close code of a refused message
_RELAY_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_Key = tuple[object, ...]


def _clamp(value: float | None, field_name: str) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    low, high = LIMITS[field_name]
    return min(high, max(low, value))


def entry_for(
    peer_id: str,
    path: Mapping[str, Any] | None,
    pmtu: PmtuResult | None,
    counts: PmtuCounters | None,
    last_handshake: float | None,
    rtt_ms: float | None,
    now: float,
) -> PathEntry:
    """The entry of ``peer_id`` from what the agent knows of it (see the module docstring)."""
    kind = str(path.get("path")) if path else "probing"
    relay = path.get("relay") if path else None
    reason = str(path.get("reason") or "") if path else "no path chosen yet"
    mtu = None if pmtu is None else pmtu.path_mtu
    age = None if not last_handshake else _clamp(now - last_handshake, "handshake_age")
    return PathEntry(
        peer=peer_id,
        path_mtu=None if mtu is None else int(_clamp(mtu, "path_mtu") or 0),
        black_hole=bool(pmtu and pmtu.black_hole),
        frag_needed=0 if counts is None else min(counts.frag_needed, 2**31 - 1),
        probe_failures=0 if counts is None else min(counts.probes_lost, 2**31 - 1),
        path=kind if kind in PATH_KINDS else "probing",
        relay=relay if isinstance(relay, str) and _RELAY_ID.fullmatch(relay) else None,
        reason="".join(c for c in reason if c.isprintable())[:MAX_REASON],
        handshake_age=None if age is None else round(age, 3),
        rtt_ms=_clamp(rtt_ms, "rtt_ms"),
    )


def _key(entry: PathEntry) -> _Key:
    return (entry.path_mtu, entry.black_hole, entry.frag_needed, entry.probe_failures,
            entry.path, entry.relay, entry.reason)  # fmt: skip


@dataclass(slots=True)
class PathReporter:
    """When to send which entries (see the module docstring)."""

    min_interval: float = 10.0
    refresh: float = 300.0
    _sent: dict[str, _Key] = field(default_factory=dict)
    _last: float = -math.inf  # when a message last went out
    _full: float = -math.inf  # when every entry last went out
    _sent_on_stream: bool = False
    refused: bool = False  # the gateway closed a stream over a report: no more reports

    def restart(self) -> None:
        """A new stream: the next call sends every entry."""
        self._sent.clear()
        self._last = self._full = -math.inf
        self._sent_on_stream = False

    def stream_ended(self, close_code: int | None) -> bool:
        """The stream closed with ``close_code``; True if that turned reports off."""
        if close_code == POLICY_VIOLATION and self._sent_on_stream and not self.refused:
            self.refused = True
            return True
        return False

    def may_send(self, now: float) -> bool:
        """Whether :meth:`due` could send anything now (else the peers need not be read)."""
        return not self.refused and now - self._last >= self.min_interval

    def due(self, entries: Sequence[PathEntry], now: float) -> list[dict[str, Any]]:
        """The ``paths`` messages to send now (none: nothing due yet)."""
        if not self.may_send(now):
            return []
        if now - self._full >= self.refresh:
            chosen = list(entries)
            self._full = now
        else:
            chosen = [e for e in entries if self._sent.get(e.peer) != _key(e)]
        if not chosen:
            return []
        self._last, self._sent_on_stream = now, True
        sent = {e.peer for e in chosen} | self._sent.keys()
        self._sent = {e.peer: _key(e) for e in entries if e.peer in sent}
        return [
            build_paths(chosen[i : i + MAX_PATH_ENTRIES])
            for i in range(0, len(chosen), MAX_PATH_ENTRIES)
        ]
