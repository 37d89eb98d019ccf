"""Path-MTU probing through each tunnel: pure decisions (:class:`MtuSearch`,
:class:`PmtuBook`); the I/O lives in :mod:`agent.pmtu.prober`.

The tunnel MTU is derived from the *local* underlay (:mod:`agent.dataplane.mtu`);
a narrower hop further along the path is only found by probing. A probe is an
ICMP echo to the peer's tunnel address, padded to ``size`` bytes with Don't
Fragment set (``IP_PMTUDISC_PROBE``); the peer's echo reply is as large, so one
round trip proves the size in both directions.

Two ways a size fails, both counted:

* **fragmentation needed**: a router on the underlay answers the outer
  (WireGuard UDP) packet with ICMP "fragmentation needed" / "packet too big";
  the kernel then caches a smaller PMTU for the peer's endpoint. The caller
  passes that cached underlay PMTU with every outcome, and the search caps its
  ceiling at it minus the tunnel overhead, rounded down to WireGuard's 16-byte
  padding (the outer packet would otherwise be fragmented by the sender: a
  probe of that size would then pass and hide the limit);
* **black hole**: the probe is lost at that size (``tries`` times) while smaller
  ones pass and no ICMP explains it.

The search is a binary search between the largest size known to pass and the
smallest known to fail; the result (the path MTU, as an inner packet size) goes
to the MSS clamp (:mod:`agent.dataplane.mss`) and to ``wiregate status``.

:class:`PmtuBook` decides when to probe which peer: once a peer has a recent
handshake, again when its endpoint changes, every ``interval`` seconds after a
result and ``retry`` seconds after a failed search. One probe at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "FLOOR",
    "HANDSHAKE_FRESH",
    "MtuSearch",
    "PeerSeen",
    "PmtuBook",
    "PmtuCounters",
    "PmtuResult",
]

FLOOR = {4: 576, 6: 1280}  # the smallest probe (inner IP version): a peer that drops it is down
PADDING = 16  # WireGuard pads each inner packet to a multiple of 16 bytes (up to the MTU)
HANDSHAKE_FRESH = 180.0  # WireGuard's session lifetime: an older handshake is not a live tunnel


@dataclass(slots=True)
class MtuSearch:
    """Binary search of the path MTU between ``floor`` and ``ceiling`` (pure).

    ``overhead``: the outer headers (60 over IPv4, 80 over IPv6) between an
    inner packet and the underlay PMTU the kernel reports.
    """

    ceiling: int
    floor: int
    overhead: int
    tries: int = 2
    good: int = 0  # the largest size that passed (0: none yet)
    bad: int = 0  # the smallest size that failed (0: none yet)
    frag_needed: bool = False
    probes: int = 0
    losses: int = 0
    _misses: int = 0

    def next_size(self) -> int | None:
        """The next size to probe, or None when the search is over."""
        high = self.ceiling if not self.bad else min(self.ceiling, self.bad - 1)
        if self.good >= high or (self.bad and self.bad <= self.floor):
            return None
        if not self.good:
            # the ceiling first (usually it passes), then the floor (is the peer there at all?)
            return high if not self.bad else self.floor
        return (self.good + high + 1) // 2

    def reply(self, size: int, underlay: int | None) -> None:
        """A probe of ``size`` came back; ``underlay``: the endpoint's cached PMTU now."""
        self.probes += 1
        self._misses = 0
        self._underlay(underlay)
        self.good = max(self.good, min(size, self.ceiling))

    def lost(self, size: int, underlay: int | None) -> None:
        """A probe of ``size`` timed out; ``underlay``: the endpoint's cached PMTU now."""
        self.probes += 1
        self.losses += 1
        if self._underlay(underlay) and size > self.ceiling:
            self._misses = 0  # explained by ICMP: the new ceiling is tried next
            return
        self._misses += 1
        if self._misses >= self.tries:
            self._misses = 0
            self.bad = size if not self.bad else min(self.bad, size)

    def _underlay(self, underlay: int | None) -> bool:
        if underlay is None:
            return False
        fits = (underlay - self.overhead) // PADDING * PADDING  # WireGuard pads to 16 bytes
        if fits >= self.ceiling:
            return False
        self.ceiling = max(self.floor, fits)
        self.frag_needed = True
        return True

    @property
    def black_hole(self) -> bool:
        """A size was lost every time, unexplained by ICMP, while a smaller one passed."""
        return bool(self.good and self.bad)

    @property
    def result(self) -> int | None:
        """The path MTU found (None: not even the floor passed, or not finished)."""
        if self.next_size() is not None or not self.good:
            return None
        return self.good


