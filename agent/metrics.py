"""The agent's Prometheus metrics: its status document, translated on each scrape.

Off unless ``metrics_listen`` is set (``HOST:PORT``; ``127.0.0.1:9092`` is a
good choice on a host, the pod's own address in a DaemonSet). Nothing is
counted twice: :class:`AgentCollector` reads the same document ``wiregate
status`` prints (:meth:`agent.daemon.Agent.status`) at scrape time, plus
an ``"agent"`` section with what the document does not carry (data plane
applies, the last key rotation), counted by :class:`ApplyCounters` around the
data plane's ``apply``, and a ``"firewall"`` section: the packet filter's
``dropped`` counter, read through libnftables (in-process) before each scrape.

Per-peer series carry ``peer`` (the device name) and ``peer_id``: their number is
bounded by the peers the map gives this device.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from agent.dataplane.facade import ApplyResult, DataPlane
from agent.dataplane.firewall import TABLE
from wiregate.clock import Clock
from wiregate.errors import ConfigError
from wiregate.model import NetMap
from wiregate.net import parse_hostport
from wiregate.nft import Nft, NftError
from wiregate.settings import AgentSettings

__all__ = [
    "PATHS",
    "AgentCollector",
    "ApplyCounters",
    "metrics_registry",
    "parse_nft_counter",
    "read_firewall_drops",
    "serve_metrics",
]

#: The path kinds peers are counted under (``unknown``: no path machine yet).
PATHS = ("direct", "relayed", "probing", "failed", "unknown")
Document = Callable[[], Mapping[str, Any]]
_PEER = ["peer", "peer_id"]


@dataclass(slots=True)
class ApplyCounters:
    """Data plane applies (the map, or the periodic repair), failures, writes issued."""

    runs: int = 0
    failures: int = 0
    writes: int = 0

    def wrap(self, apply: Callable[[NetMap], ApplyResult]) -> Callable[[NetMap], ApplyResult]:
        """``apply``, counted."""

        def counted(netmap: NetMap) -> ApplyResult:
            self.runs += 1
            try:
                result = apply(netmap)
            except Exception:
                self.failures += 1
                raise
            self.writes += result.writes
            return result

        return counted

    def to_dict(self) -> dict[str, int]:
        return {"applies": self.runs, "apply_failures": self.failures, "apply_writes": self.writes}


class AgentCollector(Collector):
    """Metrics from a status document, read on every scrape."""

    def __init__(self, document: Document, clock: Clock = time.time) -> None:
        self._document, self._clock = document, clock

    def collect(self) -> Iterable[Metric]:
        doc = self._document()
        yield from _gateway(doc.get("gateway") or {})
        yield from _peers(doc.get("peers") or [], self._clock())
        yield from _agent(doc)
        yield from _pmtu(doc.get("pmtu") or {})
        yield from _firewall(doc.get("firewall"))
        yield from _host_traffic(doc.get("host_traffic"))
        yield from _pods(doc.get("pods"))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _host_traffic(doc: Mapping[str, Any] | None) -> Iterable[Metric]:
    """Host traffic (docs/host-traffic.md): destinations by state, fallbacks to clear."""
    if not doc or doc.get("mode") == "off":
        return
    states = GaugeMetricFamily(
        "wiregate_agent_host_destinations",
        "Peer nodes' host addresses by state (encrypted, held, clear, exempt).",
        labels=["state"],
    )
    for state, count in sorted((doc.get("counts") or {}).items()):
        states.add_metric([str(state)], float(count))
    yield states
    yield _counter(
        "wiregate_agent_host_fallbacks",
        "Times a peer node's host address fell back to clear (nonstrict).",
        float(doc.get("fallbacks") or 0),
    )


def _pods(doc: Mapping[str, Any] | None) -> Iterable[Metric]:
    """Pod identity (``kubernetes = true``): the node's pods reported, how often."""
    if not doc:
        return
    yield _gauge("wiregate_agent_pods_reported", "This node's pods reported to the gateway.",
                 float(doc.get("reported") or 0))  # fmt: skip
    yield _counter("wiregate_agent_pod_messages", "pods messages sent on the map stream.",
                   float(doc.get("messages") or 0))  # fmt: skip
    yield _counter("wiregate_agent_pod_lists", "Lists of this node's pods (first and resyncs).",
                   float(doc.get("lists") or 0))  # fmt: skip


