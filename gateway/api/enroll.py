"""Agent-facing routes: ``POST /api/v1/enroll`` and the ``GET /api/v1/stream`` WebSocket."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Annotated

from aiohttp import web
from pydantic import Field, model_validator

from gateway.api.common import (
    BROKER,
    FOLLOWER,
    SETTINGS,
    STORE,
    EndpointsCallback,
    StrictModel,
    bearer_token,
    device_json,
    read_json,
)
from gateway.api.metrics import ENROLLMENT_REFUSALS, ENROLLMENTS
from gateway.api.workload import enroll_workload
from gateway.mapping.broker import Broker
from gateway.store import EnrollRequest
from gateway.store.records import Enrolled
from identity.tokens import MAX_TOKEN_CHARS
from wiregate.errors import BadInput, NotFound, Unauthorized, WiregateError
from wiregate.keys import parse_public_key
from wiregate.logging import get_logger
from wiregate.mapwire import AgentEndpoints

__all__ = ["EnrollBody", "parse_endpoint", "parse_route", "routes"]

routes = web.RouteTableDef()
_log = get_logger("gateway.api.enroll")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
MAX_ENDPOINTS = 16
SYNC_WAIT_S = 2.0  # how long a stream waits for this replica to reach the agent's version
MAX_ROUTES = 64
_METADATA = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)


class EnrollBody(StrictModel):
    """``POST /api/v1/enroll`` request body: exactly one of ``auth_key``, ``workload_token``."""

    auth_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    workload_token: Annotated[str, Field(min_length=1, max_length=MAX_TOKEN_CHARS)] | None = None
    public_key: Annotated[str, Field(max_length=64)]
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    endpoints: Annotated[
        list[Annotated[str, Field(max_length=64)]], Field(max_length=MAX_ENDPOINTS)
    ] = []
    routes: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=MAX_ROUTES)] = []

    @model_validator(mode="after")
    def _one_credential(self) -> EnrollBody:
        if (self.auth_key is None) == (self.workload_token is None):
            raise ValueError("give exactly one of auth_key and workload_token")
        return self


def parse_endpoint(text: str) -> str:
    """Validate an ``ip:port`` / ``[ipv6]:port`` candidate; return its canonical form.

    The address must be real unicast: not loopback, unspecified, multicast,
    link-local, reserved or a cloud metadata address.
    """
    host, sep, port_text = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise BadInput(f"endpoint {text!r} is not ip:port") from None
    if not sep or ip.version != (6 if bracketed else 4) or not _is_port(port_text):
        raise BadInput(f"endpoint {text!r} is not ip:port (IPv6 as [addr]:port)")
    _refuse_special(ip, f"endpoint {text!r}")
    return f"[{ip}]:{int(port_text)}" if bracketed else f"{ip}:{int(port_text)}"


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) < 65536


def _refuse_special(ip: IPAddress, what: str) -> None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    special = (
        ip.is_loopback
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_link_local
        or ip.is_reserved
        or ip in _METADATA
    )
    if special:
        raise BadInput(f"{what} is not a unicast address a peer can reach")


def parse_route(text: str, pools: Iterable[IPNetwork]) -> str:
    """Validate an advertised route (CIDR, host bits zero); return its canonical form."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise BadInput(f"route {text!r} is not a CIDR with zero host bits") from None
    if net.prefixlen == 0:
        raise BadInput(f"route {text!r} is a default route, which is not allowed")
    _refuse_special(net.network_address, f"route {text!r}")
    if any(net.version == pool.version and net.overlaps(pool) for pool in pools):
        raise BadInput(f"route {text!r} overlaps the tunnel address pool")
    return str(net)


def refuse_route_clashes(broker: Broker, routes: Iterable[str], name: str) -> None:
    """Refuse a route overlapping one another device carries (a device of the same
    name is left out: a re-enrollment replaces it, and the map refuses any clash left)."""
    for route in routes:
        others = [d for d in broker.route_owners(route) if d.name != name]
        if others:
            raise BadInput(
                f"route {route!r} overlaps a route of device {others[0].name!r} "
                f"({others[0].id}): two devices cannot carry the same addresses",
                hint="advertise a prefix no other device carries, or remove that device first",
            )