@dataclass(frozen=True, slots=True)
class PeerSeen:
    """What the data plane says of a peer: its endpoint and last handshake (POSIX s)."""

    public_key: str
    endpoint: str | None
    last_handshake: float | None


@dataclass(frozen=True, slots=True)
class PmtuResult:
    """One finished probe of a peer."""

    path_mtu: int | None  # None: the peer answered no probe
    endpoint: str | None
    at: float
    frag_needed: bool
    black_hole: bool
    probes: int

    def to_dict(self) -> dict[str, object]:
        return {
            "path_mtu": self.path_mtu,
            "endpoint": self.endpoint,
            "probed_at": self.at,
            "frag_needed": self.frag_needed,
            "black_hole": self.black_hole,
            "probes": self.probes,
        }


@dataclass(slots=True)
class PmtuCounters:
    """Totals since the agent started (in the status document's ``pmtu``)."""

    searches: int = 0
    probes: int = 0
    probes_lost: int = 0
    frag_needed: int = 0
    black_holes: int = 0

    def add(self, search: MtuSearch) -> None:
        self.searches += 1
        self.probes += search.probes
        self.probes_lost += search.losses
        self.frag_needed += int(search.frag_needed)
        self.black_holes += int(search.black_hole)


@dataclass(slots=True)
class PmtuBook:
    """Which peer to probe next, and the results (pure; ``now`` is passed in)."""

    interval: float = 600.0
    retry: float = 60.0
    results: dict[str, PmtuResult] = field(default_factory=dict)
    counters: PmtuCounters = field(default_factory=PmtuCounters)
    peer_counters: dict[str, PmtuCounters] = field(default_factory=dict)  # by public key

    def due(self, peers: Iterable[PeerSeen], now: float) -> PeerSeen | None:
        """The peer most in need of a probe now (never probed first), or None."""
        best: tuple[float, PeerSeen] | None = None
        for peer in peers:
            if peer.last_handshake is None or now - peer.last_handshake > HANDSHAKE_FRESH:
                continue
            last = self.results.get(peer.public_key)
            if last is not None and last.endpoint == peer.endpoint:
                wait = self.interval if last.path_mtu is not None else self.retry
                if now - last.at < wait:
                    continue
            since = -1.0 if last is None else last.at
            if best is None or since < best[0]:
                best = (since, peer)
        return None if best is None else best[1]

    def record(self, peer: PeerSeen, search: MtuSearch, now: float) -> bool:
        """Keep ``search``'s outcome for ``peer``; True if its path MTU changed."""
        before = self.results.get(peer.public_key)
        self.counters.add(search)
        self.peer_counters.setdefault(peer.public_key, PmtuCounters()).add(search)
        self.results[peer.public_key] = PmtuResult(
            search.result, peer.endpoint, now, search.frag_needed, search.black_hole, search.probes
        )
        return before is None or before.path_mtu != search.result

    def forget_except(self, keys: Iterable[str]) -> None:
        """Drop the results of peers no longer in the map."""
        keep = set(keys)
        for key in [k for k in self.results if k not in keep]:
            del self.results[key]
        for key in [k for k in self.peer_counters if k not in keep]:
            del self.peer_counters[key]

    def path_mtus(self) -> dict[str, int]:
        """Probed path MTUs by public key (peers without one left out)."""
        return {k: r.path_mtu for k, r in self.results.items() if r.path_mtu is not None}

    def to_dict(self) -> dict[str, object]:
        c = self.counters
        return {
            "searches": c.searches,
            "probes": c.probes,
            "probes_lost": c.probes_lost,
            "frag_needed": c.frag_needed,
            "black_holes": c.black_holes,
        }
