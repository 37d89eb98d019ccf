"""A ``get=1`` reply rendered the way wireguard-go writes it (for the UAPI fuzzers)."""

from __future__ import annotations

from collections.abc import Iterable

from agent.dataplane.backend import LivePeer
from wiregate.keys import decode_key

__all__ = ["render_get"]


def _peer_lines(peer: LivePeer) -> list[str]:
    handshake = peer.last_handshake or 0.0
    sec = int(handshake)
    return [
        f"public_key={decode_key(peer.public_key).hex()}",
        "preshared_key=" + "00" * 32,
        "protocol_version=1",
        *([f"endpoint={peer.endpoint}"] if peer.endpoint else []),
        f"last_handshake_time_sec={sec}",
        f"last_handshake_time_nsec={round((handshake - sec) * 1e9)}",
        f"tx_bytes={peer.tx}",
        f"rx_bytes={peer.rx}",
        f"persistent_keepalive_interval={peer.keepalive}",
        *(f"allowed_ip={net}" for net in sorted(peer.allowed_ips, key=str)),
    ]


def render_get(private: bytes | None, port: int, fwmark: int, peers: Iterable[LivePeer]) -> bytes:
    """The reply of a device with this private key, port, fwmark and peers (errno=0)."""
    lines = [f"private_key={private.hex()}"] if private is not None else []
    lines += [f"listen_port={port}"] if port else []
    lines += [f"fwmark={fwmark}"] if fwmark else []
    for peer in peers:
        lines += _peer_lines(peer)
    return ("".join(f"{line}\n" for line in lines) + "errno=0\n\n").encode()
