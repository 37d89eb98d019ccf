"""The one ``host:port`` grammar and the one refusal rule (wiregate/net.py).

Every caller's parser is a named use of :func:`parse_endpoint`; every endpoint a
peer or an agent names (enrollment, the stream's ``endpoints``) is refused exactly
when :func:`destination_refusal`, the relay's rule, refuses its address.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.api.enroll import parse_endpoint as enroll_endpoint
from relay import filters
from wiregate.errors import BadInput, ConfigError
from wiregate.mapwire import parse_endpoint as stream_endpoint
from wiregate.net import Endpoint, destination_refusal, parse_endpoint, parse_hostport
from wiregate.settings import parse_relay_entry


def teredo(client: str) -> str:
    """A Teredo address (server 192.0.2.1, port 51820) carrying ``client``."""
    value = (
        (0x20010000 << 96)
        | (0xC0000201 << 64)
        | (0x8000 << 48)
        | ((0xFFFF ^ 51820) << 32)
        | (~int(IPv4Address(client)) & 0xFFFFFFFF)
    )
    return str(IPv6Address(value))


# --- the grammar --------------------------------------------------------------------------

ACCEPTED = [
    # text, allow_names, (host, port), canonical text
    ("192.0.2.1:51820", False, ("192.0.2.1", 51820), "192.0.2.1:51820"),
    ("[2001:DB8::1]:7", False, ("2001:db8::1", 7), "[2001:db8::1]:7"),
    ("[2001:db8:0:0:0:0:0:1]:65535", False, ("2001:db8::1", 65535), "[2001:db8::1]:65535"),
    ("10.0.0.1:1", False, ("10.0.0.1", 1), "10.0.0.1:1"),
    ("relay:3480", True, ("relay", 3480), "relay:3480"),
    ("stun.example.com:3478", True, ("stun.example.com", 3478), "stun.example.com:3478"),
    ("wiregate_relay-1:1", True, ("wiregate_relay-1", 1), "wiregate_relay-1:1"),
    ("127.0.0.1:3478", True, ("127.0.0.1", 3478), "127.0.0.1:3478"),
    ("[::1]:3479", True, ("::1", 3479), "[::1]:3479"),
]


@pytest.mark.parametrize(("text", "names", "pair", "canonical"), ACCEPTED)
def test_accepted_forms(text: str, names: bool, pair: tuple[str, int], canonical: str) -> None:
    found = parse_endpoint(text, allow_names=names, from_peer=False)
    assert (found.pair, str(found)) == (pair, canonical)
    assert parse_endpoint(canonical, allow_names=names, from_peer=False) == found


MALFORMED = [
    # text, allow_names, what the message says
    ("", True, "is not HOST:PORT"),
    ("3478", True, "is not HOST:PORT"),
    (":3478", True, "is not HOST:PORT"),  # no empty host (not "every address")
    ("host:", True, "port ''"),
    ("host:http", True, "port 'http'"),
    ("host:70000", True, "port '70000'"),
    ("host:65536", True, "port '65536'"),
    ("host:0", True, "port '0' is not 1..65535"),
    ("host:080", True, "port '080'"),
    ("host:+80", True, "port '+80'"),
    ("host: 80", True, "port ' 80'"),
    ("host:8_0", True, "port '8_0'"),
    ("host:\u0663", True, "is not HOST:PORT"),  # a non-ASCII digit
    ("192.0.2.1", False, "is not IP:PORT"),
    ("host:1", False, "'host' is not an IPv4 address"),
    ("192.0.2.01:1", False, "is not an IPv4 address"),
    ("192.0.2:1", False, "is not an IPv4 address"),
    ("256.0.0.1:1", True, "is not an IPv4 address or a DNS name"),
    ("1.2.3.4.5:1", True, "is not an IPv4 address or a DNS name"),
    (" 192.0.2.1:1", True, "is not an IPv4 address or a DNS name"),
    ("-bad.example:1", True, "is not an IPv4 address or a DNS name"),
    ("a..b:1", True, "is not an IPv4 address or a DNS name"),
    ("2001:db8::1:51820", True, "goes in brackets"),
    ("::1:3478", True, "goes in brackets"),
    ("[192.0.2.1]:1", False, "in brackets is not an IPv6 address"),
    ("[]:1", True, "in brackets is not an IPv6 address"),
    ("[::1]", False, "is not IP:PORT"),
    ("[::1]x:1", False, "is not IP:PORT"),
    ("[fe80::1%eth0]:51820", False, "zone index"),
    ("[::1]:0", False, "port '0'"),
    ("x" * 300 + ":1", True, "is not HOST:PORT"),
    ("[2001:db8::1]:51820" + " " * 50, False, "is not IP:PORT"),
]


@pytest.mark.parametrize(("text", "names", "why"), MALFORMED)
def test_malformed_forms(text: str, names: bool, why: str) -> None:
    with pytest.raises(ConfigError, match=f"^endpoint .*{why_pattern(why)}") as caught:
        parse_endpoint(text, allow_names=names, from_peer=False)
    assert "\n" not in caught.value.message


def why_pattern(why: str) -> str:
    """``why`` as a literal regular expression."""
    return re.escape(why)


@pytest.mark.parametrize("text", [5, None, b"192.0.2.1:1", ["192.0.2.1:1"]])
def test_not_text(text: object) -> None:
    with pytest.raises(ConfigError, match="is not IP:PORT"):
        parse_endpoint(text, allow_names=False, from_peer=False)


def test_port_zero_only_where_asked() -> None:
    assert parse_hostport("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)
    with pytest.raises(ConfigError, match=r"port '0' is not 1\.\.65535"):
        parse_hostport("127.0.0.1:0")
    with pytest.raises(ConfigError, match=r"port '70000' is not 0\.\.65535"):
        parse_hostport("127.0.0.1:70000", allow_port_zero=True)


def test_the_error_type_and_the_name_are_the_callers() -> None:
    with pytest.raises(ValueError, match=r"^relay r1 'x:0'"):
        parse_endpoint("x:0", allow_names=True, from_peer=False, what="relay r1", error=ValueError)
    with pytest.raises(BadInput, match=r"^endpoint"):
        parse_endpoint("x:1", allow_names=False, from_peer=True, error=BadInput)


def test_names_are_never_a_peers_endpoint() -> None:
    with pytest.raises(TypeError):
        parse_endpoint("relay:1", allow_names=True, from_peer=True)


def test_endpoint_value() -> None:
    found = parse_endpoint("[2001:db8::1]:1", allow_names=False, from_peer=True)
    assert found == Endpoint("2001:db8::1", 1, IPv6Address("2001:db8::1"))
    assert parse_endpoint("name:2", allow_names=True, from_peer=False).ip is None


# --- the refusal rule ---------------------------------------------------------------------

REFUSED = [
    # address, the relay's label
    ("127.0.0.1", "loopback"),
    ("127.5.5.5", "loopback"),
    ("::1", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),  # 0.0.0.0/8
    ("::", "unspecified"),
    ("169.254.169.254", "metadata"),
    ("169.254.1.1", "link_local"),
    ("fe80::1", "link_local"),
    ("fec0::1", "link_local"),  # site-local, fec0::/10
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("255.255.255.255", "reserved"),
    ("240.0.0.1", "reserved"),
    ("::ffff:127.0.0.1", "ipv4_mapped"),
    ("::ffff:192.0.2.1", "ipv4_mapped"),  # mapped forms are refused, never unwrapped
    ("::127.0.0.1", "loopback"),  # IPv4-compatible
    ("::192.0.2.1", "embedded_ipv4"),
    ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "metadata"),
    ("64:ff9b::808:808", "embedded_ipv4"),  # NAT64 of 8.8.8.8
    ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
    ("2002:a9fe:a9fe::1", "metadata"),
    ("2002:e000:1::1", "multicast"),
    ("2002:808:808::1", "embedded_ipv4"),
    (teredo("127.0.0.1"), "loopback"),
    (teredo("169.254.169.254"), "metadata"),
    (teredo("0.1.2.3"), "unspecified"),
    (teredo("8.8.8.8"), "embedded_ipv4"),
]

ALLOWED = ["192.0.2.1", "198.51.100.7", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1",
           "8.8.8.8", "2001:db8::1", "2606:4700::1111", "fd7a:7767:6174::1"]  # fmt: skip


def endpoint_text(address: str) -> str:
    """``address`` with port 51820, IPv6 bracketed."""
    return f"[{address}]:51820" if ":" in address else f"{address}:51820"


@pytest.mark.parametrize(("address", "label"), REFUSED)
def test_refused_addresses(address: str, label: str) -> None:
    assert destination_refusal(ip_address(address)) == label
    text = endpoint_text(address)
    for parse in (enroll_endpoint, stream_endpoint):
        with pytest.raises(BadInput, match=f"^endpoint '{why_pattern(text)}' is .*never a peer"):
            parse(text)
    with pytest.raises(ConfigError, match="never a peer's endpoint"):
        parse_endpoint(text, allow_names=False, from_peer=True)
    assert parse_endpoint(text, allow_names=False, from_peer=False).port == 51820


@pytest.mark.parametrize("address", ALLOWED)
def test_allowed_addresses(address: str) -> None:
    assert destination_refusal(ip_address(address)) is None
    text = endpoint_text(address)
    canonical = str(parse_endpoint(text, allow_names=False, from_peer=True))
    assert enroll_endpoint(text) == stream_endpoint(text) == canonical


def test_loopback_for_tests_admits_loopback_only() -> None:
    assert destination_refusal(ip_address("127.0.0.1"), allow_loopback=True) is None
    assert destination_refusal(ip_address("::1"), allow_loopback=True) is None
    for other in ("169.254.169.254", "::ffff:127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::1"):
        assert destination_refusal(ip_address(other), allow_loopback=True) is not None


def test_own_addresses() -> None:
    own = ip_address("192.0.2.1")
    assert destination_refusal(own, {own}) == "own_address"
    assert destination_refusal(ip_address("192.0.2.2"), {own}) is None


def test_the_relay_uses_this_rule() -> None:
    assert filters.destination_refusal is destination_refusal


ipv4 = st.integers(0, 2**32 - 1).map(IPv4Address)
ipv6 = st.one_of(
    st.integers(0, 2**128 - 1),
    st.integers(0, 2**96 - 1).map(lambda low: (0x20010000 << 96) | low),  # Teredo
    st.integers(0, 2**112 - 1).map(lambda low: (0x2002 << 112) | low),  # 6to4
    st.integers(0, 2**32 - 1).map(lambda low: (0x64FF9B << 96) | low),  # NAT64
    st.integers(0, 2**32 - 1).map(lambda low: (0xFFFF << 32) | low),  # IPv4-mapped
    st.integers(0, 2**32 - 1),  # IPv4-compatible
).map(IPv6Address)


@given(st.one_of(ipv4, ipv6), st.integers(1, 65535))
def test_peer_endpoints_are_refused_exactly_when_the_relay_refuses(
    address: IPv4Address | IPv6Address, port: int
) -> None:
    text = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
    refused = destination_refusal(address) is not None
    for parse in (enroll_endpoint, stream_endpoint):
        try:
            parse(text)
        except BadInput:
            assert refused
        else:
            assert not refused


# --- the callers --------------------------------------------------------------------------


def test_relay_entries() -> None:
    assert parse_relay_entry("r1=[2001:DB8::1]:3480") == ("r1", "2001:db8::1", 3480)
    assert parse_relay_entry("r1=relay:3480") == ("r1", "relay", 3480)
    for bad in ("r1=:3480", "r1=relay:0", "r1=2001:db8::1:3480", "r1=[fe80::1%eth0]:1"):
        with pytest.raises(ValueError, match=f"^relay r1 '{why_pattern(bad[3:])}'"):
            parse_relay_entry(bad)


def test_parse_hostport_is_the_settings_form() -> None:
    assert parse_hostport("[::1]:3478") == ("::1", 3478)
    with pytest.raises(ConfigError, match=r"^STUN server 'stun:x'"):
        parse_hostport("stun:x", what="STUN server")
