"""The reconciler's diff (agent.dataplane.reconcile) and the link diff (agent.dataplane.routes)."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dataplane.backend import (
    DeviceUpdate,
    LiveDevice,
    LivePeer,
    MemoryBackend,
    apply_update,
)
from agent.dataplane.desired import DesiredDevice, DesiredLink, DesiredPeer
from agent.dataplane.reconcile import diff
from agent.dataplane.routes import LinkUpdate, LiveLink, after_link_update, diff_links
from agent.dataplane.rtnl import NEWROUTE, build_route, parse_route
from wiregate.keys import encode_key, generate_private_key, public_from_private

PRIVATE = generate_private_key()
PUBLIC = encode_key(public_from_private(PRIVATE))
KEYS = [encode_key(bytes([i + 2]) * 32) for i in range(8)]
NETS = [ipaddress.ip_network(f"100.64.0.{i}/32") for i in range(8)] + [
    ipaddress.ip_network("10.1.0.0/16"),
    ipaddress.ip_network("fd7a:7767:6174::5/128"),
]
ENDPOINTS = [None, "192.0.2.1:51820", "192.0.2.2:51820", "[2001:db8::1]:4500"]


def device(*peers: DesiredPeer, port: int = 51820, fwmark: int = 0xCA6C) -> DesiredDevice:
    return DesiredDevice(PRIVATE, port, fwmark, peers={p.public_key: p for p in peers})


def dpeer(i: int, *nets: int, endpoint: str | None = None, keepalive: int = 0) -> DesiredPeer:
    return DesiredPeer(KEYS[i], frozenset(NETS[n] for n in nets), endpoint, keepalive)


def live_of(desired: DesiredDevice) -> LiveDevice:
    """The live device a perfect apply would leave (with stats)."""
    peers = {
        k: LivePeer(k, p.allowed_ips, p.endpoint, p.keepalive, last_handshake=1.0e9, rx=5, tx=7)
        for k, p in desired.peers.items()
    }
    return LiveDevice(PUBLIC, desired.listen_port, desired.fwmark, peers)


def run(desired: DesiredDevice, live: LiveDevice, last: DesiredDevice | None) -> LiveDevice:
    update = diff(desired, live, last)
    public = PUBLIC if update.private_key is not None else None
    return apply_update(live, update, public)


def config(live: LiveDevice) -> object:
    """The configured part of a live device (not the statistics)."""
    peers = {k: (p.allowed_ips, p.endpoint, p.keepalive) for k, p in live.peers.items()}
    return (live.public_key, live.listen_port, live.fwmark, peers)


def test_fresh_device_gets_everything() -> None:
    want = device(dpeer(0, 0, endpoint="192.0.2.1:51820", keepalive=25), dpeer(1, 1))
    update = diff(want, LiveDevice(), None)
    assert update.private_key == PRIVATE and update.listen_port == 51820
    assert update.fwmark == 0xCA6C
    assert [p.public_key for p in update.peers] == sorted([KEYS[0], KEYS[1]])
    assert not any(p.update_only for p in update.peers)


def test_noop_is_empty_and_issues_no_write() -> None:
    want = device(dpeer(0, 0, endpoint="192.0.2.1:51820"), dpeer(1, 1, 8))
    update = diff(want, live_of(want), want)
    assert update == DeviceUpdate() and update.is_empty
    backend = MemoryBackend()
    backend.create("wg0")
    assert backend.write("wg0", update) == 0 and backend.writes == 0


def test_removed_peer() -> None:
    want = device(dpeer(0, 0))
    live = live_of(device(dpeer(0, 0), dpeer(1, 1)))
    update = diff(want, live, None)
    assert update.peers == (replace(update.peers[0], public_key=KEYS[1], remove=True),)


def test_only_changed_attributes() -> None:
    before = device(dpeer(0, 0, keepalive=25), dpeer(1, 1))
    after = device(dpeer(0, 0, 2, keepalive=25), dpeer(1, 1, keepalive=10))
    update = diff(after, live_of(before), before)
    by_key = {p.public_key: p for p in update.peers}
    assert by_key[KEYS[0]].allowed_ips == frozenset({NETS[0], NETS[2]})
    assert by_key[KEYS[0]].keepalive is None and by_key[KEYS[0]].update_only
    assert by_key[KEYS[1]].allowed_ips is None and by_key[KEYS[1]].keepalive == 10


def test_roaming_is_not_fought() -> None:
    want = device(dpeer(0, 0, endpoint="192.0.2.1:51820"))
    roamed = live_of(want)
    roamed = replace(
        roamed, peers={KEYS[0]: replace(roamed.peers[KEYS[0]], endpoint="198.51.100.9:40000")}
    )
    assert diff(want, roamed, want).is_empty


def test_endpoint_changed_by_the_map_is_set() -> None:
    old = device(dpeer(0, 0, endpoint="192.0.2.1:51820"))
    new = device(dpeer(0, 0, endpoint="192.0.2.2:51820"))
    update = diff(new, live_of(old), old)
    assert update.peers[0].endpoint == "192.0.2.2:51820" and update.peers[0].update_only


def test_endpoint_set_when_peer_has_none() -> None:
    want = device(dpeer(0, 0, endpoint="192.0.2.1:51820"))
    live = live_of(device(dpeer(0, 0)))
    assert diff(want, live, want).peers[0].endpoint == "192.0.2.1:51820"


def test_no_desired_endpoint_keeps_the_learned_one() -> None:
    live = live_of(device(dpeer(0, 0, endpoint="192.0.2.1:51820")))
    assert diff(device(dpeer(0, 0)), live, None).is_empty


def test_device_fields() -> None:
    want = device(port=51821, fwmark=7)
    update = diff(want, LiveDevice(PUBLIC, 51820, 0xCA6C), None)
    assert update.private_key is None and update.listen_port == 51821 and update.fwmark == 7
    assert diff(device(port=0), LiveDevice(PUBLIC, 40123, 0xCA6C), None).is_empty


# --- properties -------------------------------------------------------------

peers_st = st.builds(
    lambda i, nets, ep, ka: dpeer(i, *nets, endpoint=ep, keepalive=ka),
    st.integers(0, 7),
    st.sets(st.integers(0, len(NETS) - 1), max_size=3),
    st.sampled_from(ENDPOINTS),
    st.sampled_from([0, 25]),
)
desired_st = st.builds(
    lambda ps, port, mark: device(*ps, port=port, fwmark=mark),
    st.lists(peers_st, max_size=6, unique_by=lambda p: p.public_key),
    st.sampled_from([51820, 51821]),
    st.sampled_from([0xCA6C, 1]),
)


@settings(max_examples=300)
@given(desired_st, desired_st)
def test_converges_in_one_step(want: DesiredDevice, previous: DesiredDevice) -> None:
    live = apply_update(LiveDevice(), diff(previous, LiveDevice(), None), PUBLIC)
    after = run(want, live, None)
    assert diff(want, after, want).is_empty
    expected = run(want, LiveDevice(), None)
    # endpoints: a peer that had one keeps it if the map no longer names one
    for key, peer in expected.peers.items():
        if peer.endpoint is None:
            expected.peers[key] = replace(peer, endpoint=after.peers[key].endpoint)  # type: ignore[index]
    assert config(after) == config(expected)


@settings(max_examples=300)
@given(desired_st, desired_st)
def test_with_last_applied_converges(want: DesiredDevice, previous: DesiredDevice) -> None:
    live = run(previous, LiveDevice(), None)
    after = run(want, live, previous)
    assert diff(want, after, want).is_empty
    assert set(after.peers) == set(want.peers)
    for key, peer in want.peers.items():
        assert after.peers[key].allowed_ips == peer.allowed_ips
        assert after.peers[key].keepalive == peer.keepalive


# --- links ------------------------------------------------------------------

IFACES = [ipaddress.ip_interface("100.64.0.1/32"), ipaddress.ip_interface("fd7a:7767:6174::1/128")]


def link(addresses: Iterable[Any] = (), routes: Iterable[Any] = (), mtu: int = 1420) -> DesiredLink:
    return DesiredLink(frozenset(addresses), frozenset(routes), 51820, 5210, 0xCA6C, mtu)


def live_link(addresses: Iterable[Any] = (), routes: Iterable[Any] = (), **kw: object) -> LiveLink:
    base: dict[str, object] = {
        "index": 5,
        "addresses": frozenset(addresses),
        "routes": frozenset(routes),
        "rule_families": frozenset({4, 6}),
        "mtu": 1420,
        "up": True,
    }
    base.update(kw)
    return LiveLink(**base)  # type: ignore[arg-type]


def test_link_noop() -> None:
    assert diff_links(link(IFACES, NETS[:3]), live_link(IFACES, NETS[:3])).is_empty


def test_link_changes() -> None:
    update = diff_links(
        link(IFACES[:1], NETS[:2], mtu=1440),
        live_link(IFACES, NETS[1:3], rule_families=frozenset({4}), up=False),
    )
    assert update == LinkUpdate(
        add_addresses=frozenset(),
        remove_addresses=frozenset(IFACES[1:]),
        add_routes=frozenset(NETS[:1]),
        remove_routes=frozenset(NETS[2:3]),
        add_rules=frozenset({6}),
        mtu=1440,
        up=True,
    )


def test_link_mtu_zero_leaves_it() -> None:
    assert diff_links(link(mtu=0), live_link(mtu=1280)).is_empty


@given(st.sets(st.sampled_from(NETS)), st.sets(st.sampled_from(NETS)))
def test_link_diff_then_apply_converges(want: set[object], have: set[object]) -> None:
    update = diff_links(link(routes=want), live_link(routes=have))
    after = (have | update.add_routes) - update.remove_routes
    assert after == want
    assert diff_links(link(routes=want), live_link(routes=after)).is_empty


@given(st.sets(st.sampled_from(NETS)), st.sets(st.sampled_from(NETS)), st.booleans())
def test_after_link_update_is_what_the_diff_asked_for(
    want: set[object], have: set[object], up: bool
) -> None:
    wanted = link(IFACES[:1], want, mtu=1400)
    before = live_link(IFACES[1:], have, up=up, rule_families=frozenset({4}))
    after = after_link_update(before, diff_links(wanted, before))
    assert diff_links(wanted, after).is_empty
    assert after.routes == want and after.addresses == frozenset(IFACES[:1])


@pytest.mark.parametrize("text", ["100.64.0.2/32", "10.0.0.0/8", "fd7a:7767:6174::2/128", "::/0"])
def test_route_message_round_trip(text: str) -> None:
    net = ipaddress.ip_network(text)
    for ack in (True, False):
        message = build_route(NEWROUTE, net, 7, 51820, 42, ack=ack)
        length, kind, flags, seq, _ = struct.unpack_from("=IHHII", message)
        assert (length, kind, seq) == (len(message), NEWROUTE, 42)
        assert bool(flags & 0x4) == ack  # NLM_F_ACK only where asked
        assert parse_route(message[16:]) == (net, 51820, 7)
