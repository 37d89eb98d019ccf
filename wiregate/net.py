"""Addresses on the wire and in settings: one ``host:port`` parser, one refusal rule.

Every ``host:port`` a wiregate process reads (flags, settings, the map, the
stream, enrollment) is parsed by :func:`parse_endpoint`, with one grammar:

* ``IPv4:PORT``, ``[IPv6]:PORT`` and, where the caller allows names,
  ``NAME:PORT`` (DNS labels of letters, digits, ``-`` and ``_``);
* an IPv6 address always in brackets, never with a zone index (``%eth0``);
* a host is never empty; a port is decimal ``1..65535`` without leading zeros
  (``0``, an ephemeral port, only for listen addresses that ask for it).

Every address a peer or an agent names as an endpoint is refused exactly when
:func:`destination_refusal` refuses it: the same rule the relay applies before
it sends anything anywhere.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from wiregate.errors import ConfigError

__all__ = [
    "Addr",
    "Endpoint",
    "IPAddress",
    "destination_refusal",
    "parse_endpoint",
    "parse_hostport",
]

Addr = tuple[str, int]
IPAddress = IPv4Address | IPv6Address

MAX_ADDRESS_CHARS = 64  # "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535" is 53
MAX_NAME_CHARS = 253
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_METADATA = IPv4Address("169.254.169.254")
_THIS_NETWORK = IPv4Network("0.0.0.0/8")
_NAT64 = IPv6Network("64:ff9b::/96")
_V4_COMPATIBLE = IPv6Network("::/96")
_REFUSALS = {
    "loopback": "a loopback address",
    "unspecified": "an unspecified address",
    "metadata": "the cloud metadata address",
    "link_local": "a link-local or site-local address",
    "multicast": "a multicast address",
    "reserved": "a reserved or broadcast address",
    "ipv4_mapped": "an IPv4-mapped address",
    "embedded_ipv4": "an address wrapping IPv4 (NAT64, 6to4, Teredo or IPv4-compatible)",
    "own_address": "an address of this host",
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed ``host:port``: ``host`` is an address in canonical form or a name as written."""

    host: str
    port: int
    ip: IPAddress | None  # None: ``host`` is a DNS name

    @property
    def pair(self) -> Addr:
        """``(host, port)``, as sockets take it."""
        return self.host, self.port

    def __str__(self) -> str:
        """The canonical text: ``192.0.2.1:51820``, ``[2001:db8::1]:51820``, ``name:53``."""
        if self.ip is not None and self.ip.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_endpoint(
    text: object,
    *,
    allow_names: bool,
    from_peer: bool,
    allow_port_zero: bool = False,
    what: str = "endpoint",
    error: Callable[[str], Exception] = ConfigError,
) -> Endpoint:
    """Parse ``text`` as ``IPv4:PORT``, ``[IPv6]:PORT`` or (``allow_names``) ``NAME:PORT``.

    ``from_peer``: the endpoint comes from a peer or an agent, and any address
    :func:`destination_refusal` refuses is refused (names are never allowed then).
    ``allow_port_zero`` admits port 0 (an ephemeral port of a listen address).
    Anything else raises ``error(message)``, one line naming ``what`` and the value.
    """
    if allow_names and from_peer:
        raise TypeError("an endpoint from a peer is an address, never a name")
    form = "HOST:PORT or [IPv6]:PORT" if allow_names else "IP:PORT or [IPv6]:PORT"
    limit = MAX_NAME_CHARS + 7 if allow_names else MAX_ADDRESS_CHARS
    if not isinstance(text, str) or not text.isascii() or len(text) > limit:
        raise error(f"{what} {_shown(text)} is not {form}")
    ip: IPAddress | None
    if text.startswith("["):
        host, close, port_text = text[1:].partition("]:")
        if not close or "%" in host:
            why = "carries an IPv6 zone index" if "%" in host else f"is not {form}"
            raise error(f"{what} {text!r} {why}")
        ip = _ipv6(host)
        if ip is None:
            raise error(f"{what} {text!r}: {host!r} in brackets is not an IPv6 address")
        host = str(ip)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise error(f"{what} {text!r} is not {form} (an IPv6 address goes in brackets)")
        ip = _ipv4(host)
        if ip is None and not (allow_names and _is_name(host)):
            raise error(f"{what} {text!r}: {host!r} is not {_host_kind(allow_names)}")
    port = _port(port_text)
    if port is None or (port == 0 and not allow_port_zero):
        low = 0 if allow_port_zero else 1
        raise error(f"{what} {text!r}: port {port_text!r} is not {low}..65535")
    if from_peer and ip is not None:
        refusal = destination_refusal(ip)
        if refusal is not None:
            raise error(f"{what} {text!r} is {_REFUSALS[refusal]}, never a peer's endpoint")
    return Endpoint(host, port, ip)


def parse_hostport(text: str, *, allow_port_zero: bool = False, what: str = "address") -> Addr:
    """``"127.0.0.1:3478"``, ``"[::1]:3478"`` or ``"name:3478"`` to ``(host, port)``.

    For flags and settings (listen addresses, STUN servers): :class:`ConfigError`
    if ``text`` is not ``HOST:PORT``.
    """
    endpoint = parse_endpoint(
        text, allow_names=True, from_peer=False, allow_port_zero=allow_port_zero, what=what
    )
    return endpoint.pair


def _shown(text: object) -> str:
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _host_kind(allow_names: bool) -> str:
    return "an IPv4 address or a DNS name" if allow_names else "an IPv4 address"


def _ipv4(text: str) -> IPv4Address | None:
    try:  # inet_pton takes exactly the dotted quad (no leading zeros, no short forms)
        return IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):
        return None


def _ipv6(text: str) -> IPv6Address | None:
    try:
        return IPv6Address(text)
    except ValueError:
        return None


def _is_name(text: str) -> bool:
    """A DNS name: labels of letters, digits, ``-``, ``_``; the last not all digits
    (``1.2.3.999`` is a bad address, not a name)."""
    labels = text.removesuffix(".").split(".")
    return (
        len(text) <= MAX_NAME_CHARS
        and all(_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _port(text: str) -> int | None:
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or text != str(int(text)):
        return None
    port = int(text)
    return port if port <= 65535 else None


# --- where nothing is ever sent ---------------------------------------------------------


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
    if ip.ipv4_mapped is not None:  # ::ffff:0:0/96: callers normalize these to IPv4 first
        return "ipv4_mapped"
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
    """Why nothing may ever be sent to ``ip`` on a peer's word (a short label), or None.

    Refused: loopback, unspecified (``0.0.0.0/8``, ``::``), link-local and
    site-local (``fec0::/10``), the metadata address, multicast, broadcast and
    reserved ranges, ``own`` addresses, every IPv4-mapped address (``::ffff:0:0/96``:
    normalize those to IPv4 first) and every address wrapping IPv4 (NAT64
    ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo ``2001::/32``, IPv4-compatible).
    ``allow_loopback`` is for loopback-only tests: it admits 127/8 and ``::1``
    but nothing else.
    """
    if ip in own:
        return "own_address"
    if isinstance(ip, IPv4Address):
        return _v4_refusal(ip, allow_loopback)
    return _v6_refusal(ip, allow_loopback)
