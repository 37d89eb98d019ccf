"""The relay through its asyncio adapter, with real UDP on 127.0.0.1.

Two "peers" are plain UDP sockets standing in for WireGuard listen ports: each
allocates, binds with its ticket (challenge, confirm) and then exchanges
WireGuard-shaped datagrams with the other through the relay; everything else is
dropped. Loopback destinations are admitted only by the test-only flag.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from lab.fakes import FakeClock
from lab.relay_fixtures import RELAY_ID, TENANT, initiation, response, transport
from lab.relay_net import (
    KEY,
    LOOPBACK,
    A,
    B,
    bind,
    exchange,
    receive,
    start,
    udp_socket,
)
from relay.aio.stun import RelayServer
from relay.client.bind import (
    build_allocate,
    build_bind,
)
from relay.tickets import issue_pair


@pytest.fixture
async def relay(clock: FakeClock) -> AsyncIterator[RelayServer]:
    async for server in start(True, clock):
        yield server


@pytest.fixture
def peers() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    socks = udp_socket(), udp_socket(), udp_socket()
    yield socks
    for sock in socks:
        sock.close()


async def test_two_peers_talk_wireguard_through_the_relay(
    relay: RelayServer, peers: tuple[socket.socket, socket.socket, socket.socket], clock: FakeClock
) -> None:
    peer_a, peer_b, stranger = peers
    for_a, for_b = issue_pair(
        KEY, relay_id=RELAY_ID, tenant=TENANT, node_a=A, node_b=B, now=clock.now
    )
    port_a, port_b = await bind(relay, peer_a, for_a), await bind(relay, peer_b, for_b)
    loop = asyncio.get_running_loop()
    for packet, (src, dst, to_port, from_port) in [
        (initiation(B), (peer_a, peer_b, port_a, port_b)),
        (response(A), (peer_b, peer_a, port_b, port_a)),
        (transport(1408), (peer_a, peer_b, port_a, port_b)),
        (transport(16), (peer_b, peer_a, port_b, port_a)),
    ]:
        await loop.sock_sendto(src, packet, (LOOPBACK, to_port))
        data, sender = await asyncio.wait_for(loop.sock_recvfrom(dst, 4096), 1)
        assert data == packet
        assert sender == (LOOPBACK, from_port)  # the endpoint the receiver's WireGuard expects
    # everything else is dropped: garbage from a bound peer, anything from a stranger
    for sock, data, port in [
        (peer_a, b"hello", port_a),
        (peer_a, b"\x01\x00\x00\x00" + bytes(10), port_a),
        (stranger, transport(), port_a),
        (stranger, transport(), port_b),
        (stranger, build_bind(for_a), port_a),  # replayed ticket: a small refusal only
    ]:
        await loop.sock_sendto(sock, data, (LOOPBACK, port))
    assert await receive(peer_a, 0.2) is None and await receive(peer_b, 0.2) is None
    refusal = await receive(stranger, 0.2)
    assert refusal is not None and len(refusal) < len(build_bind(for_a))
    assert await metric(relay, "forwarded") == 4.0
    assert await metric(relay, "unbound_source") == 2.0


async def test_idle_pairs_expire_on_the_timer(
    relay: RelayServer, peers: tuple[socket.socket, socket.socket, socket.socket], clock: FakeClock
) -> None:
    peer_a, peer_b, _ = peers
    for_a, for_b = issue_pair(
        KEY, relay_id=RELAY_ID, tenant=TENANT, node_a=A, node_b=B, now=clock.now
    )
    port_a = await bind(relay, peer_a, for_a)
    await bind(relay, peer_b, for_b)
    clock.now += 61
    await asyncio.sleep(0.2)  # housekeeping runs every 50 ms here
    await asyncio.get_running_loop().sock_sendto(peer_a, transport(), (LOOPBACK, port_a))
    assert await receive(peer_b, 0.2) is None
    assert await metric(relay, "idle_expired") == 1.0
    assert await metric(relay, "no_allocation") == 1.0


async def test_without_the_test_flag_loopback_is_refused(
    peers: tuple[socket.socket, socket.socket, socket.socket], clock: FakeClock
) -> None:
    peer_a, _, _ = peers
    for_a, _ = issue_pair(KEY, relay_id=RELAY_ID, tenant=TENANT, node_a=A, node_b=B, now=clock.now)
    async for server in start(False, clock):
        assert server.forwarder is not None and server.forwarder.control_address is not None
        reply = await exchange(peer_a, build_allocate(for_a), server.forwarder.control_address, 0.3)
        assert reply is None
        assert await metric(server, "forbidden_destination") == 1.0
        assert await metric(server, "allocated") == 0.0


async def metric(relay: RelayServer, outcome: str) -> float:
    assert relay.metrics_address is not None
    url = "http://{}:{}/metrics".format(*relay.metrics_address)
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        text = await resp.text()
    line = f'wiregate_relay_datagrams_total{{outcome="{outcome}"}} '
    (value,) = [row.removeprefix(line) for row in text.splitlines() if row.startswith(line)]
    return float(value)
