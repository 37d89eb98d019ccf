"""The kernel backend's batched WG_CMD_SET_DEVICE messages (built and decoded on the host;
the kernel tier applies them to the real module)."""

from __future__ import annotations

import base64

from pyroute2.netlink.generic.wireguard import AsyncWireGuard, wgmsg

from agent.dataplane.backend import DeviceUpdate, PeerUpdate, network
from agent.dataplane.netlink import (
    BATCH_BYTES,
    batches,
    build_set_device,
    device_attrs,
    peer_request,
)


class Core:
    """Just what the message builder uses of pyroute2's AsyncWireGuard."""

    prid, pid = 27, 4242
    _wg_set_peer = AsyncWireGuard._wg_set_peer
    _wg_test_key = AsyncWireGuard._wg_test_key
    _wg_build_allowedips = AsyncWireGuard._wg_build_allowedips


def key(i: int) -> str:
    return base64.b64encode(i.to_bytes(2, "big") * 16).decode()


def peers(n: int) -> list[PeerUpdate]:
    return [
        PeerUpdate(
            public_key=key(i),
            endpoint=f"198.51.100.{i % 200 + 1}:51820",
            keepalive=25,
            allowed_ips=frozenset(
                {network(f"100.64.{i // 256}.{i % 256}/32"), network(f"fd00::{i:x}/128")}
            ),
        )
        for i in range(n)
    ]


def test_one_thousand_peers_fit_in_few_messages_each_under_the_limit() -> None:
    requests = [peer_request(p) for p in peers(1000)]
    groups = batches(requests)
    assert sum(len(g) for g in groups) == 1000
    assert [r for g in groups for r in g] == requests  # order kept
    assert 10 <= len(groups) <= 40
    for group in groups:
        encoded = build_set_device(Core(), "wg0", [], group).data
        assert len(encoded) <= BATCH_BYTES + 512  # the estimate is close to the real size


def test_a_message_carries_every_peer_and_the_device_fields() -> None:
    update = DeviceUpdate(private_key=bytes(range(32)), listen_port=51820, fwmark=0x5747)
    group = [peer_request(p) for p in peers(40)]
    data = build_set_device(Core(), "wg0", device_attrs(update), group).data
    msg = wgmsg(data)
    msg.decode()
    assert msg.get_attr("WGDEVICE_A_IFNAME") == "wg0"
    assert msg.get_attr("WGDEVICE_A_LISTEN_PORT") == 51820
    assert msg.get_attr("WGDEVICE_A_FWMARK") == 0x5747
    decoded = msg.get_attr("WGDEVICE_A_PEERS")
    assert len(decoded) == 40
    keys = [p.get_attr("WGPEER_A_PUBLIC_KEY") for p in decoded]
    assert keys == [key(i).encode() for i in range(40)]
    assert all(len(p.get_attr("WGPEER_A_ALLOWEDIPS")) == 2 for p in decoded)


def test_no_peers_is_one_message_for_the_device_fields() -> None:
    assert batches([]) == [[]]
    removal = peer_request(PeerUpdate(public_key=key(7), remove=True))
    assert batches([removal]) == [[removal]]
