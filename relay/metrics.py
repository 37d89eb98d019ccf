"""The relay process's Prometheus metrics, counted at the adapters from what the cores return.

The sans-IO cores (:class:`~relay.stun_core.StunServer`,
:class:`~relay.forwarding.Relay`) know nothing of Prometheus. The STUN core
passes an outcome label to an ``observe`` callback, which the adapter of
:mod:`relay.aio.stun` hands to the objects here. The forwarding core counts in
plain integers (no call per datagram on its hot path); its counters, like the
live figures (allocations, capacity), are read from the core on each scrape by
a collector, never copied.

Names (``_total`` is added to counters by the exposition format):

* ``wiregate_stun_datagrams_total{outcome}``: every STUN datagram, by what was
  done (``success``, ``error_420``) or why nothing was (``rate_limited``,
  ``malformed``, ...: :data:`relay.stun_core.OUTCOMES`).
* ``wiregate_stun_replies_total{family, listener}``: replies sent, by address
  family (``ipv4``/``ipv6``) and listening port.
* ``wiregate_relay_datagrams_total{outcome}``: every datagram on the control
  and relay ports, by what was done or why it was dropped or refused
  (:data:`relay.forwarding.OUTCOMES`; ticket refusals carry their wire reason).
* ``wiregate_relay_forwarded_bytes_total``: WireGuard bytes forwarded.
* ``wiregate_relay_allocations_created_total``: allocations (relayed pairs) made.
* ``wiregate_relay_allocations`` / ``wiregate_relay_allocation_capacity``: live
  allocations and how many fit.
* ``wiregate_relay_info{relay_id}``: 1, to name the relay in dashboards.
* ``wiregate_relay_forward_path{path}``: 1 for the data path in use (``kernel`` or
  ``userspace``: :mod:`relay.aio.kernelpath`).
* ``wiregate_relay_kernel_datagrams_total{outcome}``: datagrams the kernel fast path
  forwarded (``forwarded``) or dropped (``unbound_source``, ``not_wireguard``,
  ``over_bandwidth``), read back from the table's counters on the housekeeping timer.
* ``wiregate_relay_kernel_forwarded_bytes_total``: bytes the kernel forwarded (IP length).
* ``wiregate_relay_kernel_pairs``: pairs the kernel forwards now.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.filters import normalize_ip
from relay.forwarding import OUTCOMES as RELAY_OUTCOMES
from relay.stun_core import OUTCOMES as STUN_OUTCOMES
from relay.stun_core import Addr

__all__ = ["ForwardingMetrics", "KernelMetrics", "StunMetrics", "family_of"]

Load = Callable[[], tuple[int, int] | None]


def family_of(host: str) -> str:
    """``ipv4`` or ``ipv6`` for a socket address (IPv4-mapped IPv6 counts as IPv4)."""
    try:
        return f"ipv{normalize_ip(host).version}"
    except ValueError:
        return "unknown"


class StunMetrics:
    """The STUN listeners' counters: outcomes (from the core) and replies per listener."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._outcomes = Counter(
            "wiregate_stun_datagrams",
            "STUN datagrams received, by outcome (a reply sent, or why none was).",
            ["outcome"],
            registry=registry,
        )
        self._replies = Counter(
            "wiregate_stun_replies",
            "STUN replies sent, by address family and listening port.",
            ["family", "listener"],
            registry=registry,
        )
        for outcome in STUN_OUTCOMES:
            self._outcomes.labels(outcome=outcome)

    def observe(self, outcome: str, count: int = 1) -> None:
        """The core's ``observe`` callback: ``count`` datagrams handled with ``outcome``."""
        self._outcomes.labels(outcome=outcome).inc(count)

    def listening(self, local: Addr) -> None:
        """Show a bound listener's reply counter at zero before its first reply."""
        self._replies.labels(family=family_of(local[0]), listener=str(local[1]))

    def replied(self, src: Addr, local: Addr) -> None:
        """A reply was sent to ``src`` from the listener on ``local``."""
        self._replies.labels(family=family_of(src[0]), listener=str(local[1])).inc()

    def replies(self, family: str, local: Addr, count: int) -> None:
        """``count`` replies to ``family`` (``ipv4``/``ipv6``) sent from ``local``'s listener."""
        if count > 0:
            self._replies.labels(family=family, listener=str(local[1])).inc(count)


