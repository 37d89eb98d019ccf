"""The fleet's path matrix (pure: no store, no clock, no web framework).

Agents report their path to each peer (:mod:`wiregate.pathwire`); the store keeps the
last report of each (reporter, peer) pair (:mod:`gateway.store.pathreports`). This
module decides what the gateway keeps and shows of them:

* :class:`ReportGate`: how often a device may report (a token bucket per device), so
  an agent cannot make the gateway write without bound;
* :func:`admitted`: the entries of a report about the reporter's own peers (devices
  the policy lets it peer with); the others are left out and counted;
* :func:`pair_view` and :class:`Matrix`: each pair as the API and the console show
  it (age, staleness), the devices grouped by their first tag, cells by MTU band;
* :class:`Summary`: the bounded-cardinality figures exported as metrics (pairs by
  path-MTU bucket and by path kind, black holes, stale pairs): never a label per pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from wiregate.pathwire import PATH_KINDS, PathEntry, PathsReport

__all__ = [
    "BURST",
    "MTU_BUCKETS",
    "REPORT_RATE",
    "STALE_AFTER",
    "UNTAGGED",
    "FleetPaths",
    "Matrix",
    "Node",
    "PairView",
    "ReportGate",
    "Summary",
    "admitted",
    "band",
    "pair_json",
    "pair_view",
]

#: upper bounds of the path-MTU histogram's buckets (inner packet bytes)
MTU_BUCKETS: Final = (576, 1200, 1280, 1340, 1380, 1400, 1420, 1440, 1500, 9000)
STALE_AFTER: Final = 900.0  # a pair not reported for this long is stale (agents resend every 300 s)
BURST: Final = 8  # messages a device may send at once (256 peers each: 2 048 peers)
REPORT_RATE: Final = 1 / 15  # messages per second, sustained, per device
UNTAGGED: Final = "untagged"


@dataclass(slots=True)
class ReportGate:
    """A token bucket per device: ``burst`` reports at once, ``rate`` per second after."""

    burst: float = BURST
    rate: float = REPORT_RATE
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> (tokens, at)

    def admit(self, device_id: str, now: float) -> bool:
        """Whether ``device_id`` may report now (one token taken if so)."""
        tokens, at = self._buckets.get(device_id, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        if tokens < 1:
            self._buckets[device_id] = (tokens, now)
            return False
        self._buckets[device_id] = (tokens - 1, now)
        if len(self._buckets) > 4 * 65536:  # forget full buckets of devices long gone
            self._forget_full(now)
        return True

    def _forget_full(self, now: float) -> None:
        full = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full}


def admitted(
    reporter: str, report: PathsReport, may_peer: Callable[[str, str], bool]
) -> tuple[list[PathEntry], int]:
    """(the entries about peers ``reporter`` has in its map, how many others were left out)."""
    kept = [e for e in report.entries if e.peer != reporter and may_peer(reporter, e.peer)]
    return kept, len(report.entries) - len(kept)


@dataclass(frozen=True, slots=True)
class Node:
    """A device as the matrix shows it."""

    id: str
    name: str
    tags: tuple[str, ...]

    @property
    def group(self) -> str:
        """The group it is drawn in: its first tag (sorted), else :data:`UNTAGGED`."""
        return sorted(self.tags)[0] if self.tags else UNTAGGED


@dataclass(frozen=True, slots=True)
class PairView:
    """One reported pair, as served: the report, whose it is, how old."""

    reporter: Node
    peer: Node
    entry: PathEntry
    reported_at: float
    age: float  # seconds since reported
    stale: bool

    @property
    def band(self) -> str:
        """The colour band of the cell (:func:`band`)."""
        return band(self.entry.path_mtu, self.entry.black_hole)


def band(path_mtu: int | None, black_hole: bool) -> str:
    """A cell's class: ``black-hole``, ``unknown``, or ``mtu-<bucket>`` (:data:`MTU_BUCKETS`)."""
    if black_hole:
        return "black-hole"
    if path_mtu is None:
        return "unknown"
    bucket = next((b for b in MTU_BUCKETS if path_mtu <= b), None)
    return "mtu-inf" if bucket is None else f"mtu-{bucket}"


