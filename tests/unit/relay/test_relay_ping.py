"""PING/PONG: the relay's liveness probe and load figures, from codec to real UDP.

The core answers a PING on its control port only, with a PONG no larger than
the PING, never to a forbidden address and within the unauthenticated rate
limit; ``ping_relay`` times a real relay forwarder on loopback.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator

import pytest

from lab.relay_fixtures import (
    CONTROL,
    Lab,
    loopback_forwarder,
    make_lab,
    node,
    pair_tickets,
    signer,
)
from relay.aio.forwarding import RelayForwarder, is_local_address
from relay.client.bind import build_allocate, build_ping, parse_pong
from relay.client.probe import PingResult, ping_relay
from relay.controlwire import MAGIC, Ping, Pong, build_control, parse_control
from relay.errors import ControlError, RelayTimeout

KEY, TRUSTED = signer()
A, B = node("dev-a"), node("dev-b")
ADDR = ("198.51.100.1", 40000)
NONCE = bytes(range(16))


@pytest.fixture
def lab() -> Lab:
    return make_lab([TRUSTED], own_addresses=("192.0.2.1",), max_allocations=5)


def pong_of(lab: Lab, nonce: bytes = NONCE, src: tuple[str, int] = ADDR) -> Pong:
    (reply,) = lab.send(build_ping(nonce), src, CONTROL)
    assert reply.dst == src and reply.local_port == CONTROL
    return parse_pong(reply.data, nonce)


# --- codec --------------------------------------------------------------------------------


def test_ping_and_pong_round_trip() -> None:
    ping = build_ping(NONCE)
    assert ping[:4] == MAGIC and parse_control(ping) == Ping(NONCE)
    pong = build_control(Pong(NONCE, 3, 512))
    assert parse_control(pong) == Pong(NONCE, 3, 512)
    assert len(pong) <= len(ping)  # the answer can never amplify


@pytest.mark.parametrize("size", [0, 15, 17])
def test_nonce_must_be_16_bytes(size: int) -> None:
    with pytest.raises(ControlError):
        build_ping(bytes(size))


@pytest.mark.parametrize("cut", [1, 8, 24])
def test_truncated_or_padded_pings_are_refused(cut: int) -> None:
    ping = build_ping(NONCE)
    for data in (ping[:-cut], ping + bytes(cut)):
        with pytest.raises(ControlError):
            parse_control(data)


def test_padding_content_is_ignored() -> None:
    assert parse_control(build_ping(NONCE)[:-8] + b"\xff" * 8) == Ping(NONCE)


def test_parse_pong_wants_the_answer_to_this_nonce() -> None:
    pong = build_control(Pong(NONCE, 0, 8))
    assert parse_pong(pong, NONCE) == Pong(NONCE, 0, 8)
    with pytest.raises(ControlError):
        parse_pong(pong, bytes(16))
    with pytest.raises(ControlError):
        parse_pong(build_ping(NONCE), NONCE)
    with pytest.raises(ControlError):
        parse_pong(b"garbage", NONCE)


def test_ping_result_load() -> None:
    assert PingResult(0.01, 2, 8).load == 0.25
    assert PingResult(0.01, 0, 0).load == 1.0


# --- the core -------------------------------------------------------------------------------


def test_control_port_answers_with_the_load(lab: Lab) -> None:
    assert pong_of(lab) == Pong(NONCE, 0, 5)
    for_a, _ = pair_tickets(KEY, A, B)
    lab.allocate(for_a, ADDR)
    other = os.urandom(16)
    assert pong_of(lab, other) == Pong(other, 1, 5)
    assert lab.relay.counters["pinged"] == 2
    assert lab.relay.load() == (1, 5)


def test_capacity_is_bounded_by_the_relay_ports() -> None:
    lab = make_lab([TRUSTED], max_allocations=1000)  # 16 relay ports: 8 pairs
    assert pong_of(lab).capacity == 8


def test_a_ping_on_a_relay_port_is_not_answered(lab: Lab) -> None:
    for_a, _ = pair_tickets(KEY, A, B)
    port = lab.allocate(for_a, ADDR)
    assert lab.send(build_ping(NONCE), ADDR, port) == []
    assert lab.relay.counters["unexpected_control"] == 1


def test_a_short_ping_gets_nothing(lab: Lab) -> None:
    assert lab.send(build_ping(NONCE)[:-1], ADDR, CONTROL) == []
    assert lab.relay.counters["malformed_control"] == 1


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "169.254.169.254", "192.0.2.1", "::ffff:192.0.2.1", "ff02::1", "0.0.0.0"]
)
def test_never_pongs_to_forbidden_addresses(lab: Lab, host: str) -> None:
    assert lab.send(build_ping(NONCE), (host, 40000), CONTROL) == []
    assert lab.relay.counters["forbidden_destination"] == 1


def test_a_ping_from_the_relays_own_host_is_answered() -> None:
    """A gateway on the relay's host: its PING comes from an own address that is local."""
    own = "192.0.2.1"
    lab = make_lab([TRUSTED], own_addresses=(own,), local_addresses=(own,))
    assert pong_of(lab, src=(own, 50000)).capacity == 8
    assert lab.send(build_ping(NONCE), (own, CONTROL), CONTROL) == []  # never from own ports
    assert lab.send(build_ping(NONCE), (own, 40003), CONTROL) == []
    for_a, _ = pair_tickets(KEY, A, B)
    assert lab.send(build_allocate(for_a), (own, 50000), CONTROL) == []  # only PING is exempt
    assert lab.send(build_ping(NONCE)[:-1], (own, 50000), CONTROL) == []
    assert lab.relay.counters["forbidden_destination"] == 3
    assert lab.relay.counters["malformed_control"] == 1


