"""Relay routes: the gateway's ticket signers (for relays), relay tickets and relay health.

``GET /api/v1/relay/signers`` serves the public key in the exact format of a
relay's ``verify_keys_file``. ``GET /api/v1/relay/revocations`` lists the devices
removed (deleted, disabled, expired, replaced) within the last
:data:`relay.revocations.WINDOW` seconds, in the format of
:mod:`relay.revocations`, with an ETag: relays poll it every second or so and a
``If-None-Match`` of the current list is answered ``304`` with no body. The list
is read from the store (the audit log of removals, shared by every replica) at
most every :data:`REVOCATIONS_CACHE` seconds per replica, whatever the number of
relays polling. ``POST /api/v1/relay/tickets`` gives an enrolled
device (device bearer token, as on the stream) a signed ticket to reach a peer
through a relay, if the policy lets the two peer; the relay is the pair's
current one or, for a new pair or after a failure, the least loaded relay that
is up (:class:`~gateway.relays.RelaySelector`). ``avoid`` lists relays the
device could not use. ``GET /api/v1/relays`` (device token or admin) shows what
the gateway's probes know of every relay.

A :class:`~gateway.relays.RelayMonitor` PINGs every relay each
``relay_probe_interval`` seconds from the app's cleanup context; its figures
are also Prometheus gauges on the API's metrics registry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Annotated

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import Field

from gateway.api.common import (
    StrictModel,
    bearer_token,
    read_json,
    require_admin,
)
from gateway.appkeys import (
    BROKER,
    CLOCK,
    METRICS,
    RELAY_MONITOR,
    RELAY_PROBE,
    RELAY_SELECTOR,
    RELAY_SIGNER,
    RELAYS,
    SETTINGS,
    STORE,
)
from gateway.mapping.broker import Broker
from gateway.relays import (
    RelayMonitor,
    RelaySelector,
    RelaySigner,
    load_or_create_signing_key,
    parse_relay_tcp,
)
from relay.client.probe import ping_relay
from relay.endpoints import RelayEndpoint, parse_relays
from relay.revocations import WINDOW, build_revocations
from relay.tickets import DEFAULT_LIFETIME
from wiregate.errors import BadInput, Forbidden, Unauthorized
from wiregate.logging import get_logger
from wiregate.model import Device
from wiregate.tasks import cancel_and_wait

__all__ = [
    "MAX_AVOID",
    "REVOCATIONS_CACHE",
    "RevocationList",
    "TicketBody",
    "routes",
    "setup",
]

routes = web.RouteTableDef()
MAX_AVOID = 8
REVOCATIONS_CACHE = 0.5  # seconds a replica serves the same revocation list
_log = get_logger("gateway.api.relay")

RelayId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


class TicketBody(StrictModel):
    """``POST /api/v1/relay/tickets`` request body."""

    peer: Annotated[str, Field(min_length=1, max_length=64)]
    avoid: Annotated[list[RelayId], Field(max_length=MAX_AVOID)] = []


def setup(app: web.Application) -> None:
    """Load (or create) the signing key, parse the relays and probe them while the app runs."""
    app.cleanup_ctx.append(_relay_state)


async def _relay_state(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    endpoints = parse_relays(settings.relays)
    app[RELAYS] = endpoints
    app[RELAY_SIGNER] = RelaySigner(load_or_create_signing_key(settings.state_dir))
    _log.info("relay_signer_loaded", public_key=app[RELAY_SIGNER].public_key)
    selector = RelaySelector(endpoints, tcp=parse_relay_tcp(settings.relay_tcp))
    probe = app.get(RELAY_PROBE, ping_relay)
    monitor = RelayMonitor(selector, probe, settings.relay_probe_interval, wall=app[CLOCK])
    app[RELAY_SELECTOR], app[RELAY_MONITOR] = selector, monitor
    app[REVOCATIONS] = RevocationList()
    registry, collector = app[METRICS], _RelayCollector(selector)
    registry.register(collector)
    task = asyncio.create_task(monitor.run(), name="relay-monitor")
    try:
        yield
    finally:
        await cancel_and_wait(task)
        registry.unregister(collector)


class _RelayCollector(Collector):
    """Relay health as gauges, read from the selector at scrape time."""

    def __init__(self, selector: RelaySelector) -> None:
        self._selector = selector

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "wiregate_relay_up", "1 if the relay answers PING, else 0.", labels=["relay"]
        )
        rtt = GaugeMetricFamily(
            "wiregate_relay_rtt_seconds", "Last PING round-trip time.", labels=["relay"]
        )
        load = GaugeMetricFamily(
            "wiregate_relay_load", "Allocations over capacity, as last reported.", labels=["relay"]
        )
        for status in self._selector.status():
            up.add_metric([status.relay.id], 1.0 if status.up else 0.0)
            if status.rtt is not None and status.load is not None:
                rtt.add_metric([status.relay.id], status.rtt)
                load.add_metric([status.relay.id], status.load)
        yield from (up, rtt, load)


@routes.get("/api/v1/relay/signers")
async def signers(request: web.Request) -> web.Response:
    """The public keys relays should trust, as a relay's ``verify_keys_file``."""
    return web.json_response(request.app[RELAY_SIGNER].signers_document())


