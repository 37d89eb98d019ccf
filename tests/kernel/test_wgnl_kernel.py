"""The WireGuard netlink codec (agent/dataplane/wgnl.py) against the real module.

What the backend does not exercise itself: a peer split across messages (its
allowed IPs replaced once, continued with UPDATE_ONLY), the interface by index,
preshared keys, IPv6 endpoints, REPLACE_PEERS, and the kernel's refusals.
``wg show IFACE dump`` is the independent reader.
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.dataplane import wgnl
from agent.dataplane.backend import DeviceUpdate, PeerUpdate
from agent.dataplane.netlink import NetlinkBackend
from wiregate.errors import DataPlaneError
from wiregate.keys import encode_key, generate_private_key, public_from_private

pytestmark = pytest.mark.kernel


def raw_public() -> bytes:
    return public_from_private(generate_private_key())


@pytest.fixture
def iface() -> Iterator[str]:
    name = f"wgn{secrets.token_hex(3)}"
    subprocess.run(["ip", "link", "add", name, "type", "wireguard"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def dump(name: str) -> dict[str, list[str]]:
    """Peers by public key: ``wg show dump``'s fields (psk, endpoint, ips, ..., keepalive)."""
    out = subprocess.run(
        ["wg", "show", name, "dump"], capture_output=True, text=True, check=True
    ).stdout
    return {f[0]: f[1:] for f in (ln.split("\t") for ln in out.splitlines()[1:])}


def ifindex(name: str) -> int:
    return int(Path(f"/sys/class/net/{name}/ifindex").read_text())


def test_a_peer_larger_than_a_message_is_replaced_exactly(iface: str) -> None:
    key = raw_public()
    first = tuple(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(1500))
    second = tuple(ipaddress.ip_network(f"fd00:{i:x}::/64") for i in range(1200))
    sock = wgnl.WireGuardSocket(budget=4096)
    try:
        sent = sock.set_device(
            wgnl.Device(ifname=iface, peers=(wgnl.Peer(key, allowed_ips=first),))
        )
        assert sent >= 10
        flags = wgnl.PEER_UPDATE_ONLY | wgnl.PEER_REPLACE_ALLOWEDIPS
        sock.set_device(
            wgnl.Device(ifname=iface, peers=(wgnl.Peer(key, flags, allowed_ips=second),))
        )
    finally:
        sock.close()
    ips = dump(iface)[encode_key(key)][2].split(",")
    assert {ipaddress.ip_network(n) for n in ips} == set(second)


def test_update_only_never_creates_a_peer_even_when_split(iface: str) -> None:
    many = tuple(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(800))
    peer = wgnl.Peer(raw_public(), wgnl.PEER_UPDATE_ONLY | 2, allowed_ips=many)
    sock = wgnl.WireGuardSocket(budget=4096)
    try:
        assert sock.set_device(wgnl.Device(ifname=iface, peers=(peer,))) > 1
    finally:
        sock.close()
    assert dump(iface) == {}


def test_by_index_with_preshared_key_ipv6_endpoint_and_replace_peers(iface: str) -> None:
    old, new, psk = raw_public(), raw_public(), secrets.token_bytes(32)
    private = generate_private_key()
    endpoint = (ipaddress.ip_address("2001:db8::7"), 51820)
    sock = wgnl.WireGuardSocket()
    try:
        sock.set_device(wgnl.Device(ifname=iface, peers=(wgnl.Peer(old),)))
        assert set(dump(iface)) == {encode_key(old)}
        device = wgnl.Device(
            ifindex=ifindex(iface),
            private_key=private,
            listen_port=51777,
            fwmark=0x77,
            flags=wgnl.DEVICE_REPLACE_PEERS,
            peers=(wgnl.Peer(new, preshared_key=psk, endpoint=endpoint, keepalive=25),),
        )
        assert sock.set_device(device) == 1
    finally:
        sock.close()
    peers = dump(iface)
    assert set(peers) == {encode_key(new)}
    psk_text, endpoint_text, _ips, *_rest, keepalive = peers[encode_key(new)]
    assert psk_text == base64.b64encode(psk).decode()
    assert endpoint_text == "[2001:db8::7]:51820" and keepalive == "25"
    show = subprocess.run(["wg", "show", iface, "listen-port"], capture_output=True, text=True)
    assert show.stdout.strip() == "51777"


def test_refusals_are_one_line_data_plane_errors() -> None:
    backend = NetlinkBackend()
    try:
        with pytest.raises(DataPlaneError, match="ENODEV") as caught:
            backend.write("wgnnosuchdev", DeviceUpdate(listen_port=1))
        assert "\n" not in str(caught.value)
        # the socket answers the next request normally
        with pytest.raises(DataPlaneError, match="ENODEV"):
            backend.write(
                "wgnnosuchdev", DeviceUpdate(peers=(PeerUpdate(encode_key(raw_public())),))
            )
    finally:
        backend.close()


def test_a_refused_message_stops_the_rest(iface: str) -> None:
    """An unknown device is refused at the first message (the rest are not sent); the
    same socket then applies a request of several messages."""
    sock = wgnl.WireGuardSocket(budget=1024)
    peers = tuple(wgnl.Peer(raw_public()) for _ in range(40))
    try:
        with pytest.raises(wgnl.WireGuardRefused):
            sock.set_device(wgnl.Device(ifname=iface + "x", peers=peers))
        assert sock.set_device(wgnl.Device(ifname=iface, peers=peers)) > 1
    finally:
        sock.close()
    assert len(dump(iface)) == 40
