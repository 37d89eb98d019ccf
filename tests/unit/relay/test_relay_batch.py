"""The relay core's batched path: the same outcome for every datagram as one at a time.

``Relay.handle_batch`` forwards a bound port's transport data inline; every
other datagram goes through ``Relay.handle``. Two identical relays, one fed
datagram by datagram and one batch by batch, must send the same bytes to the
same places from the same ports and count the same outcomes, whatever arrives.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from lab.fakes import FakeClock
from lab.metrics_text import parse, value
from lab.relay_fixtures import (
    CONTROL,
    NOW,
    RELAY_ID,
    TENANT,
    Lab,
    initiation,
    make_lab,
    node,
    pair_tickets,
    signer,
    ticket,
    transport,
)
from lab.relay_net import KEY as NET_KEY
from lab.relay_net import LOOPBACK, bind, start, udp_socket
from lab.relay_net import A as NET_A
from lab.relay_net import B as NET_B
from relay.aio.forwarding import tune_buffers
from relay.client.bind import build_allocate, build_bind, build_confirm, build_ping
from relay.controlwire import Bound, Challenge, parse_control
from relay.forwarding import OUTCOMES, Relay
from relay.metrics import ForwardingMetrics
from relay.tickets import Side, issue_pair

KEY, TRUSTED = signer()
A, B = node("dev-a"), node("dev-b")
ADDR_A, ADDR_B = ("198.51.100.1", 51820), ("203.0.113.7", 40001)
MOVED_A = ("198.51.100.9", 60000)
FOR_A, FOR_B = pair_tickets(KEY, A, B)

Datagrams = list[tuple[bytes, tuple[str, int]]]
Out = dict[int, Datagrams]
Step = tuple[Datagrams, int, float]


def bound_lab(**overrides: object) -> tuple[Lab, int, int]:
    lab = make_lab([TRUSTED], **overrides)
    return lab, lab.bind(FOR_A, ADDR_A), lab.bind(FOR_B, ADDR_B)


def one_by_one(
    relay: Relay, batch: list[tuple[bytes, tuple[str, int]]], port: int, now: float
) -> Out:
    out: Out = defaultdict(list)
    for data, src in batch:
        for send in relay.handle(data, src, port, now):
            out[send.local_port].append((send.data, send.dst))
    return dict(out)


def same_state(left: Relay, right: Relay) -> None:
    assert +left.counters == +right.counters
    assert left.forwarded_bytes == right.forwarded_bytes
    assert left.allocations() == right.allocations()


# --- equivalence on arbitrary traffic -------------------------------------------

wireguard_shaped = st.builds(
    lambda kind, n, fill: bytes([kind, 0, 0, 0]) + fill * n,
    st.sampled_from([1, 2, 3, 4]),
    st.sampled_from([0, 12, 16, 28, 44, 60, 88, 144, 1380, 1484, 1500]),
    st.binary(min_size=1, max_size=1),
)
datagram = st.one_of(
    st.binary(max_size=200),
    wireguard_shaped,
    st.sampled_from([transport(16), transport(80), transport(1376), initiation(B), initiation(A)]),
)
source = st.sampled_from(
    [ADDR_A, ADDR_B, ("198.51.100.1", 51821), ("::ffff:198.51.100.1", 51820), ("bad", 1)]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.lists(st.tuples(datagram, source), max_size=20),
            st.integers(0, 3),
            st.floats(0, 2),
        ),
        max_size=6,
    ),
    st.sampled_from([2_000.0, 1_250_000.0]),
    st.sampled_from([148, 1500]),
)
def test_batches_match_one_at_a_time(steps: list[Step], rate: float, largest: int) -> None:
    limits = {"bytes_per_second": rate, "burst_bytes": 3000.0, "max_datagram": largest}
    left, port_a, port_b = bound_lab(**limits)
    right, _, _ = bound_lab(**limits)
    ports = [port_a, port_b, CONTROL, port_a + 2]
    for batch, which, dt in steps:
        left.now = right.now = left.now + dt
        port = ports[which]
        expected = one_by_one(left.relay, batch, port, left.now)
        assert right.relay.handle_batch(batch, port, right.now) == expected
        same_state(left.relay, right.relay)
    assert set(right.relay.counters) <= set(OUTCOMES)


# --- the inline path and its checks ---------------------------------------------


def test_bound_transport_data_is_forwarded_without_parsing_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lab, port_a, port_b = bound_lab()

    def parse(_host: str) -> None:
        raise AssertionError("an address was parsed on the inline path")

    monkeypatch.setattr(lab.relay, "_ip", parse)
    datagrams = [transport(80) for _ in range(100)]
    out = lab.relay.handle_batch([(d, ADDR_A) for d in datagrams], port_a, lab.now)
    assert out == {port_b: [(d, ADDR_B) for d in datagrams]}
    assert lab.relay.counters["forwarded"] == 100
    assert lab.relay.forwarded_bytes == sum(len(d) for d in datagrams)


def test_forwarding_keeps_the_allocation_alive() -> None:
    lab, port_a, _ = bound_lab()
    later = NOW + 50
    lab.relay.handle_batch([(transport(), ADDR_A)], port_a, later)
    assert lab.relay.allocations()[0].last_active == later
    assert lab.relay.expire(later + lab.relay.config.idle_timeout - 1) == 0


@pytest.mark.parametrize(
    ("data", "src", "outcome"),
    [
        (transport(), ("198.51.100.1", 51821), "unbound_source"),
        (transport(), ADDR_B, "unbound_source"),
        (b"\x04\x00\x00\x01" + bytes(28), ADDR_A, "not_wireguard"),
        (b"\x04\x00\x00\x00" + bytes(20), ADDR_A, "not_wireguard"),
        (b"\x04\x00\x00\x00" + bytes(1500), ADDR_A, "too_large"),
        (b"\x09" * 48, ADDR_A, "not_wireguard"),
        (initiation(A), ADDR_A, "bad_mac1"),  # keyed with the sender's key, not the peer's
    ],
)
def test_what_the_inline_path_refuses_is_dropped_and_counted(
    data: bytes, src: tuple[str, int], outcome: str
) -> None:
    lab, port_a, _ = bound_lab()
    assert lab.relay.handle_batch([(data, src)], port_a, lab.now) == {}
    assert lab.relay.counters[outcome] == 1
    assert lab.relay.counters["forwarded"] == 0


def test_handshakes_with_a_good_mac1_are_forwarded_in_a_batch() -> None:
    lab, port_a, port_b = bound_lab()
    hello, data = initiation(B), transport()
    out = lab.relay.handle_batch([(hello, ADDR_A), (data, ADDR_A)], port_a, lab.now)
    assert out == {port_b: [(hello, ADDR_B), (data, ADDR_B)]}


def test_nothing_is_forwarded_before_the_peer_binds() -> None:
    lab = make_lab([TRUSTED])
    port_a = lab.bind(FOR_A, ADDR_A)
    assert lab.relay.handle_batch([(transport(), ADDR_A)] * 3, port_a, lab.now) == {}
    assert lab.relay.counters["peer_unbound"] == 3


def test_the_bandwidth_bucket_is_spent_per_datagram() -> None:
    lab, port_a, port_b = bound_lab(bytes_per_second=1000.0, burst_bytes=1000.0)
    data = transport(80)  # 96 bytes: ten fit in the burst
    out = lab.relay.handle_batch([(data, ADDR_A)] * 25, port_a, lab.now)
    assert len(out[port_b]) == 10
    assert lab.relay.counters["over_bandwidth"] == 15
    # 0.5 s later 500 bytes more: five datagrams.
    out = lab.relay.handle_batch([(data, ADDR_A)] * 25, port_a, lab.now + 0.5)
    assert len(out[port_b]) == 5


def test_a_rebind_inside_a_batch_moves_the_inline_path() -> None:
    lab, port_a, port_b = bound_lab()
    fresh = ticket(KEY, A, B, Side.A)
    (challenge,) = lab.relay.handle(build_bind(fresh), MOVED_A, port_a, lab.now)
    cookie = parse_control(challenge.data)
    assert isinstance(cookie, Challenge)
    confirm = build_confirm(fresh, cookie.cookie)
    first, second, third = transport(), transport(), transport()
    batch = [(first, ADDR_A), (confirm, MOVED_A), (second, ADDR_A), (third, MOVED_A)]
    out = lab.relay.handle_batch(batch, port_a, lab.now)
    (reply,) = [data for data, dst in out[port_a] if dst == MOVED_A]
    assert isinstance(parse_control(reply), Bound)
    assert out[port_b] == [(first, ADDR_B), (third, ADDR_B)]
    assert lab.relay.counters["unbound_source"] == 1
    # The other direction now goes to the new address.
    back = transport()
    assert lab.relay.handle_batch([(back, ADDR_B)], port_b, lab.now) == {port_a: [(back, MOVED_A)]}


def test_control_port_batches_answer_each_request() -> None:
    lab = make_lab([TRUSTED])
    batch = [(build_ping(bytes(16)), ADDR_A), (build_allocate(FOR_A), ADDR_A), (b"junk", ADDR_B)]
    out = lab.relay.handle_batch(batch, CONTROL, lab.now)
    assert [dst for _, dst in out[CONTROL]] == [ADDR_A, ADDR_A]
    assert lab.relay.counters["pinged"] == 1 and lab.relay.counters["allocated"] == 1
    assert lab.relay.allocations_created == 1


def test_one_bad_datagram_in_a_batch_leaves_the_others_forwarded_in_order() -> None:
    lab, port_a, port_b = bound_lab()
    good = [transport(16 * (i % 5 + 1)) for i in range(20)]
    bad = b"\x04\x00\x01\x00" + bytes(28)
    batch = [(d, ADDR_A) for d in good[:10]] + [(bad, ADDR_A)] + [(d, ADDR_A) for d in good[10:]]
    assert lab.relay.handle_batch(batch, port_a, lab.now) == {port_b: [(d, ADDR_B) for d in good]}
    assert lab.relay.counters["forwarded"] == 20 and lab.relay.counters["not_wireguard"] == 1


async def test_bursts_through_the_asyncio_adapter_arrive_whole_and_in_order(
    clock: FakeClock,
) -> None:
    """The real adapter (readers, batched receive and send) on loopback: nothing lost."""
    async for relay in start(True, clock):
        for_a, for_b = issue_pair(
            NET_KEY, relay_id=RELAY_ID, tenant=TENANT, node_a=NET_A, node_b=NET_B, now=clock.now
        )
        with udp_socket() as peer_a, udp_socket() as peer_b:
            peer_b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            port_a, port_b = await bind(relay, peer_a, for_a), await bind(relay, peer_b, for_b)
            sent = [transport(16 * (i % 8 + 1)) for i in range(600)]
            for start_at in range(0, len(sent), 50):
                for data in sent[start_at : start_at + 50]:
                    peer_a.sendto(data, (LOOPBACK, port_a))
                await asyncio.sleep(0.01)  # the relay runs on this loop: let it drain
            got = [await _recv(peer_b) for _ in sent]
            assert got == [(data, (LOOPBACK, port_b)) for data in sent]
            assert relay.forwarder is not None and relay.forwarder.core is not None
            assert relay.forwarder.core.counters["forwarded"] == len(sent)


async def _recv(sock: socket.socket) -> tuple[bytes, tuple[str, int]]:
    data, addr = await asyncio.wait_for(asyncio.get_running_loop().sock_recvfrom(sock, 4096), 2)
    return data, (str(addr[0]), int(addr[1]))


def test_socket_buffers_are_raised_past_the_caps_when_permitted() -> None:
    size = 3 << 20
    caps = {
        socket.SO_RCVBUF: int(Path("/proc/sys/net/core/rmem_max").read_text()),
        socket.SO_SNDBUF: int(Path("/proc/sys/net/core/wmem_max").read_text()),
    }
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        tune_buffers(sock, size)
        for option, cap in caps.items():
            # Linux doubles what it is given (bookkeeping); only CAP_NET_ADMIN passes the cap.
            expected = 2 * size if os.geteuid() == 0 else 2 * min(size, cap)
            assert sock.getsockopt(socket.SOL_SOCKET, option) == expected


def test_metrics_are_read_from_the_core_on_scrape() -> None:
    lab, port_a, _ = bound_lab()
    registry = CollectorRegistry()
    metrics = ForwardingMetrics(registry)
    core = lab.relay
    metrics.serve(
        RELAY_ID, core.load, lambda: (core.counters, core.forwarded_bytes, core.allocations_created)
    )
    data = transport(80)
    core.handle_batch([(data, ADDR_A)] * 7, port_a, lab.now)
    metrics.observe("forwarded")  # counted outside the core (another data path): added
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "wiregate_relay_datagrams_total", outcome="forwarded") == 8
    assert value(samples, "wiregate_relay_datagrams_total", outcome="bad_mac1") == 0
    assert value(samples, "wiregate_relay_forwarded_bytes_total") == 7 * len(data)
    assert value(samples, "wiregate_relay_allocations_created_total") == 1
    assert value(samples, "wiregate_relay_allocations") == 1
