"""What the relay forwards, and where it never sends (pure).

* :func:`wireguard_type` accepts only WireGuard's four message shapes: type 1
  handshake initiation (148 bytes), 2 response (92), 3 cookie reply (64), 4
  transport data (:func:`transport_sizes`), with the three reserved bytes zero.
* :func:`mac1_valid` checks a handshake message's mac1, which WireGuard keys
  with the *receiver's* static public key: the relay forwards a pair's
  handshakes only when they are addressed to the peer the ticket named.
* :func:`destination_refusal` (the one rule of :mod:`wiregate.net`, which also
  judges the endpoints agents advertise) names why an address may never be a
  destination (loopback, unspecified, link-local and the metadata address,
  multicast, broadcast and reserved ranges, the relay's own addresses), looking
  through IPv4-mapped, IPv4-compatible, NAT64, 6to4 and Teredo forms.
"""

from __future__ import annotations

import hashlib
import hmac
from ipaddress import IPv6Address, ip_address

from wiregate.net import IPAddress, destination_refusal

__all__ = [
    "HANDSHAKE_INITIATION",
    "HANDSHAKE_RESPONSE",
    "TRANSPORT",
    "IPAddress",
    "destination_refusal",
    "mac1",
    "mac1_valid",
    "normalize_ip",
    "transport_sizes",
    "wireguard_type",
]

HANDSHAKE_INITIATION = 1
HANDSHAKE_RESPONSE = 2
COOKIE_REPLY = 3
TRANSPORT = 4
_FIXED_SIZES = {HANDSHAKE_INITIATION: 148, HANDSHAKE_RESPONSE: 92, COOKIE_REPLY: 64}
_TRANSPORT_HEADER = 16
_TAG = 16
#: WireGuard pads a packet to a multiple of 16 bytes but never beyond the tunnel's
#: MTU, so a packet of exactly MTU bytes (1420 by default) may end off the 16-byte
#: grid. Sizes off the grid are accepted from this packet length on: 576, the
#: datagram every IPv4 host must accept, is below any tunnel MTU that carries IPv4.
UNALIGNED_FROM = 576
_LABEL_MAC1 = b"mac1----"


def wireguard_type(data: bytes, max_size: int) -> int | None:
    """The WireGuard message type of ``data`` if it has exactly that shape, else None."""
    if len(data) > max_size or len(data) < 4 or data[1:4] != b"\x00\x00\x00":
        return None
    kind = data[0]
    if kind in _FIXED_SIZES:
        return kind if len(data) == _FIXED_SIZES[kind] else None
    if kind == TRANSPORT and _transport_size(len(data)):
        return kind
    return None


def _transport_size(size: int) -> bool:
    packet = size - _TRANSPORT_HEADER - _TAG  # the padded packet (0: a keepalive)
    return packet >= 0 and (packet % 16 == 0 or packet >= UNALIGNED_FROM)


def transport_sizes(max_size: int) -> frozenset[int]:
    """Every size transport data may have up to ``max_size``: a 16-byte header, the
    packet padded to 16 bytes (or a full-MTU packet of at least
    :data:`UNALIGNED_FROM` bytes, which padding leaves as it is), a 16-byte tag."""
    return frozenset(n for n in range(max_size + 1) if _transport_size(n))


def mac1(message_without_macs: bytes, receiver_public_key: bytes) -> bytes:
    """WireGuard's mac1: keyed BLAKE2s-128 with HASH(LABEL_MAC1 || receiver's public key)."""
    key = hashlib.blake2s(_LABEL_MAC1 + receiver_public_key).digest()
    return hashlib.blake2s(message_without_macs, key=key, digest_size=16).digest()


def mac1_valid(data: bytes, receiver_public_key: bytes) -> bool:
    """Whether a handshake message's mac1 is keyed with ``receiver_public_key``."""
    end = len(data) - 16
    expected = mac1(data[: end - 16], receiver_public_key)
    return hmac.compare_digest(expected, data[end - 16 : end])


def normalize_ip(host: str) -> IPAddress:
    """A socket host string as an address; IPv4-mapped IPv6 becomes IPv4. ValueError if not one."""
    ip = ip_address(host.partition("%")[0])
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
