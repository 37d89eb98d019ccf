"""The core's admission of TCP/443 bridges: exactly the registered loopback sources,
each rate limited as its TCP client, every other rule unchanged."""

from __future__ import annotations

import ipaddress

from lab.relay_fixtures import (
    CONTROL,
    Lab,
    initiation,
    make_lab,
    node,
    pair_tickets,
    signer,
    transport,
)
from relay.client.bind import build_allocate
from relay.forwarding import Relay, RelayConfig
from relay.stun_core import RateLimiter

KEY, TRUSTED = signer()
A, B = node("dev-a"), node("dev-b")
BRIDGE = ("127.0.0.1", 50001)
OTHER_LOOPBACK = ("127.0.0.1", 50002)
UDP_SIDE = ("203.0.113.7", 51820)
CLIENT = ipaddress.ip_address("198.51.100.20")


def lab_with_bridge() -> Lab:
    lab = make_lab([TRUSTED])
    lab.relay.bridges[BRIDGE] = CLIENT
    return lab


def test_a_registered_bridge_binds_and_forwards_to_a_udp_side() -> None:
    lab = lab_with_bridge()
    for_a, for_b = pair_tickets(KEY, A, B)
    port_a, port_b = lab.bind(for_a, BRIDGE), lab.bind(for_b, UDP_SIDE)
    hello = initiation(B)
    assert [(s.dst, s.data) for s in lab.send(hello, BRIDGE, port_a)] == [(UDP_SIDE, hello)]
    data = transport(64)
    assert [(s.dst, s.local_port) for s in lab.send(data, UDP_SIDE, port_b)] == [(BRIDGE, port_a)]


def test_any_other_loopback_source_is_refused_as_before() -> None:
    lab = lab_with_bridge()
    for_a, _ = pair_tickets(KEY, A, B)
    assert lab.send(build_allocate(for_a), OTHER_LOOPBACK, CONTROL) == []
    assert lab.relay.counters["forbidden_destination"] == 1
    del lab.relay.bridges[BRIDGE]  # the connection closed
    assert lab.send(build_allocate(for_a), BRIDGE, CONTROL) == []
    assert lab.relay.counters["forbidden_destination"] == 2


def test_bridges_are_rate_limited_as_their_tcp_client() -> None:
    limiter = RateLimiter(rate=0.0, burst=2.0)
    relay = Relay(RelayConfig("relay-1", CONTROL, (40000, 40001)), [TRUSTED], secret=b"s" * 32,
                  limiter=limiter)  # fmt: skip
    relay.bridges[BRIDGE] = CLIENT
    relay.bridges[OTHER_LOOPBACK] = CLIENT  # a second connection of the same client
    relay.bridges[("127.0.0.1", 50003)] = ipaddress.ip_address("198.51.100.21")
    for_a, _ = pair_tickets(KEY, A, B)
    request = build_allocate(for_a)
    for src in (BRIDGE, OTHER_LOOPBACK, OTHER_LOOPBACK):
        relay.handle(request, src, CONTROL, 0.0)
    assert relay.counters["rate_limited"] == 1  # the client's burst of 2 is shared
    relay.handle(request, ("127.0.0.1", 50003), CONTROL, 0.0)
    assert relay.counters["rate_limited"] == 1  # another client has its own bucket
