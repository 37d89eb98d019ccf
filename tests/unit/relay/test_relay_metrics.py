"""The relay process's /metrics over HTTP: STUN replies by listener, allocations, bytes.

A real relay (STUN and forwarding on 127.0.0.1, loopback peers admitted by the
test-only flag) is driven by plain UDP sockets; its metrics listener is scraped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.relay_fixtures import RELAY_ID, TENANT, initiation
from relay.aio.stun import RelayServer
from relay.client.stun import build_binding_request
from relay.metrics import family_of
from relay.tickets import issue_pair
from tests.unit.relay.test_relay_forwarding import (
    KEY,
    A,
    B,
    Clock,
    bind,
    exchange,
    start,
    udp_socket,
)
from wiregate.settings import RelaySettings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text page, keyed by name and label set."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


async def scrape_relay(relay: RelayServer) -> Samples:
    assert relay.metrics_address is not None
    return parse(await scrape("http://{}:{}/metrics".format(*relay.metrics_address)))


@pytest.fixture
async def relay() -> AsyncIterator[RelayServer]:
    async for server in start(True, Clock(1_700_000_000.0)):
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
