"""Coverage-guided fuzzing of the UAPI reply parser (agent/dataplane/uapi.py).

Properties: ``parse_get`` raises only :class:`UapiError`; a device it accepts,
rendered again as wireguard-go would, parses to the same device.
"""

from __future__ import annotations

import dataclasses
import math

import atheris
from _harness import PROJECT, fuzz

with atheris.instrument_imports(include=PROJECT):
    from agent.dataplane.backend import LivePeer
    from agent.dataplane.uapi import UapiError, parse_get
from lab.uapi_text import render_get  # after: it imports the project too

CAPTURED = (  # wireguard-go 0.0.20220316, as in tests/unit/agent/test_uapi.py
    b"private_key=d841a6b6b54387b97fd726f8f89452c713642dbfca9163e7454ce547e2d5025a\n"
    b"listen_port=51820\nfwmark=51820\n"
    b"public_key=b9a27c7d053514d65e7ca70baa7bc77cfd9874e2e8e2fc1c92a68c404b534450\n"
    b"preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    b"protocol_version=1\nendpoint=192.0.2.2:51820\n"
    b"last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\ntx_bytes=9\nrx_bytes=7\n"
    b"persistent_keepalive_interval=25\n"
    b"allowed_ip=100.64.0.2/32\nallowed_ip=fd7a:7767:6174::2/128\n"
    b"public_key=baf9f014eac0bac7bd44cc030672f0c69746c7d6ffd738f2854f91bc71df2e1d\n"
    b"endpoint=[2001:db8::5]:4500\nallowed_ip=10.0.0.0/8\n"
    b"errno=0\n\n"
)


def seeds() -> list[bytes]:
    return [CAPTURED, b"listen_port=48823\nerrno=0\n\n", b"errno=-22\n\n", b"errno=0\n\n"]


def _without_time(peer: LivePeer) -> LivePeer:
    return dataclasses.replace(peer, last_handshake=None)


def test_one_input(data: bytes) -> None:
    try:
        device = parse_get(data)
    except UapiError:
        return
    again = parse_get(render_get(None, device.listen_port, device.fwmark, device.peers.values()))
    assert (again.listen_port, again.fwmark) == (device.listen_port, device.fwmark)
    assert again.peers.keys() == device.peers.keys()
    for key, peer in device.peers.items():
        assert _without_time(again.peers[key]) == _without_time(peer)
        t1, t2 = peer.last_handshake, again.peers[key].last_handshake
        assert (t1 is None) == (t2 is None) and (t1 is None or math.isclose(t1, t2 or 0.0))


if __name__ == "__main__":
    fuzz(test_one_input, seeds())
