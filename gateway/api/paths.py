"""Agents' path reports: taken from the map stream, kept in the store, served as
``GET /api/v1/paths`` (admin) and exported as metrics of bounded cardinality.

A ``paths`` message (:mod:`wiregate.pathwire`; malformed ones close the stream, as
any malformed agent message does) goes through :func:`on_paths`: the device's token
bucket (:class:`gateway.pathmatrix.ReportGate`; over it, the report is dropped and
counted), then only entries about devices it may peer with are kept
(:func:`gateway.pathmatrix.admitted`), then one upsert. Every replica reads the same
rows, so every replica serves the same matrix and exports the same figures: they are
the fleet's, not this replica's (aggregate them across replicas with ``max``).

Metrics (the figures are recomputed from the store every :data:`REFRESH_S` seconds):

* ``wiregate_path_mtu`` (gauge histogram): fresh pairs by path MTU, ``le`` buckets
  :data:`gateway.pathmatrix.MTU_BUCKETS`;
* ``wiregate_path_pairs{path}``: fresh pairs by path kind (direct, relayed, probing,
  failed); ``wiregate_path_black_holes``, ``wiregate_path_unprobed_pairs``,
  ``wiregate_path_stale_pairs``, ``wiregate_path_frag_needed``,
  ``wiregate_path_probe_failures`` (sums of the agents' counts);
* ``wiregate_path_reports_total{outcome}``: reports accepted, rate-limited, or
  whose device was gone (``conflict``); ``wiregate_path_entries_refused_total``:
  entries about a device the reporter does not peer with.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

from aiohttp import web
from prometheus_client import Counter
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.api.common import require_admin, rfc3339
from gateway.appkeys import BROKER, CLOCK, METRICS, PATHS, STORE
from gateway.mapping.broker import OnPaths
from gateway.pathmatrix import (
    FleetPaths,
    Node,
    PairView,
    Summary,
    admitted,
    pair_json,
    pair_view,
)
from gateway.store import DeviceRecord
from wiregate.errors import BadInput, Conflict
from wiregate.logging import get_logger
from wiregate.pathwire import PathsReport
from wiregate.tasks import cancel_and_wait

__all__ = ["REFRESH_S", "fleet_pairs", "node_of", "on_paths", "refresh", "routes", "setup"]

routes = web.RouteTableDef()
_log = get_logger("gateway.api.paths")
REFRESH_S = 15.0
OUTCOMES = ("accepted", "rate_limited", "conflict")
REPORTS = Counter("wiregate_path_reports", "Agents' path reports, by outcome.", ["outcome"])
ENTRIES_REFUSED = Counter(
    "wiregate_path_entries_refused",
    "Path report entries about a device the reporter does not peer with.",
)
for _outcome in OUTCOMES:
    REPORTS.labels(outcome=_outcome)
_BOOLS = {"true": True, "false": False}


def node_of(record: DeviceRecord) -> Node:
    """The matrix's view of a device."""
    return Node(record.device.id, record.device.name, tuple(record.device.tags))


async def fleet_pairs(
    app: web.Application, device: str | None = None
) -> tuple[dict[str, Node], list[PairView]]:
    """Every device (by id) and every reported pair (or those of ``device``), as of now."""
    store = app[STORE]
    nodes = {r.device.id: node_of(r) for r in await store.list_devices()}
    now = app[CLOCK]()
    pairs = [
        pair_view(nodes[p.reporter], nodes[p.entry.peer], p.entry, p.reported_at, now)
        for p in await store.list_paths(device)
        if p.reporter in nodes and p.entry.peer in nodes
    ]
    return nodes, pairs


async def refresh(app: web.Application) -> Summary:
    """Recompute the metrics' figures from the store."""
    _, pairs = await fleet_pairs(app)
    app[PATHS].summary = summary = Summary.of(pairs)
    return summary


