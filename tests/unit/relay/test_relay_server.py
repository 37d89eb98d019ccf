"""run_relay on loopback ephemeral ports, queried with real UDP sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from relay.aio.stun import RelayServer, run_relay
from relay.client.stun import build_binding_request, parse_binding_response, stun_query
from relay.errors import StunTimeout
from wiregate.errors import ConfigError
from wiregate.net import parse_hostport
from wiregate.settings import RelaySettings

LOOPBACK = "127.0.0.1"


@pytest.fixture
async def relay() -> AsyncIterator[RelayServer]:
    settings = RelaySettings(
        stun_listen=[f"{LOOPBACK}:0", f"{LOOPBACK}:0"], metrics_listen=f"{LOOPBACK}:0"
    )
    ready: asyncio.Future[RelayServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_relay(settings, on_ready=ready.set_result))
    server = await asyncio.wait_for(ready, 5)
    yield server
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture
def udp() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.setblocking(False)
    yield sock
    sock.close()


async def exchange(
    sock: socket.socket, data: bytes, to: tuple[str, int], wait: float = 1.0
) -> bytes | None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, data, to)
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 2048), wait)
    except TimeoutError:
        return None


async def test_mapped_address_is_the_client_socket(relay: RelayServer, udp: socket.socket) -> None:
    first, second = relay.stun_addresses
    for here, there in ((first, second), (second, first)):
        txid, request = build_binding_request()
        reply = await exchange(udp, request, here)
        assert reply is not None
        answer = parse_binding_response(reply, txid)
        assert answer.mapped == udp.getsockname()
        assert answer.response_origin == here
        assert answer.other_address == there


async def test_stun_query_from_a_chosen_port(relay: RelayServer) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind((LOOPBACK, 0))
    port = probe.getsockname()[1]
    probe.close()
    assert await stun_query(relay.stun_addresses[0], local_port=port) == (LOOPBACK, port)
    host, ephemeral = await stun_query(relay.stun_addresses[1])
    assert host == LOOPBACK and ephemeral > 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00",
        b"\x01\x00\x00\x00" + bytes(144),  # a WireGuard handshake initiation
        b"\x00\x01\x00\x04\x21\x12\xa4\x42" + bytes(12),  # length field past the end
        b"\x01\x01\x00\x00\x21\x12\xa4\x42" + bytes(12) + bytes(100),  # length mismatch
    ],
)
async def test_malformed_datagrams_get_no_reply_and_the_server_keeps_answering(
    relay: RelayServer, udp: socket.socket, garbage: bytes
) -> None:
    assert await exchange(udp, garbage, relay.stun_addresses[0], wait=0.2) is None
    txid, request = build_binding_request()
    reply = await exchange(udp, request, relay.stun_addresses[0])
    assert reply is not None and parse_binding_response(reply, txid).mapped == udp.getsockname()


async def test_a_plain_20_byte_request_is_answered(relay: RelayServer, udp: socket.socket) -> None:
    txid = bytes(range(12))
    reply = await exchange(udp, b"\x00\x01\x00\x00\x21\x12\xa4\x42" + txid, relay.stun_addresses[0])
    assert reply is not None and len(reply) == 40  # XOR-MAPPED-ADDRESS + FINGERPRINT
    assert parse_binding_response(reply, txid).mapped == udp.getsockname()


async def test_responses_sent_to_the_server_are_not_answered(
    relay: RelayServer, udp: socket.socket
) -> None:
    _, request = build_binding_request()
    reply = await exchange(udp, request, relay.stun_addresses[0])
    assert reply is not None
    assert await exchange(udp, reply, relay.stun_addresses[0], wait=0.2) is None


async def test_metrics_count_outcomes(relay: RelayServer, udp: socket.socket) -> None:
    await exchange(udp, b"not stun at all, not at all", relay.stun_addresses[0], wait=0.2)
    await stun_query(relay.stun_addresses[0])
    assert relay.metrics_address is not None
    base = "http://{}:{}".format(*relay.metrics_address)
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/metrics") as resp:
            text = await resp.text()
        async with http.get(base + "/livez") as resp:
            assert resp.status == 200
    assert 'wiregate_stun_datagrams_total{outcome="success"} 1.0' in text
    assert 'wiregate_stun_datagrams_total{outcome="not_stun"} 1.0' in text
    assert 'wiregate_stun_datagrams_total{outcome="rate_limited"} 0.0' in text


async def test_cancelled_relay_releases_its_ports() -> None:
    settings = RelaySettings(stun_listen=[f"{LOOPBACK}:0"], metrics_listen=f"{LOOPBACK}:0")
    ready: asyncio.Future[RelayServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_relay(settings, on_ready=ready.set_result))
    address = (await ready).stun_addresses[0]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    with pytest.raises(StunTimeout):
        await stun_query(address, timeout=0.3)
    rebound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rebound.bind(address)  # the port is free again
    rebound.close()


async def test_a_port_in_use_is_a_config_error(udp: socket.socket) -> None:
    busy = "{}:{}".format(*udp.getsockname())
    server = RelayServer(
        RelaySettings(stun_listen=[f"{LOOPBACK}:0", busy], metrics_listen=f"{LOOPBACK}:0")
    )
    with pytest.raises(ConfigError):
        await server.start()
    await server.close()


@pytest.mark.parametrize(
    ("text", "pair"),
    [
        ("127.0.0.1:3478", ("127.0.0.1", 3478)),
        ("[::1]:3479", ("::1", 3479)),
        ("relay:1", ("relay", 1)),
    ],
)
def test_parse_hostport(text: str, pair: tuple[str, int]) -> None:
    assert parse_hostport(text) == pair


@pytest.mark.parametrize("text", ["3478", ":3478", "host:", "host:http", "host:70000"])
def test_parse_hostport_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_hostport(text)
