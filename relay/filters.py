"""What the relay forwards, and where it never sends (pure).

* :func:`wireguard_type` accepts only WireGuard's four message shapes: type 1
  handshake initiation (148 bytes), 2 response (92), 3 cookie reply (64), 4
  transport data (16-byte header, then at least 16 bytes and a multiple of 16),
  with the three reserved bytes zero.
* :func:`mac1_valid` checks a handshake message's mac1, which WireGuard keys
  with the *receiver's* static public key: the relay forwards a pair's
  handshakes only when they are addressed to the peer the ticket named.
* :func:`destination_refusal` names why an address may never be a destination
  (loopback, unspecified, link-local and the metadata address, multicast,
  broadcast and reserved ranges, the relay's own addresses), looking through
  IPv4-mapped, IPv4-compatible, NAT64, 6to4 and Teredo forms.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

__all__ = [
    "HANDSHAKE_INITIATION",
    "HANDSHAKE_RESPONSE",
    "IPAddress",
    "destination_refusal",
    "mac1",
    "mac1_valid",
    "normalize_ip",
    "wireguard_type",
]

IPAddress = IPv4Address | IPv6Address

HANDSHAKE_INITIATION = 1
HANDSHAKE_RESPONSE = 2
COOKIE_REPLY = 3
TRANSPORT = 4
_FIXED_SIZES = {HANDSHAKE_INITIATION: 148, HANDSHAKE_RESPONSE: 92, COOKIE_REPLY: 64}
_TRANSPORT_HEADER = 16
_LABEL_MAC1 = b"mac1----"
_METADATA = IPv4Address("169.254.169.254")
_THIS_NETWORK = IPv4Network("0.0.0.0/8")
_NAT64 = IPv6Network("64:ff9b::/96")
_V4_COMPATIBLE = IPv6Network("::/96")


def wireguard_type(data: bytes, max_size: int) -> int | None:
    """The WireGuard message type of ``data`` if it has exactly that shape, else None."""
    if len(data) > max_size or len(data) < 4 or data[1:4] != b"\x00\x00\x00":
        return None
    kind = data[0]
    if kind in _FIXED_SIZES:
        return kind if len(data) == _FIXED_SIZES[kind] else None
    payload = len(data) - _TRANSPORT_HEADER
    if kind == TRANSPORT and payload >= 16 and payload % 16 == 0:
        return kind
    return None


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


def _embedded_v4(ip: IPv6Address) -> IPv4Address | None:
    if ip in _NAT64 or (ip in _V4_COMPATIBLE and not ip.is_unspecified and ip != IPv6Address(1)):
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return ip.teredo[1] if ip.teredo is not None else None


def _v4_refusal(ip: IPv4Address, allow_loopback: bool) -> str | None:
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    if ip == _METADATA:
        return "metadata"
    if ip in _THIS_NETWORK:
        return "unspecified"
    if ip.is_link_local:
        return "link_local"
    if ip.is_multicast:
        return "multicast"
    return "reserved" if ip.is_reserved else None  # 240/4 includes 255.255.255.255


def _v6_refusal(ip: IPv6Address, allow_loopback: bool) -> str | None:
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    if ip.is_unspecified:
        return "unspecified"
    embedded = _embedded_v4(ip)
    if embedded is not None:
        return _v4_refusal(embedded, allow_loopback=False) or "embedded_ipv4"
    if ip.is_link_local or ip.is_site_local:
        return "link_local"
    if ip.is_multicast:
        return "multicast"
    return "reserved" if ip.is_reserved else None


def destination_refusal(
    ip: IPAddress, own: Collection[IPAddress] = (), *, allow_loopback: bool = False
) -> str | None:
    """Why the relay must never send to ``ip`` (a short label), or None if it may.

    ``ip`` should come from :func:`normalize_ip`. ``allow_loopback`` is for
    loopback-only tests; it admits 127/8 and ::1 but nothing else.
    """
    if ip in own:
        return "own_address"
    if isinstance(ip, IPv4Address):
        return _v4_refusal(ip, allow_loopback)
    return _v6_refusal(ip, allow_loopback)