def _gateway(gw: Mapping[str, Any]) -> Iterable[Metric]:
    yield _gauge(
        "wiregate_agent_gateway_connected",
        "1 while the map stream to the gateway is open.",
        1.0 if gw.get("connected") else 0.0,
    )
    yield _counter(
        "wiregate_agent_gateway_reconnects",
        "Map streams lost and opened again since the agent started.",
        float(gw.get("reconnects") or 0),
    )
    yield _gauge(
        "wiregate_agent_map_version",
        "Version of the network map the agent holds (0: none yet).",
        float(gw.get("map_version") or 0),
    )
    if gw.get("last_sync") is not None:
        yield _gauge(
            "wiregate_agent_last_sync_timestamp_seconds",
            "When the last map stream message arrived (POSIX seconds).",
            float(gw["last_sync"]),
        )


def _peers(peers: Iterable[Mapping[str, Any]], now: float) -> Iterable[Metric]:
    by_path = dict.fromkeys(PATHS, 0)
    age = GaugeMetricFamily(
        "wiregate_agent_peer_handshake_age_seconds",
        "Seconds since the peer's latest WireGuard handshake (+Inf: none yet).",
        labels=_PEER,
    )
    rx = CounterMetricFamily(
        "wiregate_agent_peer_receive_bytes", "Bytes received from the peer.", labels=_PEER
    )
    tx = CounterMetricFamily(
        "wiregate_agent_peer_transmit_bytes", "Bytes sent to the peer.", labels=_PEER
    )
    path = GaugeMetricFamily(
        "wiregate_agent_peer_path",
        "1 for the path the peer is on (direct, relayed, probing, failed, unknown).",
        labels=[*_PEER, "path"],
    )
    for peer in peers:
        labels = [str(peer.get("name") or ""), str(peer.get("id") or "")]
        kind = _path_of(peer)
        by_path[kind] += 1
        path.add_metric([*labels, kind], 1.0)
        age.add_metric(labels, _age(peer.get("last_handshake"), now))
        rx.add_metric(labels, float(peer.get("rx_bytes") or 0))
        tx.add_metric(labels, float(peer.get("tx_bytes") or 0))
    counts = GaugeMetricFamily(
        "wiregate_agent_peers", "Peers in the map, by path.", labels=["path"]
    )
    for kind, count in by_path.items():
        counts.add_metric([kind], float(count))
    yield from (counts, path, age, rx, tx)


def _path_of(peer: Mapping[str, Any]) -> str:
    report = peer.get("path")
    kind = report.get("path") if isinstance(report, Mapping) else None
    return kind if kind in PATHS else "unknown"


def _age(last_handshake: Any, now: float) -> float:
    if not isinstance(last_handshake, int | float) or last_handshake <= 0:
        return math.inf
    return max(0.0, now - float(last_handshake))


def _info(doc: Mapping[str, Any]) -> Metric:
    device = doc.get("device") or {}
    info = GaugeMetricFamily(
        "wiregate_agent_info", "1, labelled with this agent's device, interface and backend.",
        labels=["device", "device_id", "interface", "backend"],
    )  # fmt: skip
    values = (device.get("name"), device.get("id"), doc.get("interface"), doc.get("backend"))
    info.add_metric([str(v or "") for v in values], 1.0)
    return info


def _agent(doc: Mapping[str, Any]) -> Iterable[Metric]:
    yield _info(doc)
    yield _gauge(
        "wiregate_agent_peers_refused",
        "Peers of the map the agent refused to configure (see `wiregate status`).",
        float(len(doc.get("problems") or ())),
    )
    own = doc.get("agent") or {}
    for key, help_text in (
        ("applies", "Data plane applies: a new map, or the periodic read-back and repair."),
        ("apply_failures", "Data plane applies that failed (the tunnel keeps what it had)."),
        ("apply_writes", "Writes to WireGuard, addresses and routes issued by applies."),
    ):
        yield _counter(f"wiregate_agent_{key}", help_text, float(own.get(key) or 0))
    if own.get("last_rotation") is not None:
        yield _gauge(
            "wiregate_agent_key_rotated_timestamp_seconds",
            "When this agent last switched to a new WireGuard key (POSIX seconds).",
            float(own["last_rotation"]),
        )
    expires = (doc.get("device") or {}).get("expires_at")
    if expires is not None:
        yield _gauge(
            "wiregate_agent_key_expiry_timestamp_seconds",
            "When the gateway stops accepting this device's key (POSIX seconds).",
            float(expires),
        )
    nat = (doc.get("netcheck") or {}).get("nat_type")
    if nat:
        info = GaugeMetricFamily(
            "wiregate_agent_nat_info", "1, labelled with the last netcheck's NAT type.",
            labels=["nat_type"],
        )  # fmt: skip
        info.add_metric([str(nat)], 1.0)
        yield info