def parse_endpoints(texts: Iterable[str]) -> tuple[str, ...]:
    """Validate endpoints; duplicates are dropped, order is kept."""
    return tuple(dict.fromkeys(parse_endpoint(t) for t in texts))


def _pools(request: web.Request) -> tuple[IPNetwork, IPNetwork]:
    settings = request.app[SETTINGS]
    return ipaddress.ip_network(settings.ipv4_pool), ipaddress.ip_network(settings.ipv6_pool)


@routes.post("/api/v1/enroll")
async def enroll(request: web.Request) -> web.Response:
    """Enroll a device with an enrollment key or a workload token; returns it, its stream
    token, the map version."""
    body = await read_json(request, EnrollBody)
    method = "auth_key" if body.workload_token is None else "workload_token"
    try:
        enrolled = await _enroll(request, body)
    except WiregateError as exc:
        ENROLLMENT_REFUSALS.labels(method=method, reason=exc.code).inc()
        raise
    ENROLLMENTS.labels(method=method).inc()
    payload = {
        "device": device_json(enrolled.record),
        "token": enrolled.token,
        "map_version": enrolled.version,
    }
    return web.json_response(payload, status=201)


async def _enroll(request: web.Request, body: EnrollBody) -> Enrolled:
    pools = _pools(request)
    enroll_request = EnrollRequest(
        public_key=parse_public_key(body.public_key),
        name=body.name,
        endpoints=parse_endpoints(body.endpoints),
        routes=tuple(dict.fromkeys(parse_route(r, pools) for r in body.routes)),
        keepalive=request.app[SETTINGS].default_keepalive,
    )
    refuse_route_clashes(request.app[BROKER], enroll_request.routes, body.name)
    if body.workload_token is not None:
        enrolled = await enroll_workload(request, body.workload_token, enroll_request)
    else:
        assert body.auth_key is not None
        enrolled = await request.app[STORE].enroll(body.auth_key, enroll_request)
        request.app[BROKER].upsert(enrolled.record.device, enrolled.version)
    return enrolled


@routes.get("/api/v1/stream")
async def stream(request: web.Request) -> web.StreamResponse:
    """The agent's map stream (WebSocket), authenticated by its device token."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("a device bearer token is required", code="invalid_token")
    record = await request.app[STORE].device_by_token(token)
    since = _parse_since(request.query.get("since"))
    await request.app[STORE].touch(record.device.id)
    _log.info("stream_open", device_id=record.device.id, since=since)
    broker = request.app[BROKER]
    follower = request.app.get(FOLLOWER)
    if follower is not None and record.device.id not in broker:
        # enrolled through another replica moments ago: catch up to the store's head
        await follower.sync(await request.app[STORE].map_version(), SYNC_WAIT_S)
    elif follower is not None and since is not None and since > broker.version:
        # the agent comes from a replica further ahead: catch up so it can resume
        await follower.sync(since, SYNC_WAIT_S)
    try:
        return await broker.serve(request, record.device.id, since, _on_endpoints(request.app))
    finally:  # when it went away: ephemeral devices are swept ephemeral_timeout later
        await request.app[STORE].touch(record.device.id)


def _parse_since(text: str | None) -> int | None:
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise BadInput("since must be a non-negative integer map version")
    return int(text)


def _agent_endpoints(endpoints: object) -> tuple[str, ...]:
    if not isinstance(endpoints, list) or len(endpoints) > MAX_ENDPOINTS:
        raise BadInput(f"endpoints must be a list of at most {MAX_ENDPOINTS} strings")
    if not all(isinstance(e, str) for e in endpoints):
        raise BadInput("endpoints must be strings")
    return parse_endpoints(endpoints)


def _on_endpoints(app: web.Application) -> EndpointsCallback:
    async def on_endpoints(device_id: str, report: AgentEndpoints) -> None:
        try:
            valid = _agent_endpoints(report.endpoints)
            changed = await app[STORE].set_endpoints(device_id, valid, report.nat)
        except (BadInput, NotFound) as exc:
            _log.warning("endpoints_refused", device_id=device_id, reason=exc.message)
            return
        if changed is not None:
            record, version = changed
            app[BROKER].upsert(record.device, version)

    return on_endpoints
