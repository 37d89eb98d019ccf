"""``GET /api/v1/stream``: an agent's map stream (WebSocket), served by the broker."""

from __future__ import annotations

from aiohttp import web

from gateway.api.common import EndpointsCallback, bearer_token
from gateway.api.enroll import (
    MAX_ENDPOINTS,
    IPNetwork,
    in_pools,
    parse_endpoints,
    parse_route,
    refuse_route_clashes,
    tunnel_pools,
)
from gateway.api.paths import on_paths
from gateway.appkeys import BROKER, FOLLOWER, SETTINGS, STORE
from gateway.mapping.broker import PODS_REFUSED, OnPods
from wiregate.errors import BadInput, Conflict, NotFound, Unauthorized
from wiregate.logging import get_logger
from wiregate.mapwire import AgentEndpoints
from wiregate.podwire import PodReport

__all__ = ["routes"]

routes = web.RouteTableDef()
_log = get_logger("gateway.api.stream")
SYNC_WAIT_S = 2.0  # how long a stream waits for this replica to reach the agent's version


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
        # enrolled moments ago (through another replica, or held behind a version not
        # published yet): catch up to the store's head
        await follower.sync(await request.app[STORE].map_version(), SYNC_WAIT_S)
    elif follower is not None and since is not None and since > broker.version:
        # the agent comes from a replica further ahead: catch up so it can resume
        await follower.sync(since, SYNC_WAIT_S)
    try:
        return await broker.serve(
            request,
            record.device.id,
            since,
            _on_endpoints(request.app),
            on_paths(request.app),
            _on_pods(request.app),
        )
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
    pools = tunnel_pools(app[SETTINGS])

    async def on_endpoints(device_id: str, report: AgentEndpoints) -> None:
        try:  # an endpoint in the tunnel pools is left out, as refused addresses are
            valid = tuple(e for e in _agent_endpoints(report.endpoints) if not in_pools(e, pools))
            routes = _agent_routes(app, device_id, report.routes, pools)
            changed = await app[STORE].set_endpoints(
                device_id, valid, report.nat, routes, report.agent
            )
        except (BadInput, NotFound) as exc:
            _log.warning("endpoints_refused", device_id=device_id, reason=exc.message)
            return
        if changed is not None:
            record, version = changed
            app[BROKER].upsert(record.device, version)

    return on_endpoints


def _agent_routes(
    app: web.Application,
    device_id: str,
    routes: tuple[str, ...] | None,
    pools: tuple[IPNetwork, IPNetwork],
) -> tuple[str, ...] | None:
    """The routes an agent advertises now, validated as at enrollment (None: it did not
    say); a route another device carries refuses the whole report (BadInput), which
    leaves the device's routes as they were."""
    if routes is None:
        return None
    valid = tuple(dict.fromkeys(parse_route(r, pools) for r in routes))
    broker = app[BROKER]
    device = broker.device(device_id)  # NotFound: gone meanwhile
    refuse_route_clashes(broker, [r for r in valid if r not in device.routes], device.name)
    return valid


def _on_pods(app: web.Application) -> OnPods:
    async def on_pods(device_id: str, report: PodReport) -> None:
        try:  # stored first, so that every replica reads it at its version
            version = await app[STORE].record_pods(device_id, report)
        except (Conflict, NotFound) as exc:  # too many pods, or the node was deleted
            if isinstance(exc, Conflict):
                PODS_REFUSED.labels(reason="too_many").inc(len(report.upsert))
            _log.warning("pods_refused", device_id=device_id, reason=exc.message)
            return
        app[BROKER].pods(device_id, report, version)

    return on_pods
