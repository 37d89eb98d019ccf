"""The relay learns its signers from the gateway's signers URL: a real aiohttp server
serves the document, a real relay on loopback answers ALLOCATE (or refuses it)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from nacl.signing import SigningKey

from lab.relay_fixtures import NOW, RELAY_ID, TENANT, node, signer, ticket
from lab.relay_net import LOOPBACK, exchange, udp_socket
from relay.aio.forwarding import ForwardingSettings, forwarding_from_settings, load_verify_keys
from relay.aio.signers import SignersWatcher
from relay.aio.stun import RelayServer
from relay.client.bind import build_allocate
from relay.client.stun import build_binding_request, parse_binding_response
from relay.controlwire import Allocated, Refused, parse_control
from relay.forwarding import RelayConfig
from relay.tickets import TrustedSigner
from wiregate.errors import ConfigError
from wiregate.settings import RelaySettings

A, B = node("dev-a"), node("dev-b")


def document(*keys: SigningKey) -> dict[str, Any]:
    return {
        "signers": [
            {"public_key": base64.b64encode(bytes(k.verify_key)).decode(), "tenants": [TENANT]}
            for k in keys
        ]
    }


class Gateway:
    """A real HTTP server whose GET /api/v1/relay/signers answers ``self.body``."""

    def __init__(self) -> None:
        self.body: bytes = b""
        self.status = 200
        self.hits = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    def serve(self, doc: dict[str, Any] | bytes) -> None:
        self.body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()

    async def _signers(self, _request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(body=self.body, status=self.status, content_type="application/json")

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/relay/signers", self._signers)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/api/v1/relay/signers"


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    gw = Gateway()
    yield gw
    await gw.stop()


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def forwarding(url: str) -> ForwardingSettings:
    config = RelayConfig(RELAY_ID, 0, (), allow_loopback=True)
    return ForwardingSettings(
        LOOPBACK,
        0,
        (0,) * 4,
        config,
        (),
        b"k" * 32,
        signers_url=url,
        signers_refresh=0.1,
        signers_retry=0.05,
    )


@pytest.fixture
async def start_relay() -> AsyncIterator[Callable[[str], Any]]:
    servers: list[RelayServer] = []

    async def start(url: str) -> RelayServer:
        settings = RelaySettings(stun_listen=[f"{LOOPBACK}:0"], metrics_listen="")
        server = RelayServer(settings, forwarding=forwarding(url), clock=lambda: NOW)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


async def allocate(relay: RelayServer, key: SigningKey) -> Allocated | Refused:
    assert relay.forwarder is not None and relay.forwarder.control_address is not None
    tkt = ticket(key, A, B)
    sock = udp_socket()
    try:
        reply = await exchange(sock, build_allocate(tkt), relay.forwarder.control_address)
    finally:
        sock.close()
    assert reply is not None, "the relay did not answer ALLOCATE"
    msg = parse_control(reply)
    assert isinstance(msg, Allocated | Refused), msg
    return msg


async def wait_signers(relay: RelayServer, *keys: SigningKey) -> None:
    want = tuple(TrustedSigner(bytes(k.verify_key), frozenset({TENANT})) for k in keys)
    assert relay.signers is not None
    async with asyncio.timeout(5):
        while relay.signers.signers != want:
            await relay.signers.updated.wait()


async def stun_answers(relay: RelayServer) -> bool:
    sock = udp_socket()
    try:
        txid, request = build_binding_request()
        reply = await exchange(sock, request, relay.stun_addresses[0])
        return (
            reply is not None and parse_binding_response(reply, txid).mapped == sock.getsockname()
        )
    finally:
        sock.close()


async def test_signers_fetched_at_start_admit_tickets(
    gateway: Gateway, start_relay: Callable[[str], Any]
) -> None:
    key, _ = signer()
    gateway.serve(document(key))
    await gateway.start()
    relay: RelayServer = await start_relay(gateway.url)
    await wait_signers(relay, key)
    assert isinstance(await allocate(relay, key), Allocated)
    stranger, _ = signer()
    refused = await allocate(relay, stranger)
    assert isinstance(refused, Refused) and refused.reason == "ticket_unknown_signer"


async def test_a_rotated_key_is_picked_up(
    gateway: Gateway, start_relay: Callable[[str], Any]
) -> None:
    old, _ = signer()
    new, _ = signer()
    gateway.serve(document(old))
    await gateway.start()
    relay: RelayServer = await start_relay(gateway.url)
    await wait_signers(relay, old)
    assert isinstance(await allocate(relay, old), Allocated)

    gateway.serve(document(new, old))  # rotation: both for a while
    await wait_signers(relay, new, old)
    assert isinstance(await allocate(relay, new), Allocated)

    gateway.serve(document(new))  # the old key retired
    await wait_signers(relay, new)
    refused = await allocate(relay, old)
    assert isinstance(refused, Refused) and refused.reason == "ticket_unknown_signer"
    assert isinstance(await allocate(relay, new), Allocated)


async def test_fails_closed_while_the_gateway_is_unreachable(
    gateway: Gateway, start_relay: Callable[[str], Any]
) -> None:
    key, _ = signer()
    port = free_tcp_port()
    url = f"http://{LOOPBACK}:{port}/api/v1/relay/signers"
    with structlog.testing.capture_logs() as logs:
        relay: RelayServer = await start_relay(url)
        assert relay.signers is not None
        async with asyncio.timeout(5):
            while relay.signers.failures < 3:  # retried with backoff
                await asyncio.sleep(0.02)
        # STUN is served meanwhile; no relay session is admitted.
        assert await stun_answers(relay)
        refused = await allocate(relay, key)
        assert isinstance(refused, Refused) and refused.reason == "no_verify_keys"

        gateway.serve(document(key))
        await gateway.start(port)
        await wait_signers(relay, key)
    assert isinstance(await allocate(relay, key), Allocated)
    failures = [e for e in logs if e["event"] == "relay signers fetch failed"]
    assert len(failures) >= 3
    for entry in failures:
        assert entry["log_level"] == "warning" and entry["url"] == url
        assert entry["error"] and "\n" not in entry["error"]


@pytest.mark.parametrize(
    "garbage",
    [
        b"<html>\n<body>502 Bad Gateway</body>\n</html>",
        b'{"signers": []}',
        b'{"signers": [{"public_key": "AAAA", "tenants": ["default"]}]}',
        b'{"signers": [], "extra": 1}',
        b"\xff\xfe",
    ],
)
async def test_garbage_is_refused_with_one_log_line(
    gateway: Gateway, start_relay: Callable[[str], Any], garbage: bytes
) -> None:
    key, _ = signer()
    gateway.serve(garbage)
    await gateway.start()
    with structlog.testing.capture_logs() as logs:
        relay: RelayServer = await start_relay(gateway.url)
        assert relay.signers is not None
        async with asyncio.timeout(5):
            while relay.signers.failures < 2:
                await asyncio.sleep(0.02)
        refused = await allocate(relay, key)
        assert isinstance(refused, Refused) and refused.reason == "no_verify_keys"

        # With good signers known, later garbage keeps them.
        gateway.serve(document(key))
        await wait_signers(relay, key)
        gateway.serve(garbage)
        before = relay.signers.failures
        async with asyncio.timeout(5):
            while relay.signers.failures < before + 2:
                await asyncio.sleep(0.02)
        assert isinstance(await allocate(relay, key), Allocated)
    failures = [e for e in logs if e["event"] == "relay signers fetch failed"]
    assert failures
    for entry in failures:
        assert entry["error"].startswith("refused: ")
        assert "\n" not in entry["error"]


async def test_an_http_error_is_a_failure(
    gateway: Gateway, start_relay: Callable[[str], Any]
) -> None:
    key, _ = signer()
    gateway.serve(document(key))
    gateway.status = 503
    await gateway.start()
    with structlog.testing.capture_logs() as logs:
        relay: RelayServer = await start_relay(gateway.url)
        assert relay.signers is not None
        async with asyncio.timeout(5):
            while relay.signers.failures < 1:
                await asyncio.sleep(0.02)
        gateway.status = 200
        await wait_signers(relay, key)
    assert any(e.get("error", "").startswith("HTTP 503") for e in logs)


async def test_the_file_and_the_url_share_one_parser(tmp_path: Path, gateway: Gateway) -> None:
    key, trusted = signer()
    gateway.serve(document(key))
    await gateway.start()
    path = tmp_path / "verify-keys.json"
    path.write_bytes(gateway.body)
    got: list[tuple[TrustedSigner, ...]] = []
    watcher = SignersWatcher(gateway.url, got.append, refresh=10.0)
    watcher.start()
    try:
        async with asyncio.timeout(5):
            await watcher.updated.wait()
    finally:
        await watcher.close()
    assert got == [load_verify_keys(path)] == [(trusted,)]


# -- settings -------------------------------------------------------------------------


def test_exactly_one_source_of_signers(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, _ = signer()
    path.write_text(json.dumps(document(key)))
    url = "http://wiregate-gateway.wiregate.svc:8080/api/v1/relay/signers"
    with pytest.raises(ConfigError, match="neither verify_keys_file nor signers_url"):
        forwarding_from_settings(RelaySettings(relay_id="relay-1"))
    with pytest.raises(ConfigError, match="both set"):
        forwarding_from_settings(
            RelaySettings(relay_id="relay-1", verify_keys_file=path, signers_url=url)
        )
    fwd = forwarding_from_settings(RelaySettings(relay_id="relay-1", signers_url=url))
    assert fwd is not None and fwd.verify_keys == () and fwd.signers_url == url
    assert fwd.signers_refresh == 60.0
    fwd = forwarding_from_settings(RelaySettings(relay_id="relay-1", verify_keys_file=path))
    assert fwd is not None and len(fwd.verify_keys) == 1 and not fwd.signers_url
    assert dataclasses.replace(fwd, signers_refresh=1.0).signers_refresh == 1.0


@pytest.mark.parametrize(
    "url",
    [
        "https://gateway.example.com/api/v1/relay/signers",
        "https://wiregate-gateway.wiregate.svc:8080/api/v1/relay/signers",
        "http://wiregate-gateway.wiregate.svc:8080/api/v1/relay/signers",
        "http://wiregate-gateway.wiregate.svc.cluster.local:8080/api/v1/relay/signers",
        "http://127.0.0.1:8080/api/v1/relay/signers",
    ],
)
def test_signers_url_accepted(url: str) -> None:
    assert RelaySettings(signers_url=url).signers_url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://gateway.example.com/api/v1/relay/signers",  # plain http across networks
        "http://svc.example.com/api/v1/relay/signers",
        "ftp://wiregate-gateway.wiregate.svc/signers",
        "https:///api/v1/relay/signers",
        "https://gateway.example.com/api/v1/relay/signers?x=1",
    ],
)
def test_signers_url_refused(url: str) -> None:
    with pytest.raises(ValueError, match="signers_url"):
        RelaySettings(signers_url=url)


def test_a_missing_ca_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="signers_ca_file"):
        SignersWatcher(
            "https://gateway.example.com/api/v1/relay/signers",
            lambda _s: None,
            ca_file=tmp_path / "missing.crt",
        )
