"""The relay process's /metrics over HTTP: STUN replies by listener, allocations, bytes.

A real relay (STUN and forwarding on 127.0.0.1, loopback peers admitted by the
test-only flag) is driven by plain UDP sockets; its metrics listener is scraped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from lab.fakes import FakeClock
from lab.metrics_text import Samples, parse, scrape, value
from lab.relay_fixtures import RELAY_ID, TENANT, initiation
from lab.relay_net import KEY, A, B, bind, exchange, start, udp_socket
from relay.aio.stun import RelayServer
from relay.client.stun import build_binding_request
from relay.metrics import family_of
from relay.tickets import issue_pair
from wiregate.settings import RelaySettings


async def scrape_relay(relay: RelayServer) -> Samples:
    assert relay.metrics_address is not None
    return parse(await scrape("http://{}:{}/metrics".format(*relay.metrics_address)))


@pytest.fixture
async def relay() -> AsyncIterator[RelayServer]:
    async for server in start(True, FakeClock()):
        yield server


def test_family_of_names_the_address_family() -> None:
    assert family_of("192.0.2.1") == "ipv4"
    assert family_of("::ffff:192.0.2.1") == "ipv4"
    assert family_of("2001:db8::1") == "ipv6"
    assert family_of("not an address") == "unknown"


async def test_stun_replies_are_counted_by_family_and_listener(relay: RelayServer) -> None:
    listener = str(relay.stun_addresses[0][1])
    before = await scrape_relay(relay)
    assert value(before, "wiregate_stun_replies_total", family="ipv4", listener=listener) == 0
    with udp_socket() as sock:
        for _ in range(3):
            assert await exchange(sock, build_binding_request()[1], relay.stun_addresses[0])
        assert await exchange(sock, b"junk", relay.stun_addresses[0], 0.2) is None
    after = await scrape_relay(relay)
    assert value(after, "wiregate_stun_replies_total", family="ipv4", listener=listener) == 3
    assert value(after, "wiregate_stun_datagrams_total", outcome="success") == 3
    assert value(after, "wiregate_stun_datagrams_total", outcome="not_stun") == 1


async def test_allocations_and_forwarded_bytes(relay: RelayServer) -> None:
    now = 1_700_000_000.0
    for_a, for_b = issue_pair(KEY, relay_id=RELAY_ID, tenant=TENANT, node_a=A, node_b=B, now=now)
    with udp_socket() as peer_a, udp_socket() as peer_b:
        port_a = await bind(relay, peer_a, for_a)
        await bind(relay, peer_b, for_b)
        samples = await scrape_relay(relay)
        assert value(samples, "wiregate_relay_allocations_created_total") == 1
        assert value(samples, "wiregate_relay_allocations") == 1
        assert value(samples, "wiregate_relay_allocation_capacity") >= 1
        assert value(samples, "wiregate_relay_info", relay_id=RELAY_ID) == 1
        assert value(samples, "wiregate_relay_datagrams_total", outcome="allocated") == 2
        hello = initiation(B)
        assert await exchange(peer_a, hello, ("127.0.0.1", port_a), 0.2) is None  # to B
        assert peer_b.recv(4096) == hello
        await exchange(peer_a, b"\x09" * 40, ("127.0.0.1", port_a), 0.2)  # not WireGuard
    samples = await scrape_relay(relay)
    assert value(samples, "wiregate_relay_forwarded_bytes_total") == len(hello)
    assert value(samples, "wiregate_relay_datagrams_total", outcome="forwarded") == 1
    assert value(samples, "wiregate_relay_datagrams_total", outcome="not_wireguard") == 1
    assert value(samples, "wiregate_relay_allocations_created_total") == 1


async def test_an_empty_metrics_listen_serves_no_metrics() -> None:
    server = RelayServer(RelaySettings(stun_listen=["127.0.0.1:0"], metrics_listen=""))
    await server.start()
    try:
        assert server.metrics_address is None
        assert server.stun_addresses
    finally:
        await server.close()