def _pmtu(pmtu: Mapping[str, Any]) -> Iterable[Metric]:
    for key in ("probes", "probes_lost", "frag_needed", "black_holes"):
        yield _counter(
            f"wiregate_agent_pmtu_{key}",
            f"Path-MTU probing: {key.replace('_', ' ')} (see operations.md, MTU and MSS).",
            float(pmtu.get(key) or 0),
        )


def _firewall(counter: Mapping[str, Any] | None) -> Iterable[Metric]:
    if counter is None:  # no nft, or no table (yet): no series rather than a false 0
        return
    for unit in ("packets", "bytes"):
        yield _counter(
            f"wiregate_agent_firewall_dropped_{unit}",
            f"{unit.capitalize()} from the tunnel the packet filter dropped (nftables).",
            float(counter.get(unit) or 0),
        )


NftQuery = Callable[[str], Mapping[str, Any] | None]
_DROPPED = f"list counter inet {TABLE} dropped"


def parse_nft_counter(text: str) -> dict[str, int] | None:
    """``packets`` and ``bytes`` of the one counter in ``nft -j list counter`` output."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return _counter_of(doc) if isinstance(doc, dict) else None


def _counter_of(doc: Mapping[str, Any]) -> dict[str, int] | None:
    items = doc.get("nftables")
    for item in items if isinstance(items, list) else ():
        counter = item.get("counter") if isinstance(item, dict) else None
        if isinstance(counter, dict):
            return {k: int(counter.get(k) or 0) for k in ("packets", "bytes")}
    return None


@functools.cache
def _nft() -> Nft:
    return Nft()  # one libnftables context for every scrape (no process spawned)


def _query_nft(command: str) -> Mapping[str, Any] | None:
    try:
        return _nft().query_json(command)
    except NftError:  # no nftables, or no table (yet)
        return None


def read_firewall_drops(query: NftQuery = _query_nft) -> dict[str, int] | None:
    """The packet filter's ``dropped`` counter; None without nftables or the table."""
    doc = query(_DROPPED)
    return None if doc is None else _counter_of(doc)


class _Rotation(Protocol):
    @property
    def last_rotation(self) -> float | None: ...


class _Agent(Protocol):
    @property
    def settings(self) -> AgentSettings: ...

    @property
    def rotation(self) -> _Rotation: ...

    @property
    def dataplane(self) -> DataPlane | None: ...

    def status(self) -> dict[str, Any]: ...


def metrics_registry(document: Document) -> CollectorRegistry:
    """A registry with the agent's collector over ``document`` and the process metrics."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(document))
    ProcessCollector(registry=registry)
    return registry


async def serve_metrics(agent: _Agent) -> web.AppRunner | None:
    """Serve ``GET /metrics`` on ``settings.metrics_listen``; None when it is empty."""
    listen = agent.settings.metrics_listen
    if not listen:
        return None
    applies = ApplyCounters()
    if agent.dataplane is not None:
        plane = agent.dataplane  # the daemon looks ``apply`` up on each call: count them all
        setattr(plane, "apply", applies.wrap(plane.apply))  # noqa: B010

    firewall: dict[str, int] | None = None  # read before each scrape, off the event loop

    def document() -> dict[str, Any]:
        last = agent.rotation.last_rotation
        own = {"agent": applies.to_dict() | {"last_rotation": last}, "firewall": firewall}
        return agent.status() | own

    registry = metrics_registry(document)

    async def metrics(_request: web.Request) -> web.Response:
        nonlocal firewall
        firewall = await asyncio.to_thread(read_firewall_drops)
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = parse_hostport(listen, allow_port_zero=True, what="metrics_listen")
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"cannot serve metrics on {listen}: {exc.strerror}",
            hint="is another process using that port, or is the address not on this host?",
        ) from exc
    return runner
