"""The WireGuard generic-netlink codec against pyroute2's encoder and parser.

Any single message is byte for byte what pyroute2's ``wgmsg`` writes for the
same request (pyroute2 is the reference the kernel tier has run against); split
requests decode, with pyroute2's parser, to the same peers and allowed IPs. The
sender's answers come from the host's own kernel (the generic-netlink
controller), so they run without the WireGuard module; tests/kernel applies
the messages to the real module.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_SET_DEVICE,
    WG_GENL_VERSION,
    AsyncWireGuard,
    wgmsg,
)

from agent.dataplane import wgnl
from agent.dataplane.backend import DeviceUpdate, IPNetwork, PeerUpdate, network
from agent.dataplane.netlink import NetlinkBackend, wire_device, wire_peer
from wiregate.errors import DataPlaneError

FAMILY, PID = 27, 4242


class _Core:
    """What pyroute2's peer encoder uses of its AsyncWireGuard."""

    _wg_set_peer = AsyncWireGuard._wg_set_peer
    _wg_test_key = AsyncWireGuard._wg_test_key
    _wg_build_allowedips = AsyncWireGuard._wg_build_allowedips


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _pyroute2_peer(peer: wgnl.Peer) -> dict[str, Any]:
    request: dict[str, Any] = {"public_key": _b64(peer.public_key)}
    if peer.flags & wgnl.PEER_REMOVE_ME:
        request["remove"] = True
        return request
    request["update_only"] = bool(peer.flags & wgnl.PEER_UPDATE_ONLY)
    request["replace_allowed_ips"] = bool(peer.flags & wgnl.PEER_REPLACE_ALLOWEDIPS)
    if peer.endpoint is not None:
        request["endpoint_addr"], request["endpoint_port"] = str(peer.endpoint[0]), peer.endpoint[1]
    if peer.preshared_key is not None:
        request["preshared_key"] = _b64(peer.preshared_key)
    if peer.keepalive is not None:
        request["persistent_keepalive"] = peer.keepalive
    if peer.allowed_ips is not None:
        request["allowed_ips"] = [str(n) for n in peer.allowed_ips]
    return request


def pyroute2_message(device: wgnl.Device, seq: int) -> bytes:
    """pyroute2's encoding of ``device`` as one message (AsyncWireGuard.set's, extended
    to ifindex, device flags and many peers)."""
    msg = wgmsg()
    if device.ifindex is not None:
        msg["attrs"].append(["WGDEVICE_A_IFINDEX", device.ifindex])
    else:
        msg["attrs"].append(["WGDEVICE_A_IFNAME", device.ifname])
    if device.private_key is not None:
        msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", _b64(device.private_key)])
    if device.listen_port is not None:
        msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", device.listen_port])
    if device.fwmark is not None:
        msg["attrs"].append(["WGDEVICE_A_FWMARK", device.fwmark])
    if device.flags:
        msg["attrs"].append(["WGDEVICE_A_FLAGS", device.flags])
    if device.peers:
        holder = wgmsg()
        for peer in device.peers:
            _Core()._wg_set_peer(holder, _pyroute2_peer(peer))
        merged = [entry for _, group in holder["attrs"] for entry in group]
        msg["attrs"].append(["WGDEVICE_A_PEERS", merged])
    msg["cmd"], msg["version"] = WG_CMD_SET_DEVICE, WG_GENL_VERSION
    msg["header"].update(type=FAMILY, flags=NLM_F_REQUEST | NLM_F_ACK, pid=PID, sequence_number=seq)
    msg.encode()
    return bytes(msg.data)


