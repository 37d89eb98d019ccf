"""Relay routes: the gateway's ticket signers (for relays) and relay tickets (for devices).

``GET /api/v1/relay/signers`` serves the public key in the exact format of a
relay's ``verify_keys_file``. ``POST /api/v1/relay/tickets`` gives an enrolled
device (device bearer token, as on the stream) a signed ticket to reach a peer
through a relay, if the policy lets the two peer.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Annotated

from aiohttp import web
from pydantic import Field

from gateway.api.common import BROKER, SETTINGS, STORE, StrictModel, bearer_token, read_json
from gateway.broker import Broker
from gateway.errors import BadInput, Forbidden, Unauthorized, Unavailable
from gateway.logging import get_logger
from gateway.model import Device
from gateway.relays import RelayEndpoint, RelaySigner, load_or_create_signing_key, parse_relays

__all__ = ["RELAYS", "RELAY_SIGNER", "TicketBody", "routes", "setup"]

routes = web.RouteTableDef()
RELAY_SIGNER = web.AppKey("relay_signer", RelaySigner)
RELAYS = web.AppKey("relays", tuple[RelayEndpoint, ...])
_log = get_logger("gateway.api.relay")


class TicketBody(StrictModel):
    """``POST /api/v1/relay/tickets`` request body."""

    peer: Annotated[str, Field(min_length=1, max_length=64)]


def setup(app: web.Application) -> None:
    """Load (or create) the signing key and parse the relays when the app starts."""
    app.cleanup_ctx.append(_relay_state)


async def _relay_state(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[RELAYS] = parse_relays(settings.relays)
    app[RELAY_SIGNER] = RelaySigner(load_or_create_signing_key(settings.state_dir))
    _log.info("relay_signer_loaded", public_key=app[RELAY_SIGNER].public_key)
    yield


@routes.get("/api/v1/relay/signers")
async def signers(request: web.Request) -> web.Response:
    """The public keys relays should trust, as a relay's ``verify_keys_file``."""
    return web.json_response(request.app[RELAY_SIGNER].signers_document())


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
    relay = _pick_relay(request.app[RELAYS])
    ticket = request.app[RELAY_SIGNER].ticket_for(relay, caller, peer)
    _log.info("relay_ticket_issued", device_id=caller.id, peer=peer.id, relay=relay.id)
    return web.json_response(
        {
            "relay": {"id": relay.id, "control": relay.control},
            "ticket": base64.b64encode(ticket).decode(),
        },
        status=201,
    )


def _check_pair(broker: Broker, caller: Device, peer: Device) -> None:
    if caller.id == peer.id:
        raise BadInput("a device cannot relay to itself")
    if not broker.may_peer(caller, peer):
        raise Forbidden("the policy does not let these devices peer", code="not_peers")


def _pick_relay(relays: tuple[RelayEndpoint, ...]) -> RelayEndpoint:
    # The first configured relay for now; choosing the nearest or least loaded
    # relay (latency reports, allocation counts) is later work.
    if not relays:
        raise Unavailable("no relay is configured", hint="set relays in [gateway]")
    return relays[0]