def on_paths(app: web.Application) -> OnPaths:
    """The stream's ``paths`` callback: gate, keep own peers only, upsert."""
    broker = app[BROKER]

    def may_peer(a: str, b: str) -> bool:
        return a in broker and b in broker and broker.may_peer(broker.device(a), broker.device(b))

    async def take(device_id: str, report: PathsReport) -> None:
        if not app[PATHS].gate.admit(device_id, app[CLOCK]()):
            REPORTS.labels(outcome="rate_limited").inc()
            _log.warning("paths_rate_limited", device_id=device_id)
            return
        entries, refused = admitted(device_id, report, may_peer)
        if refused:
            ENTRIES_REFUSED.inc(refused)
            _log.warning("paths_entries_refused", device_id=device_id, refused=refused,
                         reason="not a peer of the reporting device")  # fmt: skip
        try:
            await app[STORE].record_paths(device_id, entries)
        except Conflict:  # the device or a peer was deleted meanwhile
            REPORTS.labels(outcome="conflict").inc()
            return
        REPORTS.labels(outcome="accepted").inc()

    return take


@routes.get("/api/v1/paths")
async def list_paths(request: web.Request) -> web.Response:
    """Every reported pair: ``?device=`` (either side), ``?black_hole=true|false``."""
    require_admin(request)
    device = request.query.get("device")
    if device is not None and not (device.isascii() and 0 < len(device) <= 32):
        raise BadInput("device must be a device id")
    black_hole = request.query.get("black_hole")
    if black_hole is not None and black_hole not in _BOOLS:
        raise BadInput("black_hole must be true or false")
    _, pairs = await fleet_pairs(request.app, device)
    if black_hole is not None:
        pairs = [p for p in pairs if p.entry.black_hole is _BOOLS[black_hole]]
    return web.json_response({"paths": [pair_json(p, rfc3339) for p in pairs]})


def setup(app: web.Application) -> None:
    """The path state, its collector and the task refreshing its figures."""
    app[PATHS] = FleetPaths()
    app.cleanup_ctx.append(_paths_state)


async def _paths_state(app: web.Application) -> AsyncIterator[None]:
    collector = _PathCollector(app[PATHS])
    app[METRICS].register(collector)
    task = asyncio.create_task(_refresh_forever(app), name="paths-metrics")
    try:
        yield
    finally:
        await cancel_and_wait(task)
        app[METRICS].unregister(collector)


async def _refresh_forever(app: web.Application) -> None:
    while True:
        await asyncio.sleep(REFRESH_S)  # first: the store opens in a later cleanup context
        try:
            await refresh(app)
        except Exception as exc:  # a store hiccup: the last figures stay
            _log.warning("paths_refresh_failed", error=exc.__class__.__name__)


class _PathCollector(Collector):
    """The fleet's path figures, read at scrape time from the last refresh."""

    def __init__(self, paths: FleetPaths) -> None:
        self._paths = paths

    def collect(self) -> Iterator[GaugeMetricFamily | GaugeHistogramMetricFamily]:
        s = self._paths.summary
        yield GaugeHistogramMetricFamily(
            "wiregate_path_mtu",
            "Reported pairs (fresh) by path MTU, in bytes of inner packet.",
            buckets=list(s.buckets),
            gsum_value=s.mtu_sum,
        )
        by_path = GaugeMetricFamily(
            "wiregate_path_pairs", "Reported pairs (fresh) by path kind.", labels=["path"]
        )
        for kind, count in s.by_path.items():
            by_path.add_metric([kind], count)
        yield by_path
        for name, doc, value in (
            ("black_holes", "Fresh pairs whose last probe met a black hole.", s.black_holes),
            ("unprobed_pairs", "Fresh pairs with no path MTU yet.", s.unprobed),
            ("stale_pairs", "Pairs not reported for STALE_AFTER seconds.", s.stale),
            ("frag_needed", "Searches that met fragmentation-needed, summed.", s.frag_needed),
            ("probe_failures", "Path-MTU probes lost, summed over pairs.", s.probe_failures),
        ):
            yield GaugeMetricFamily(f"wiregate_path_{name}", doc, value=value)