def _spans(buf: bytes | bytearray, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(offset, length, type without flags) of each attribute in ``buf[start:end]``."""
    while start < end:
        length, kind = struct.unpack_from("=HH", buf, start)
        assert length >= 4 and start + length <= end
        yield start, length, kind & 0x3FFF
        start += (length + 3) & ~3


def as_wg_writes_lists(data: bytes) -> bytes:
    """pyroute2's message with its list entries (peers, allowed IPs) typed 0 | NLA_F_NESTED,
    as wg(8) and wgnl write them; pyroute2 numbers them from 1 (the kernel reads either)."""
    out = bytearray(data)

    def renumber(start: int, end: int) -> Iterator[tuple[int, int]]:
        for offset, length, _ in _spans(out, start, end):
            struct.pack_into("=H", out, offset + 2, 0x8000)
            yield offset + 4, offset + length

    for offset, length, kind in _spans(out, 20, len(out)):
        if kind == 8:  # WGDEVICE_A_PEERS
            for peer_start, peer_end in renumber(offset + 4, offset + length):
                for a_off, a_len, a_kind in _spans(out, peer_start, peer_end):
                    if a_kind == 9:  # WGPEER_A_ALLOWEDIPS
                        list(renumber(a_off + 4, a_off + a_len))
    return bytes(out)


def decoded(data: bytes) -> Any:
    msg = wgmsg(data)
    msg.decode()
    return msg


_DEVICE_ATTRS = ("IFINDEX", "IFNAME", "PRIVATE_KEY", "LISTEN_PORT", "FWMARK", "FLAGS")
_PEER_ATTRS = ("PUBLIC_KEY", "PRESHARED_KEY", "FLAGS", "PERSISTENT_KEEPALIVE_INTERVAL")


def summary(data: bytes) -> tuple[list[Any], list[Any]]:
    """Every field of a message as pyroute2's parser reads it."""
    msg = decoded(data)
    device = [msg.get_attr(f"WGDEVICE_A_{name}") for name in _DEVICE_ATTRS]
    peers = []
    for peer in msg.get_attr("WGDEVICE_A_PEERS") or ():
        endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
        allowed = peer.get_attr("WGPEER_A_ALLOWEDIPS")
        peers.append(
            [peer.get_attr(f"WGPEER_A_{name}") for name in _PEER_ATTRS]
            + [None if endpoint is None else (endpoint["addr"], endpoint["port"])]
            + [None if allowed is None else [a["addr"] for a in allowed]]
        )
    return device, peers


# --- generated requests ---------------------------------------------------------

keys = st.binary(min_size=32, max_size=32)


def _net(address: ipaddress.IPv4Address | ipaddress.IPv6Address, length: int) -> IPNetwork:
    return ipaddress.ip_network(f"{address}/{length}", strict=False)


networks: st.SearchStrategy[IPNetwork] = st.one_of(
    st.ip_addresses(v=4).flatmap(lambda a: st.integers(0, 32).map(lambda n: _net(a, n))),
    st.ip_addresses(v=6).flatmap(lambda a: st.integers(0, 128).map(lambda n: _net(a, n))),
)
endpoints = st.tuples(st.ip_addresses(), st.integers(1, 65535))
optional_flags = st.sampled_from(
    [0, wgnl.PEER_UPDATE_ONLY, wgnl.PEER_REPLACE_ALLOWEDIPS, wgnl.PEER_UPDATE_ONLY | 2]
)
kept_peers = st.builds(
    wgnl.Peer,
    public_key=keys,
    flags=optional_flags,
    preshared_key=st.none() | keys,
    endpoint=st.none() | endpoints,
    keepalive=st.none() | st.integers(0, 65535),
    allowed_ips=st.none() | st.lists(networks, max_size=6).map(tuple),
)
removed_peers = st.builds(wgnl.Peer, public_key=keys, flags=st.just(wgnl.PEER_REMOVE_ME))
devices = st.builds(
    wgnl.Device,
    ifname=st.text("abcwg0123456789", min_size=1, max_size=15),
    private_key=st.none() | keys,
    listen_port=st.none() | st.integers(0, 65535),
    fwmark=st.none() | st.integers(0, 2**32 - 1),
    flags=st.sampled_from([0, wgnl.DEVICE_REPLACE_PEERS]),
    peers=st.lists(kept_peers | removed_peers, max_size=8).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(devices, st.integers(0, 2**31))
def test_one_message_is_byte_for_byte_pyroute2s(device: wgnl.Device, seq: int) -> None:
    (ours,) = wgnl.build_set_device(FAMILY, device, seq=seq, pid=PID, budget=1 << 20)
    assert ours == as_wg_writes_lists(pyroute2_message(device, seq))
    assert summary(ours) == summary(pyroute2_message(device, seq))


@given(st.integers(1, 2**32 - 1))
def test_an_interface_index_is_pyroute2s_too(index: int) -> None:
    device = wgnl.Device(ifindex=index, listen_port=51820)
    (ours,) = wgnl.build_set_device(FAMILY, device, seq=3, pid=PID)
    assert ours == as_wg_writes_lists(pyroute2_message(device, 3))


def _walk(data: bytes, nested: bool) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset < len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        assert length >= 4 and offset + length <= len(data)
        yield kind, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    assert offset == len(data) or not nested


def test_every_nested_attribute_is_marked_nested() -> None:
    peer = wgnl.Peer(bytes(32), allowed_ips=(network("10.0.0.0/8"), network("fd00::/64")))
    (data,) = wgnl.build_set_device(FAMILY, wgnl.Device(ifname="wg0", peers=(peer, peer)))
    top = dict(_walk(data[20:], True))
    assert (8 | 0x8000) in top  # WGDEVICE_A_PEERS
    for kind, entry in _walk(top[8 | 0x8000], True):
        assert kind & 0x8000
        inner = dict(_walk(entry, True))
        assert (9 | 0x8000) in inner  # WGPEER_A_ALLOWEDIPS
        assert all(k & 0x8000 for k, _ in _walk(inner[9 | 0x8000], True))


# --- splitting under a byte budget ---------------------------------------------


def _peers_of(messages: list[bytes]) -> list[list[Any]]:
    return [decoded(m).get_attr("WGDEVICE_A_PEERS") or [] for m in messages]


def _addrs(peer: Any) -> set[IPNetwork]:
    return {ipaddress.ip_network(a["addr"]) for a in peer.get_attr("WGPEER_A_ALLOWEDIPS") or ()}


@settings(max_examples=100, deadline=None)
@given(
    st.lists(kept_peers, min_size=1, max_size=30, unique_by=lambda p: p.public_key),
    st.integers(400, 2000),
)
def test_split_messages_stay_under_the_budget_and_carry_everything(
    peers: list[wgnl.Peer], budget: int
) -> None:
    device = wgnl.Device(ifname="wg0", private_key=bytes(range(32)), listen_port=7, peers=(*peers,))
    messages = wgnl.build_set_device(FAMILY, device, seq=10, budget=budget)
    assert all(len(m) <= budget for m in messages)
    assert [struct.unpack_from("=I", m, 8)[0] for m in messages] == list(
        range(10, 10 + len(messages))
    )
    first, *rest = [decoded(m) for m in messages]
    assert first.get_attr("WGDEVICE_A_LISTEN_PORT") == 7
    assert all(m.get_attr("WGDEVICE_A_LISTEN_PORT") is None for m in rest)
    assert all(m.get_attr("WGDEVICE_A_IFNAME") == "wg0" for m in (first, *rest))
    seen: dict[bytes, set[IPNetwork]] = {}
    for part in (p for group in _peers_of(messages) for p in group):
        key = base64.b64decode(part.get_attr("WGPEER_A_PUBLIC_KEY"))
        continued = key in seen
        if continued:  # a continuation: only the key, UPDATE_ONLY and more allowed IPs
            assert part.get_attr("WGPEER_A_ENDPOINT") is None
            assert part.get_attr("WGPEER_A_FLAGS") & wgnl.PEER_REPLACE_ALLOWEDIPS == 0
        seen.setdefault(key, set()).update(_addrs(part))
    assert list(seen) == [p.public_key for p in peers]  # order kept
    for peer in peers:
        assert seen[peer.public_key] == set(peer.allowed_ips or ())


def test_a_peer_that_fits_a_message_is_never_split() -> None:
    small = [
        wgnl.Peer(bytes([i]) * 32, allowed_ips=(network(f"10.{i}.0.0/16"),)) for i in range(200)
    ]
    messages = wgnl.build_set_device(
        FAMILY, wgnl.Device(ifname="wg0", peers=(*small,)), budget=1000
    )
    keys_per_message = [
        [p.get_attr("WGPEER_A_PUBLIC_KEY") for p in group] for group in _peers_of(messages)
    ]
    flat = [k for group in keys_per_message for k in group]
    assert len(flat) == len(set(flat)) == 200


def test_a_peer_larger_than_a_message_continues_with_update_only() -> None:
    many = tuple(network(f"100.64.{i // 256}.{i % 256}/32") for i in range(600))
    peer = wgnl.Peer(
        b"\x07" * 32, wgnl.PEER_UPDATE_ONLY | wgnl.PEER_REPLACE_ALLOWEDIPS, allowed_ips=many
    )
    messages = wgnl.build_set_device(FAMILY, wgnl.Device(ifname="wg0", peers=(peer,)), budget=4096)
    assert len(messages) >= 5
    parts = [group[0] for group in _peers_of(messages)]
    flags = [p.get_attr("WGPEER_A_FLAGS") for p in parts]
    assert flags[0] == wgnl.PEER_UPDATE_ONLY | wgnl.PEER_REPLACE_ALLOWEDIPS  # replaced once
    assert set(flags[1:]) == {wgnl.PEER_UPDATE_ONLY}  # a vanished peer is not recreated
    assert set().union(*(_addrs(p) for p in parts)) == set(many)


def test_one_thousand_peers_fit_in_few_messages() -> None:
    update = DeviceUpdate(
        private_key=bytes(range(32)), listen_port=51820, peers=tuple(_updates(1000))
    )
    messages = wgnl.build_set_device(FAMILY, wire_device("wg0", update))
    assert 10 <= len(messages) <= 40
    assert sum(len(group) for group in _peers_of(messages)) == 1000


def test_no_peers_is_one_message_for_the_device_fields() -> None:
    (only,) = wgnl.build_set_device(FAMILY, wgnl.Device(ifname="wg0", fwmark=0x5747))
    assert decoded(only).get_attr("WGDEVICE_A_FWMARK") == 0x5747
    assert decoded(only).get_attr("WGDEVICE_A_PEERS") is None


@pytest.mark.parametrize(
    ("device", "budget", "why"),
    [
        (wgnl.Device(ifname="wg0", private_key=b"short"), 8192, "32 bytes"),
        (wgnl.Device(ifname="wg0", peers=(wgnl.Peer(b"x" * 31),)), 8192, "32 bytes"),
        (wgnl.Device(listen_port=1), 8192, "interface"),
        (
            wgnl.Device(
                ifname="wg0", peers=(wgnl.Peer(bytes(32), allowed_ips=(network("::/0"),)),)
            ),
            100,
            "budget",
        ),
    ],
)
def test_bad_requests_are_refused_before_anything_is_sent(
    device: wgnl.Device, budget: int, why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        wgnl.build_set_device(FAMILY, device, budget=budget)


# --- the backend's mapping ------------------------------------------------------


def _key(i: int) -> str:
    return base64.b64encode(i.to_bytes(2, "big") * 16).decode()


def _updates(n: int) -> Iterator[PeerUpdate]:
    for i in range(n):
        yield PeerUpdate(
            public_key=_key(i),
            endpoint=f"198.51.100.{i % 200 + 1}:51820",
            keepalive=25,
            allowed_ips=frozenset(
                {network(f"100.64.{i // 256}.{i % 256}/32"), network(f"fd00::{i:x}/128")}
            ),
        )


def test_peer_updates_map_to_netlink_flags() -> None:
    key = _key(1)
    assert wire_peer(PeerUpdate(key, remove=True)) == wgnl.Peer(
        bytes([0, 1]) * 16, wgnl.PEER_REMOVE_ME
    )
    changed = wire_peer(PeerUpdate(key, update_only=True, allowed_ips=frozenset()))
    assert changed.flags == wgnl.PEER_UPDATE_ONLY | wgnl.PEER_REPLACE_ALLOWEDIPS
    assert changed.allowed_ips == ()
    roamed = wire_peer(PeerUpdate(key, update_only=True, endpoint="[2001:db8::1]:7"))
    assert roamed.flags == wgnl.PEER_UPDATE_ONLY and roamed.allowed_ips is None
    assert roamed.endpoint == (ipaddress.ip_address("2001:db8::1"), 7)
    fresh = wire_peer(PeerUpdate(key, allowed_ips=frozenset({network("10.0.0.0/8")}), keepalive=25))
    assert fresh.flags == 0 and fresh.keepalive == 25


def test_a_bad_key_fails_the_write_with_one_line_and_sends_nothing() -> None:
    backend = NetlinkBackend()
    try:
        update = DeviceUpdate(peers=(PeerUpdate("bm90IGEga2V5"),))
        with pytest.raises(DataPlaneError, match="refused: a WireGuard key") as caught:
            backend.write("wg0", update)
        assert "\n" not in str(caught.value)
        assert backend.wgsock._sock is None  # not even the family was resolved
    finally:
        backend.close()


# --- the sender, against this host's kernel -------------------------------------


def test_the_family_id_is_resolved_from_the_kernel() -> None:
    sock = wgnl.WireGuardSocket(family=b"nlctrl")  # always there: id 0x10
    try:
        (message,) = sock.encode(wgnl.Device(ifname="wg0"))
        assert struct.unpack_from("=IH", message)[1] == 0x10  # addressed to the family
    finally:
        sock.close()


def test_an_unknown_family_is_a_refusal_with_its_errno() -> None:
    sock = wgnl.WireGuardSocket(family=b"wgnnofamily")
    with pytest.raises(wgnl.WireGuardRefused, match="ENOENT") as caught:
        sock.set_device(wgnl.Device(ifname="wg0", listen_port=1))
    assert caught.value.errno == errno.ENOENT
    sock.close()


def test_a_refused_message_raises_with_the_kernels_errno() -> None:
    """The controller has no WG_CMD_SET_DEVICE (its command 1): a real refusal, read from
    a capped acknowledgement."""
    sock = wgnl.WireGuardSocket(family=b"nlctrl")
    try:
        with pytest.raises(wgnl.WireGuardRefused) as caught:
            sock.set_device(wgnl.Device(ifname="wg0", listen_port=1))
        assert caught.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)
        assert str(caught.value).startswith("WireGuard set on wg0 refused: ")
        # the socket stays usable: the next request gets its own answer
        with pytest.raises(wgnl.WireGuardRefused):
            sock.set_device(wgnl.Device(ifname="wg0", listen_port=2))
    finally:
        sock.close()


def test_acknowledgements_carry_the_kernels_message() -> None:
    """An extended ACK as the kernel writes it (capped, with NLMSGERR_ATTR_MSG)."""
    text = b"Unknown device\0"
    tlv = struct.pack("=HH", 4 + len(text), 1) + text + b"\0" * (-len(text) % 4)
    echoed = struct.pack("=IHHII", 300, FAMILY, 5, 9, 0)
    payload = struct.pack("=i", -errno.ENODEV) + echoed + tlv
    data = struct.pack("=IHHII", 16 + len(payload), 2, 0x300, 9, 0) + payload
    ok = struct.pack("=IHHII", 36, 2, 0x100, 10, 0) + struct.pack("=i", 0) + echoed
    assert list(wgnl.parse_acks(data + ok)) == [(9, errno.ENODEV, "Unknown device"), (10, 0, "")]


def test_a_truncated_answer_is_refused() -> None:
    with pytest.raises(DataPlaneError, match="malformed"):
        list(wgnl.parse_acks(struct.pack("=IHHII", 64, 2, 0, 1, 0)))


def test_the_getfamily_request_is_what_the_controller_reads() -> None:
    data = wgnl.build_get_family(b"wireguard", seq=5)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data)
    assert (length, kind, seq) == (len(data), 0x10, 5) and flags & 1
    assert data[16] == 3  # CTRL_CMD_GETFAMILY
    assert data[24:34] == b"wireguard\0"


def test_a_write_the_kernel_cannot_take_is_one_data_plane_error() -> None:
    """Without the module (ENOENT for the family) or without the interface (ENODEV)."""
    backend = NetlinkBackend()
    try:
        for write in (backend.write, lambda n, u: backend.begin_write(n, u)()):
            with pytest.raises(DataPlaneError, match=r"ENOENT|ENODEV") as caught:
                write("wgnnosuchdev0", DeviceUpdate(listen_port=1))
            assert "\n" not in str(caught.value)
    finally:
        backend.close()
