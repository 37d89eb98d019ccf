"""``POST /api/v1/enroll``: a device joins (its map stream is :mod:`gateway.api.stream`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Annotated

from aiohttp import web
from pydantic import Field, model_validator

from gateway.api.common import StrictModel, device_json, read_json
from gateway.api.metrics import ENROLLMENT_REFUSALS, ENROLLMENTS
from gateway.api.workload import enroll_workload
from gateway.appkeys import BROKER, SETTINGS, STORE
from gateway.mapping.broker import Broker
from gateway.store import EnrollRequest
from gateway.store.records import Enrolled
from identity.tokens import MAX_TOKEN_CHARS
from wiregate.errors import BadInput, WiregateError
from wiregate.keys import parse_public_key
from wiregate.mapwire import MAX_ROUTES, parse_endpoint
from wiregate.net import parse_endpoint as parse_hostport_endpoint
from wiregate.settings import GatewaySettings

__all__ = ["EnrollBody", "in_pools", "parse_endpoints", "parse_route", "routes", "tunnel_pools"]

routes = web.RouteTableDef()
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
MAX_ENDPOINTS = 16
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
    name is left out: a re-enrollment replaces it, and the map refuses any clash left).
    The very same prefix is no clash: several devices may stand by for one (a cluster's
    Service CIDR on every node); the map gives it to the first and the next takes over."""
    for route in routes:
        others = [d for d in broker.route_owners(route) if d.name != name and route not in d.routes]
        if others:
            raise BadInput(
                f"route {route!r} overlaps a route of device {others[0].name!r} "
                f"({others[0].id}): two devices cannot carry the same addresses",
                hint="advertise a prefix no other device carries, or remove that device first",
            )


def parse_endpoints(texts: Iterable[str], pools: Iterable[IPNetwork] = ()) -> tuple[str, ...]:
    """Validate endpoints, refusing one in ``pools`` (the tunnel addresses: what is
    sent there would go into the tunnel); duplicates are dropped, order is kept."""
    found = tuple(dict.fromkeys(parse_endpoint(t) for t in texts))
    for text in found:
        if in_pools(text, pools):
            raise BadInput(
                f"endpoint {text!r} is in the tunnel address pool: never a peer's endpoint"
            )
    return found


def in_pools(endpoint: str, pools: Iterable[IPNetwork]) -> bool:
    """Whether the address of ``endpoint`` (a valid endpoint's text) is in ``pools``."""
    ip = parse_hostport_endpoint(endpoint, allow_names=False, from_peer=False).ip
    return ip is not None and any(ip.version == p.version and ip in p for p in pools)


def tunnel_pools(settings: GatewaySettings) -> tuple[IPNetwork, IPNetwork]:
    """The tunnel address pools (IPv4, IPv6) addresses are allocated from."""
    return ipaddress.ip_network(settings.ipv4_pool), ipaddress.ip_network(settings.ipv6_pool)


def _pools(request: web.Request) -> tuple[IPNetwork, IPNetwork]:
    return tunnel_pools(request.app[SETTINGS])


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
        endpoints=parse_endpoints(body.endpoints, pools),
        routes=tuple(dict.fromkeys(parse_route(r, pools) for r in body.routes)),
        keepalive=request.app[SETTINGS].default_keepalive,
    )
    refuse_route_clashes(request.app[BROKER], enroll_request.routes, body.name)
    if body.workload_token is not None:
        enrolled = await enroll_workload(request, body.workload_token, enroll_request)
    else:
        assert body.auth_key is not None
        enrolled = await request.app[STORE].enroll(body.auth_key, enroll_request)
        _publish(request.app[BROKER], enrolled)
    return enrolled


def _publish(broker: Broker, enrolled: Enrolled) -> None:
    """Hand the new device to the broker. A retried enrollment changed nothing and
    carries the store's current version, which another change owns: its device,
    published by the first attempt, is not handed over again."""
    device = enrolled.record.device
    if device.id not in broker or broker.device(device.id) != device:
        broker.upsert(device, enrolled.version)