class ForwardingMetrics:
    """The WireGuard relay's counters and load, read from the core on each scrape.

    The core counts in plain integers (no call per datagram); :meth:`serve`
    names where to read them. :meth:`observe`, :meth:`forwarded` and
    :meth:`created` add to them, for datagrams handled outside the core.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._live = _ForwardingCollector()
        registry.register(self._live)

    def serve(self, relay_id: str, load: Load, counts: Counts | None = None) -> None:
        """From now on, scrapes read live allocations and capacity from ``load`` and the
        counters from ``counts`` (outcomes, forwarded bytes, allocations created)."""
        self._live.relay_id, self._live.load = relay_id, load
        if counts is not None:
            self._live.counts = counts

    def observe(self, outcome: str) -> None:
        """One datagram (or expiry) with ``outcome``, counted outside the core."""
        self._live.outcomes[outcome] += 1

    def forwarded(self, size: int) -> None:
        """WireGuard bytes forwarded outside the core."""
        self._live.forwarded_bytes += size

    def created(self, count: int) -> None:
        """``count`` allocations created outside the core."""
        if count > 0:
            self._live.created += count


Counts = Callable[[], tuple[Mapping[str, int], int, int]]


def _no_counts() -> tuple[Mapping[str, int], int, int]:
    return {}, 0, 0


class _ForwardingCollector(Collector):
    def __init__(self) -> None:
        self.relay_id = ""
        self.load: Load = lambda: None
        self.counts: Counts = _no_counts
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.forwarded_bytes = 0
        self.created = 0

    def collect(self) -> Iterable[Metric]:
        counted, size, created = self.counts()
        totals = collections.Counter(dict.fromkeys(RELAY_OUTCOMES, 0))
        totals.update(dict(counted))
        totals.update(self.outcomes)
        datagrams = CounterMetricFamily(
            "wiregate_relay_datagrams",
            "Relay datagrams received, by outcome (what was done, or why it was dropped).",
            labels=["outcome"],
        )
        for outcome, count in totals.items():
            datagrams.add_metric([outcome], count)
        yield datagrams
        yield CounterMetricFamily(
            "wiregate_relay_forwarded_bytes",
            "WireGuard bytes forwarded.",
            size + self.forwarded_bytes,
        )
        yield CounterMetricFamily(
            "wiregate_relay_allocations_created",
            "Allocations (relayed pairs) created.",
            created + self.created,
        )
        yield from self._load()

    def _load(self) -> Iterable[Metric]:
        load = self.load()
        if load is None:
            return
        live, capacity = load
        yield GaugeMetricFamily("wiregate_relay_allocations", "Live relay allocations.", live)
        yield GaugeMetricFamily(
            "wiregate_relay_allocation_capacity", "Allocations this relay admits.", capacity
        )
        info = GaugeMetricFamily(
            "wiregate_relay_info", "1; names the relay (relay_id).", labels=["relay_id"]
        )
        info.add_metric([self.relay_id], 1)
        yield info


#: The kernel fast path's outcomes (the table's named counters, and forwarded).
KERNEL_OUTCOMES = ("forwarded", "unbound_source", "not_wireguard", "over_bandwidth")


class KernelMetrics:
    """The kernel fast path's figures: counter deltas read back from nftables."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._datagrams = Counter(
            "wiregate_relay_kernel_datagrams",
            "Datagrams the kernel fast path forwarded or dropped, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self._bytes = Counter(
            "wiregate_relay_kernel_forwarded_bytes",
            "Bytes the kernel fast path forwarded (IP length).",
            registry=registry,
        )
        for outcome in KERNEL_OUTCOMES:
            self._datagrams.labels(outcome=outcome)
        self._live = _KernelCollector()
        registry.register(self._live)

    def serve(self, pairs: Callable[[], int]) -> None:
        """From now on, scrapes read the number of installed pairs from ``pairs``."""
        self._live.pairs = pairs

    def path(self, name: str) -> None:
        """Name the data path in use (``kernel`` or ``userspace``)."""
        self._live.path = name

    def forwarded(self, packets: int, size: int) -> None:
        """``packets`` datagrams of ``size`` bytes in all went through the kernel."""
        if packets > 0:
            self._datagrams.labels(outcome="forwarded").inc(packets)
            self._bytes.inc(size)

    def dropped(self, outcome: str, packets: int) -> None:
        """``packets`` datagrams were dropped in the kernel for ``outcome``."""
        if packets > 0:
            self._datagrams.labels(outcome=outcome).inc(packets)


class _KernelCollector(Collector):
    def __init__(self) -> None:
        self.path = ""
        self.pairs: Callable[[], int] = lambda: 0

    def collect(self) -> Iterable[Metric]:
        if not self.path:
            return
        info = GaugeMetricFamily(
            "wiregate_relay_forward_path", "1 for the data path in use.", labels=["path"]
        )
        info.add_metric([self.path], 1)
        yield info
        yield GaugeMetricFamily(
            "wiregate_relay_kernel_pairs", "Pairs the kernel fast path forwards.", self.pairs()
        )
