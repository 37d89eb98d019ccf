"""Map validation and the desired configuration (gateway.agent.desired)."""

from __future__ import annotations

import base64
import ipaddress

import pytest

from gateway.agent.desired import LocalSettings, build_desired, check_endpoint
from gateway.model import NetMap, Peer, SelfView
from gateway.wgkey import encode_key, generate_private_key, public_from_private

PRIVATE = generate_private_key()
SETTINGS = LocalSettings(
    private_key=PRIVATE, listen_port=51820, fwmark=0xCA6C, table=51820, rule_priority=5210, mtu=0
)


def key() -> str:
    return encode_key(public_from_private(generate_private_key()))


def peer(n: int, **kw: object) -> Peer:
    ips = (f"100.64.0.{n}/32", f"fd7a:7767:6174::{n:x}/128")
    base: dict[str, object] = {
        "id": f"d{n}",
        "name": f"p{n}",
        "public_key": key(),
        "addresses": ips,
        "allowed_ips": ips,
        "endpoints": (f"192.0.2.{n}:51820",),
    }
    base.update(kw)
    return Peer(**base)  # type: ignore[arg-type]


def netmap(*peers: Peer) -> NetMap:
    me = SelfView(
        id="me",
        name="me",
        public_key=encode_key(public_from_private(PRIVATE)),
        addresses=("100.64.0.1/32", "fd7a:7767:6174::1/128"),
    )
    return NetMap(version=1, self_view=me, peers={p.id: p for p in peers})


def test_valid_map() -> None:
    p2, p3 = peer(2, keepalive=25), peer(3)
    config = build_desired(netmap(p2, p3), SETTINGS)
    assert config.problems == ()
    assert set(config.device.peers) == {p2.public_key, p3.public_key}
    want = config.device.peers[p2.public_key]
    assert want.endpoint == "192.0.2.2:51820" and want.keepalive == 25
    assert ipaddress.ip_network("100.64.0.2/32") in want.allowed_ips
    assert len(config.link.routes) == 4
    assert {str(a) for a in config.link.addresses} == {"100.64.0.1/32", "fd7a:7767:6174::1/128"}
    assert config.link.table == 51820


def test_first_endpoint_is_used() -> None:
    p = peer(2, endpoints=("[2001:db8::2]:4500", "192.0.2.2:51820"))
    assert build_desired(netmap(p), SETTINGS).device.peers[p.public_key].endpoint == (
        "[2001:db8::2]:4500"
    )


@pytest.mark.parametrize(
    "public_key",
    [
        base64.b64encode(bytes(32)).decode(),
        base64.b64encode(bytes([1]) + bytes(31)).decode(),
        "not a key",
        base64.b64encode(bytes(31)).decode(),
    ],
)
def test_bad_keys_drop_only_that_peer(public_key: str) -> None:
    good, bad = peer(2), peer(3, public_key=public_key)
    config = build_desired(netmap(good, bad), SETTINGS)
    assert list(config.device.peers) == [good.public_key]
    assert len(config.problems) == 1 and "d3" in config.problems[0]
    assert ipaddress.ip_network("100.64.0.3/32") not in config.link.routes


def test_own_key_refused() -> None:
    me = peer(2, public_key=encode_key(public_from_private(PRIVATE)))
    assert build_desired(netmap(me), SETTINGS).device.peers == {}


def test_duplicate_keys_drop_both() -> None:
    a = peer(2)
    b = peer(3, public_key=a.public_key)
    config = build_desired(netmap(a, b, peer(4)), SETTINGS)
    assert len(config.device.peers) == 1
    assert "duplicate public key" in config.problems[0]


def test_overlap_between_peers_drops_both() -> None:
    a = peer(2, allowed_ips=("100.64.0.2/32", "10.0.0.0/16"))
    b = peer(3, allowed_ips=("100.64.0.3/32", "10.0.5.0/24"))
    c = peer(4)
    config = build_desired(netmap(a, b, c), SETTINGS)
    assert list(config.device.peers) == [c.public_key]
    assert len(config.problems) == 2 and all("overlap" in p for p in config.problems)


def test_overlap_with_own_address() -> None:
    hijack = peer(2, allowed_ips=("100.64.0.0/24",))
    config = build_desired(netmap(hijack), SETTINGS)
    assert config.device.peers == {}
    assert "this device's addresses" in config.problems[0]


def test_overlap_within_one_peer_is_fine() -> None:
    p = peer(2, allowed_ips=("10.0.0.0/16", "10.0.1.0/24"))
    assert build_desired(netmap(p), SETTINGS).problems == ()


@pytest.mark.parametrize("default", ["0.0.0.0/0", "::/0"])
def test_default_route_needs_the_flag(default: str) -> None:
    p = peer(2, allowed_ips=(default,))
    assert build_desired(netmap(p), SETTINGS).device.peers == {}
    allowed = LocalSettings(**{**_fields(SETTINGS), "allow_default_route": True})
    assert len(build_desired(netmap(p), allowed).device.peers) == 1


def _fields(s: LocalSettings) -> dict[str, object]:
    return {f: getattr(s, f) for f in s.__slots__}  # type: ignore[attr-defined]


def test_host_bits_refused() -> None:
    p = peer(2, allowed_ips=("10.0.0.1/8",))
    assert build_desired(netmap(p), SETTINGS).device.peers == {}


@pytest.mark.parametrize(
    "endpoint",
    [
        "127.0.0.1:51820",
        "0.0.0.0:51820",
        "224.0.0.1:51820",
        "169.254.1.1:51820",
        "169.254.169.254:80",
        "[::1]:51820",
        "[::]:51820",
        "[fe80::1]:51820",
        "[ff02::1]:51820",
        "[::ffff:127.0.0.1]:51820",
        "192.0.2.1:0",
        "192.0.2.1:70000",
        "example.com:51820",
        "192.0.2.1",
        "[fe80::1%eth0]:51820",
    ],
)
def test_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError):
        check_endpoint(endpoint)
    p = peer(2, endpoints=(endpoint,))
    config = build_desired(netmap(p, peer(3)), SETTINGS)
    assert len(config.device.peers) == 1 and len(config.problems) == 1


def test_good_endpoints_canonical() -> None:
    assert check_endpoint("192.0.2.1:51820") == "192.0.2.1:51820"
    assert check_endpoint("[2001:DB8::1]:51820") == "[2001:db8::1]:51820"


def test_private_key_not_in_repr() -> None:
    config = build_desired(netmap(peer(2)), SETTINGS)
    text = repr(config) + repr(SETTINGS)
    assert PRIVATE.hex() not in text and str(PRIVATE) not in text
    assert base64.b64encode(PRIVATE).decode() not in text
