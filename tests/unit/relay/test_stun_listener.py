"""The STUN listener (batched receive and send) on real loopback sockets: IPv6 and
dual-stack, bursts larger than a batch, replies counted by family, the settings'
rate limits applied."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from relay.aio.stun import RelayServer, run_relay
from relay.client.stun import parse_binding_response
from wiregate.settings import RelaySettings

TXID = bytes(range(12))
PLAIN = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + TXID


async def serve(settings: RelaySettings) -> AsyncIterator[RelayServer]:
    ready: asyncio.Future[RelayServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_relay(settings, on_ready=ready.set_result))
    yield await asyncio.wait_for(ready, 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def dual() -> AsyncIterator[RelayServer]:
    settings = RelaySettings(stun_listen=["[::]:0"], metrics_listen="127.0.0.1:0")
    async for server in serve(settings):
        yield server


async def ask(family: socket.AddressFamily, host: str, port: int, count: int) -> list[bytes]:
    """Send ``count`` plain requests from one socket; the answers that come back."""
    loop = asyncio.get_running_loop()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((host, 0))
        sock.setblocking(False)
        for _ in range(count):
            await loop.sock_sendto(sock, PLAIN, (host, port))
        answers = []
        try:
            async with asyncio.timeout(3):
                while len(answers) < count:
                    answers.append(await loop.sock_recv(sock, 2048))
        except TimeoutError:
            pass
        mapped = parse_binding_response(answers[0], TXID).mapped if answers else None
        assert mapped is None or mapped == sock.getsockname()[:2]
    return answers


async def test_ipv6_and_mapped_ipv4_clients_on_a_dual_stack_listener(dual: RelayServer) -> None:
    port = dual.stun_addresses[0][1]
    six = await ask(socket.AF_INET6, "::1", port, 1)
    four = await ask(socket.AF_INET, "127.0.0.1", port, 1)
    assert [len(r) for r in six] == [52] and [len(r) for r in four] == [40]
    assert dual.metrics_address is not None
    url = "http://{}:{}/metrics".format(*dual.metrics_address)
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        text = await resp.text()
    assert f'wiregate_stun_replies_total{{family="ipv6",listener="{port}"}} 1.0' in text
    assert f'wiregate_stun_replies_total{{family="ipv4",listener="{port}"}} 1.0' in text


async def test_a_burst_larger_than_a_batch_is_answered_in_full() -> None:
    settings = RelaySettings(stun_listen=["127.0.0.1:0"], metrics_listen="")
    async for server in serve(settings):
        answers = await ask(socket.AF_INET, "127.0.0.1", server.stun_addresses[0][1], 300)
        assert len(answers) == 300


async def test_the_settings_rate_limits_apply() -> None:
    settings = RelaySettings(
        stun_listen=["127.0.0.1:0"], metrics_listen="", stun_rate=1.0, stun_burst=5.0
    )
    async for server in serve(settings):
        answers = await ask(socket.AF_INET, "127.0.0.1", server.stun_addresses[0][1], 20)
        assert len(answers) == 5


def test_limits_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="stun_global_rate"):
        RelaySettings(stun_global_rate=0)