class RevocationList:
    """The revocation document as last read from the store, its ETag, and when it was read."""

    def __init__(self, ttl: float = REVOCATIONS_CACHE) -> None:
        self.ttl, self.body, self.etag, self._read_at = ttl, b"", "", -float("inf")
        self._lock = asyncio.Lock()

    async def current(self, request: web.Request) -> tuple[bytes, str]:
        """The body and ETag, read again if older than ``ttl`` seconds."""
        async with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self.ttl:
                tenant = request.app[RELAY_SIGNER].tenant
                since = request.app[CLOCK]() - WINDOW  # the store's clock
                removed = await request.app[STORE].removed_devices(since)
                doc = build_revocations((tenant, device, at) for device, at in removed)
                self.body = json.dumps(doc, separators=(",", ":")).encode()
                self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'
                self._read_at = now
            return self.body, self.etag


REVOCATIONS = web.AppKey("relay_revocations", RevocationList)


@routes.get("/api/v1/relay/revocations")
async def revocations(request: web.Request) -> web.Response:
    """Devices removed lately, for relays to release and refuse (conditional GET)."""
    body, etag = await request.app[REVOCATIONS].current(request)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _matches(request.headers.get("If-None-Match", ""), etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="application/json", headers=headers)


def _matches(if_none_match: str, etag: str) -> bool:
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return etag in tags or "*" in tags


@routes.get("/api/v1/relays")
async def relays(request: web.Request) -> web.Response:
    """Every configured relay with what the probes know: up, RTT, load."""
    await _device_or_admin(request)
    await request.app[RELAY_MONITOR].wait_first_round()
    status = request.app[RELAY_SELECTOR].status()
    return web.json_response({"relays": [s.to_dict() for s in status]})


async def _device_or_admin(request: web.Request) -> None:
    with contextlib.suppress(Unauthorized, Forbidden):
        require_admin(request)
        return
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("a device or admin bearer token is required", code="invalid_token")
    await request.app[STORE].device_by_token(token)


@routes.post("/api/v1/relay/tickets")
async def create_ticket(request: web.Request) -> web.Response:
    """A ticket admitting the calling device to a relayed path to ``peer``."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("a device bearer token is required", code="invalid_token")
    record = await request.app[STORE].device_by_token(token)
    body = await read_json(request, TicketBody)
    broker = request.app[BROKER]
    caller, peer = broker.device(record.device.id), broker.device(body.peer)
    _check_pair(broker, caller, peer)
    await request.app[RELAY_MONITOR].wait_first_round()
    relay = await _shared_choice(request, caller.id, peer.id, body.avoid)
    ticket = request.app[RELAY_SIGNER].ticket_for(relay, caller, peer)
    _log.info(
        "relay_ticket_issued", device_id=caller.id, peer=peer.id, relay=relay.id, avoid=body.avoid
    )
    return web.json_response(
        {
            "relay": request.app[RELAY_SELECTOR].ticket_relay(relay),
            "ticket": base64.b64encode(ticket).decode(),
            "expires_in": DEFAULT_LIFETIME,
        },
        status=201,
    )


async def _shared_choice(
    request: web.Request, a: str, b: str, avoid: Sequence[str]
) -> RelayEndpoint:
    """The pair's relay, agreed through the store so that both sides get the same one
    whichever replica they ask: the claimed relay if this replica finds it usable, else
    this replica's choice, claimed with compare-and-set (a lost race adopts the
    winner's)."""
    selector, store = request.app[RELAY_SELECTOR], request.app[STORE]
    shared = await store.relay_pair(a, b)
    for _ in range(3):
        now = time.monotonic()
        if shared is not None:
            selector.adopt(a, b, shared, now)
        relay = selector.choose(a, b, avoid, now)
        if relay.id == shared:
            return relay
        agreed = await store.claim_relay_pair(a, b, relay.id, shared)
        if agreed == relay.id:
            return relay
        shared, avoid = agreed, ()
    return relay


def _check_pair(broker: Broker, caller: Device, peer: Device) -> None:
    if caller.id == peer.id:
        raise BadInput("a device cannot relay to itself")
    if not broker.may_peer(caller, peer):
        raise Forbidden("the policy does not let these devices peer", code="not_peers")