def pair_view(reporter: Node, peer: Node, entry: PathEntry, at: float, now: float) -> PairView:
    """The pair reported by ``reporter`` at ``at``, seen at ``now``."""
    age = max(0.0, now - at)
    return PairView(reporter, peer, entry, at, age, age > STALE_AFTER)


def pair_json(view: PairView, rfc3339: Callable[[float], str | None]) -> dict[str, Any]:
    """The API's PATH object."""
    e = view.entry
    return {
        "reporter": {"id": view.reporter.id, "name": view.reporter.name},
        "peer": {"id": view.peer.id, "name": view.peer.name},
        "path_mtu": e.path_mtu,
        "black_hole": e.black_hole,
        "frag_needed": e.frag_needed,
        "probe_failures": e.probe_failures,
        "path": e.path,
        "relay": e.relay,
        "reason": e.reason,
        "handshake_age": e.handshake_age,
        "rtt_ms": e.rtt_ms,
        "reported_at": rfc3339(view.reported_at),
        "age": round(view.age, 3),
        "stale": view.stale,
    }


@dataclass(frozen=True, slots=True)
class Matrix:
    """Devices by devices: rows report, columns are their peers; grouped by tag."""

    groups: tuple[tuple[str, tuple[Node, ...]], ...]
    cells: Mapping[tuple[str, str], PairView]

    @classmethod
    def build(cls, nodes: Iterable[Node], pairs: Iterable[PairView]) -> Matrix:
        """The matrix of ``nodes`` (by group, then name) and the ``pairs`` between them."""
        by_group: dict[str, list[Node]] = {}
        for node in nodes:
            by_group.setdefault(node.group, []).append(node)
        groups = tuple(
            (g, tuple(sorted(by_group[g], key=lambda n: (n.name, n.id))))
            for g in sorted(by_group, key=lambda g: (g == UNTAGGED, g))
        )
        cells = {(p.reporter.id, p.peer.id): p for p in pairs}
        return cls(groups, cells)

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Every device, in drawing order."""
        return tuple(n for _, members in self.groups for n in members)

    def cell(self, reporter: str, peer: str) -> PairView | None:
        """The pair ``reporter`` → ``peer``, if reported."""
        return self.cells.get((reporter, peer))


@dataclass(frozen=True, slots=True)
class Summary:
    """The fleet's figures for the metrics (every label value from a fixed set)."""

    pairs: int = 0
    stale: int = 0
    unprobed: int = 0  # fresh pairs with no path MTU yet
    black_holes: int = 0
    frag_needed: int = 0
    probe_failures: int = 0
    by_path: Mapping[str, int] = field(default_factory=dict)
    buckets: Sequence[tuple[str, int]] = ()  # cumulative (le, count), +Inf last
    mtu_sum: int = 0

    @classmethod
    def of(cls, pairs: Iterable[PairView]) -> Summary:
        """The figures of the fresh ``pairs`` (stale ones are only counted as stale)."""
        fresh, stale = [], 0
        for p in pairs:
            if p.stale:
                stale += 1
            else:
                fresh.append(p.entry)
        mtus = [e.path_mtu for e in fresh if e.path_mtu is not None]
        buckets = [(str(b), sum(1 for m in mtus if m <= b)) for b in MTU_BUCKETS]
        return cls(
            pairs=len(fresh),
            stale=stale,
            unprobed=len(fresh) - len(mtus),
            black_holes=sum(1 for e in fresh if e.black_hole),
            frag_needed=sum(e.frag_needed for e in fresh),
            probe_failures=sum(e.probe_failures for e in fresh),
            by_path={k: sum(1 for e in fresh if e.path == k) for k in sorted(PATH_KINDS)},
            buckets=[*buckets, ("+Inf", len(mtus))],
            mtu_sum=sum(mtus),
        )


@dataclass(slots=True)
class FleetPaths:
    """A gateway's path state: the report gate, the figures last computed for metrics."""

    gate: ReportGate = field(default_factory=ReportGate)
    summary: Summary = field(default_factory=lambda: Summary.of(()))
