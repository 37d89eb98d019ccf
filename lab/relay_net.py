"""A relay on 127.0.0.1 (loopback peers admitted) and plain UDP sockets standing in for peers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from lab.fakes import FakeClock
from lab.relay_fixtures import RELAY_ID, node, signer
from relay.aio.forwarding import ForwardingSettings
from relay.aio.stun import RelayServer, run_relay
from relay.client.bind import (
    build_allocate,
    build_bind,
    build_confirm,
    parse_allocated,
    parse_bound,
    parse_challenge,
)
from relay.forwarding import RelayConfig
from wiregate.settings import RelaySettings

LOOPBACK = "127.0.0.1"


KEY, TRUSTED = signer()


A, B = node("dev-a"), node("dev-b")


def forwarding(allow_loopback: bool) -> ForwardingSettings:
    config = RelayConfig(RELAY_ID, 0, (), allow_loopback=allow_loopback, idle_timeout=60.0)
    return ForwardingSettings(LOOPBACK, 0, (0,) * 4, config, (TRUSTED,), b"k" * 32, 0.05)


async def start(allow_loopback: bool, clock: FakeClock) -> AsyncIterator[RelayServer]:
    settings = RelaySettings(stun_listen=[f"{LOOPBACK}:0"], metrics_listen=f"{LOOPBACK}:0")
    ready: asyncio.Future[RelayServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_relay(
            settings,
            on_ready=ready.set_result,
            forwarding=forwarding(allow_loopback),
            clock=clock,
        )
    )
    yield await asyncio.wait_for(ready, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.setblocking(False)
    return sock


async def exchange(
    sock: socket.socket, data: bytes, to: tuple[str, int], wait: float = 1.0
) -> bytes | None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, data, to)
    return await receive(sock, wait)


async def receive(sock: socket.socket, wait: float = 1.0) -> bytes | None:
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), wait)
    except TimeoutError:
        return None


async def bind(relay: RelayServer, sock: socket.socket, ticket: bytes) -> int:
    """The agent's sequence; returns the relay port to use as the peer's endpoint."""
    assert relay.forwarder is not None and relay.forwarder.control_address is not None
    reply = await exchange(sock, build_allocate(ticket), relay.forwarder.control_address)
    assert reply is not None
    port = parse_allocated(reply, ticket)
    reply = await exchange(sock, build_bind(ticket), (LOOPBACK, port))
    assert reply is not None
    reply = await exchange(
        sock, build_confirm(ticket, parse_challenge(reply, ticket)), (LOOPBACK, port)
    )
    assert reply is not None
    parse_bound(reply, ticket)
    return port
