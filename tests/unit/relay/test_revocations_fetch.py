"""The relay follows the gateway's revocation list: a real aiohttp server serves the
signers and the revocation document (with an ETag), a real relay on loopback releases
the listed devices' allocations and refuses their older tickets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from aiohttp import web
from nacl.signing import SigningKey

from lab.relay_fixtures import NOW, RELAY_ID, TENANT, node, signer, ticket
from lab.relay_net import LOOPBACK, exchange, udp_socket
from relay.aio.forwarding import ForwardingSettings
from relay.aio.signers import revocations_url
from relay.aio.stun import RelayServer
from relay.client.bind import build_allocate
from relay.controlwire import Allocated, Refused, parse_control
from relay.forwarding import RelayConfig
from relay.revocations import build_revocations
from wiregate.settings import RelaySettings

A, B = node("dev-a"), node("dev-b")
REFRESH = 0.1  # the test's revocation poll; the default is 1 s


class Gateway:
    """GET …/signers and GET …/revocations (conditional: ETag, 304), counted."""

    def __init__(self, key: SigningKey, *, revocations: bool = True) -> None:
        public = base64.b64encode(bytes(key.verify_key)).decode()
        self.signers = {"signers": [{"public_key": public, "tenants": [TENANT]}]}
        self.revocations = revocations
        self.body = json.dumps(build_revocations([])).encode()
        self.full = self.not_modified = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    def revoke(self, *entries: tuple[str, str, float]) -> None:
        self.body = json.dumps(build_revocations(entries)).encode()

    async def _signers(self, _request: web.Request) -> web.Response:
        return web.json_response(self.signers)

    async def _revocations(self, request: web.Request) -> web.Response:
        etag = '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'
        if request.headers.get("If-None-Match") == etag:
            self.not_modified += 1
            return web.Response(status=304, headers={"ETag": etag})
        self.full += 1
        return web.Response(body=self.body, content_type="application/json",
                            headers={"ETag": etag})  # fmt: skip

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/relay/signers", self._signers)
        if self.revocations:
            app.router.add_get("/api/v1/relay/revocations", self._revocations)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, LOOPBACK, 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/api/v1/relay/signers"


@pytest.fixture
def key() -> SigningKey:
    return signer()[0]


@pytest.fixture
async def relay(key: SigningKey, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    gateway = Gateway(key, revocations=getattr(request, "param", True))
    await gateway.start()
    forwarding = ForwardingSettings(
        LOOPBACK,
        0,
        (0,) * 4,
        RelayConfig(RELAY_ID, 0, (), allow_loopback=True),
        (),
        b"k" * 32,
        signers_url=gateway.url,
        signers_refresh=5.0,
        signers_retry=0.05,
        revocations_refresh=REFRESH,
    )
    settings = RelaySettings(stun_listen=[f"{LOOPBACK}:0"], metrics_listen="")
    server = RelayServer(settings, forwarding=forwarding, clock=lambda: NOW)
    await server.start()
    try:
        assert server.signers is not None
        async with asyncio.timeout(5):
            while not server.signers.signers:
                await server.signers.updated.wait()
        yield server, gateway
    finally:
        await server.close()
        await gateway.stop()


async def allocate(server: RelayServer, tkt: bytes) -> Allocated | Refused:
    assert server.forwarder is not None and server.forwarder.control_address is not None
    sock = udp_socket()
    try:
        reply = await exchange(sock, build_allocate(tkt), server.forwarder.control_address)
    finally:
        sock.close()
    assert reply is not None
    msg = parse_control(reply)
    assert isinstance(msg, Allocated | Refused), msg
    return msg


def test_the_revocation_document_sits_next_to_the_signers() -> None:
    assert revocations_url("https://gw.example:8443/api/v1/relay/signers") == (
        "https://gw.example:8443/api/v1/relay/revocations"
    )


async def test_a_revoked_device_loses_its_allocation_within_a_poll(
    relay: Any, key: SigningKey
) -> None:
    server, gateway = relay
    old = ticket(key, A, B, now=NOW - 10)
    assert isinstance(await allocate(server, old), Allocated)
    core = server.forwarder.core
    assert len(core.allocations()) == 1
    started = time.monotonic()
    gateway.revoke((TENANT, "dev-b", NOW - 5))
    async with asyncio.timeout(5):
        while core.allocations():
            await asyncio.sleep(0.01)
    latency = time.monotonic() - started
    # one revocation poll and its request (slack for a busy machine), never the signers'
    # pace (5 s here)
    assert latency < REFRESH + 1.5, latency
    assert core.counters["revoked"] == 1
    refused = await allocate(server, ticket(key, A, B, now=NOW - 10))
    assert refused == Refused(refused.ticket_id, "ticket_revoked")
    assert isinstance(await allocate(server, ticket(key, A, B, now=NOW)), Allocated)


async def test_an_unchanged_list_costs_a_304_and_is_applied_once(relay: Any) -> None:
    server, gateway = relay
    applied: list[int] = []
    real = server.forwarder.revoke

    def counted(revoked: dict[tuple[str, str], float]) -> None:
        applied.append(len(revoked))
        real(revoked)

    server.signers._revoke = counted  # the watcher's callback, now counted
    gateway.revoke((TENANT, "dev-x", NOW))
    await asyncio.sleep(REFRESH * 8)
    assert applied == [1]
    assert gateway.full <= 3 and gateway.not_modified >= 4  # 200 once per change, then 304s


@pytest.mark.parametrize("relay", [False], indirect=True)
async def test_an_older_gateway_without_the_list_leaves_the_relay_working(
    relay: Any, key: SigningKey
) -> None:
    server, _gateway = relay
    with structlog.testing.capture_logs() as logs:
        await asyncio.sleep(REFRESH * 3)
    assert server.signers.revoked == {} and server.signers.revocation_failures == 0
    assert [e for e in logs if e["event"] == "relay revocations fetch failed"] == []
    assert isinstance(await allocate(server, ticket(key, A, B)), Allocated)


async def test_a_bad_document_keeps_the_last_list(relay: Any, key: SigningKey) -> None:
    server, gateway = relay
    gateway.revoke((TENANT, "dev-b", NOW))
    async with asyncio.timeout(5):
        while not server.signers.revoked:
            await server.signers.revocations_updated.wait()
    failures = server.signers.revocation_failures
    gateway.body = b'{"revoked": [{"tenant": "t"}]}'
    await asyncio.sleep(REFRESH * 3)
    assert server.signers.revocation_failures > failures
    assert server.signers.revoked == {(TENANT, "dev-b"): NOW}
    refused = await allocate(server, ticket(key, A, B, now=NOW - 1))
    assert isinstance(refused, Refused) and refused.reason == "ticket_revoked"