def test_local_addresses_must_be_own_addresses() -> None:
    lab = make_lab([TRUSTED], local_addresses=("127.0.0.1", "169.254.169.254"))
    for host in ("127.0.0.1", "169.254.169.254"):
        assert lab.send(build_ping(NONCE), (host, 50000), CONTROL) == []


@pytest.mark.parametrize(
    ("text", "local"),
    [("127.0.0.1", False), ("::1", False), ("0.0.0.0", False), ("203.0.113.77", False),
     ("not-an-address", False)],
)  # fmt: skip
def test_is_local_address_refuses_loopback_and_foreign(text: str, local: bool) -> None:
    assert is_local_address(text) is local


def test_pings_are_rate_limited_per_source(lab: Lab) -> None:
    answered = sum(len(lab.send(build_ping(NONCE), ADDR, CONTROL)) for _ in range(120))
    assert answered == 50  # the per-source burst
    assert lab.relay.counters["rate_limited"] == 70
    assert pong_of(lab, src=("203.0.113.9", 1)).nonce == NONCE  # other sources unaffected


# --- real UDP ---------------------------------------------------------------------------------


@pytest.fixture
async def forwarder() -> AsyncIterator[RelayForwarder]:
    fwd = await loopback_forwarder((TRUSTED,))
    yield fwd
    fwd.close()


async def test_ping_relay_times_a_real_relay(forwarder: RelayForwarder) -> None:
    assert forwarder.control_address is not None
    result = await ping_relay(forwarder.control_address, timeout=2.0)
    assert result.allocations == 0 and result.capacity == 2  # four relay ports: two pairs
    assert 0 < result.rtt < 1.0
    assert forwarder.core is not None and forwarder.core.counters["pinged"] == 1


async def test_ping_relay_times_out_on_a_silent_port() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RelayTimeout):
            await ping_relay(silent.getsockname(), timeout=0.3)
        assert 0.25 < loop.time() - started < 1.0
        assert len(silent.recv(100)) == len(build_ping(NONCE))  # it did send
    finally:
        silent.close()


async def test_ping_relay_ignores_foreign_datagrams() -> None:
    """A stray datagram or a PONG for someone else's nonce does not end the wait."""
    fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fake.bind(("127.0.0.1", 0))
    fake.setblocking(False)
    loop = asyncio.get_running_loop()

    async def answer() -> None:
        data, src = await loop.sock_recvfrom(fake, 100)
        await loop.sock_sendto(fake, b"noise", src)
        await loop.sock_sendto(fake, build_control(Pong(bytes(16), 9, 9)), src)
        await asyncio.sleep(0.05)
        await loop.sock_sendto(fake, build_control(Pong(data[6:22], 1, 4)), src)

    try:
        task = asyncio.create_task(answer())
        result = await ping_relay(fake.getsockname(), timeout=2.0)
        await task
        assert (result.allocations, result.capacity) == (1, 4)
        assert result.rtt >= 0.04
    finally:
        fake.close()
