"""The relay process's Prometheus metrics, counted at the adapters from what the cores return.

The sans-IO cores (:class:`~relay.stun_core.StunServer`,
:class:`~relay.forwarding.Relay`) know nothing of Prometheus: they pass an
outcome label to an ``observe`` callback, and the adapters of
:mod:`relay.aio.stun` and :mod:`relay.aio.forwarding` hand those labels to the
objects here. Live figures (allocations, capacity) are read from the core on
each scrape by a collector, never copied.

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from relay.filters import normalize_ip
from relay.forwarding import OUTCOMES as RELAY_OUTCOMES
from relay.stun_core import OUTCOMES as STUN_OUTCOMES
from relay.stun_core import Addr

__all__ = ["ForwardingMetrics", "StunMetrics", "family_of"]

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

    def observe(self, outcome: str) -> None:
        """The core's ``observe`` callback: one datagram handled with ``outcome``."""
        self._outcomes.labels(outcome=outcome).inc()

    def listening(self, local: Addr) -> None:
        """Show a bound listener's reply counter at zero before its first reply."""
        self._replies.labels(family=family_of(local[0]), listener=str(local[1]))

    def replied(self, src: Addr, local: Addr) -> None:
        """A reply was sent to ``src`` from the listener on ``local``."""
        self._replies.labels(family=family_of(src[0]), listener=str(local[1])).inc()


class ForwardingMetrics:
    """The WireGuard relay's counters, and a collector reading the core's load on scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._outcomes = Counter(
            "wiregate_relay_datagrams",
            "Relay datagrams received, by outcome (what was done, or why it was dropped).",
            ["outcome"],
            registry=registry,
        )
        self._bytes = Counter(
            "wiregate_relay_forwarded_bytes", "WireGuard bytes forwarded.", registry=registry
        )
        self._created = Counter(
            "wiregate_relay_allocations_created",
            "Allocations (relayed pairs) created.",
            registry=registry,
        )
        for outcome in RELAY_OUTCOMES:
            self._outcomes.labels(outcome=outcome)
        self._live = _LoadCollector()
        registry.register(self._live)

    def serve(self, relay_id: str, load: Load) -> None:
        """From now on, scrapes read live allocations and capacity from ``load``."""
        self._live.relay_id, self._live.load = relay_id, load

    def observe(self, outcome: str) -> None:
        """The core's ``observe`` callback: one datagram (or expiry) with ``outcome``."""
        self._outcomes.labels(outcome=outcome).inc()

    def forwarded(self, size: int) -> None:
        """One WireGuard datagram of ``size`` bytes went out to the other side."""
        self._bytes.inc(size)

    def created(self, count: int) -> None:
        """``count`` allocations were created by one datagram (0 or 1)."""
        if count > 0:
            self._created.inc(count)


class _LoadCollector(Collector):
    def __init__(self) -> None:
        self.relay_id = ""
        self.load: Load = lambda: None

    def collect(self) -> Iterable[GaugeMetricFamily]:
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
