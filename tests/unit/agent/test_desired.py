"""Map validation and the desired configuration (agent.dataplane.desired)."""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dataplane.backend import network
from agent.dataplane.desired import (
    DesiredBuilder,
    LocalSettings,
    _check_peer,
    build_desired,
    check_endpoint,
    outside_pool,
    pool_prefixes,
)
from wiregate.intervals import OverlapIndex
from wiregate.keys import encode_key, generate_private_key, public_from_private
from wiregate.model import NetMap, Peer, SelfView

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


def netmap(*peers: Peer, pool: tuple[str, ...] = ()) -> NetMap:
    me = SelfView(
        id="me",
        name="me",
        public_key=encode_key(public_from_private(PRIVATE)),
        addresses=("100.64.0.1/32", "fd7a:7767:6174::1/128"),
        pool=pool,
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
    allowed = replace(SETTINGS, allow_default_route=True)
    assert len(build_desired(netmap(p), allowed).device.peers) == 1


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


# --- the tunnel address pool: one route per family ---------------------------

TUNNEL_POOL = ("100.64.0.0/16", "fd7a:7767:6174::/64")


def nets(*texts: str) -> frozenset[object]:
    return frozenset(ipaddress.ip_network(t) for t in texts)


def test_the_pool_is_routed_as_one_prefix_per_family() -> None:
    """Host routes inside the pool are not written; routes outside it (pod CIDRs,
    Service CIDRs, advertised subnets) are, and WireGuard keeps every allowed IP."""
    pods = peer(2, allowed_ips=(*peer(2).addresses, "10.42.1.0/24", "fd00:42::/64"))
    config = build_desired(netmap(pods, peer(3), peer(4), pool=TUNNEL_POOL), SETTINGS)
    assert config.problems == ()
    assert config.link.routes == nets(*TUNNEL_POOL, "10.42.1.0/24", "fd00:42::/64")
    assert config.device.peers[pods.public_key].allowed_ips == nets(*pods.allowed_ips)


def test_without_a_pool_every_allowed_ip_is_routed() -> None:
    config = build_desired(netmap(peer(2), peer(3)), SETTINGS)
    assert config.link.routes == nets(*peer(2).addresses, *peer(3).addresses)


def test_an_exit_nodes_default_route_keeps_its_own_route() -> None:
    """The only prefix that can hold the pool (anything else overlaps this device)."""
    exit_node = peer(2, allowed_ips=("100.64.0.2/32", "0.0.0.0/0", "::/0"))
    exits = replace(SETTINGS, allow_default_route=True)
    config = build_desired(netmap(exit_node, pool=TUNNEL_POOL), exits)
    assert config.link.routes == nets(*TUNNEL_POOL, "0.0.0.0/0", "::/0")


@pytest.mark.parametrize(
    ("pool", "why"),
    [
        (("100.64.0.0/16", "fd7a::/zz"), "is not a CIDR"),
        (("100.64.0.1/16", "fd7a:7767:6174::/64"), "is not a CIDR"),  # host bits
        (("0.0.0.0/0", "fd7a:7767:6174::/64"), "is a default route"),
        (("100.64.0.0/16", "::/0"), "is a default route"),
        (("10.0.0.0/8", "fd7a:7767:6174::/64"), "does not hold this device's address"),
    ],
)
def test_a_bad_pool_prefix_is_ignored_and_its_family_routed_per_peer(
    pool: tuple[str, str], why: str
) -> None:
    config = build_desired(netmap(peer(2), pool=pool), SETTINGS)
    assert len(config.problems) == 1 and why in config.problems[0]
    assert len(config.device.peers) == 1
    good, _ = pool_prefixes(pool, config.link.addresses)
    assert len(good) == 1
    assert config.link.routes == good | outside_pool(nets(*peer(2).allowed_ips), good)


def test_the_pool_arriving_and_leaving_rebuilds_the_routes() -> None:
    builder = DesiredBuilder(SETTINGS)
    peers = [peer(2), peer(3)]
    routed = builder.build(netmap(*peers)).link.routes
    assert builder.build(netmap(*peers, pool=TUNNEL_POOL)).link.routes == nets(*TUNNEL_POOL)
    assert builder.build(netmap(*peers)).link.routes == routed


def test_outside_pool() -> None:
    pool = nets("100.64.0.0/16", "fd7a::/64")
    allowed = nets("100.64.3.4/32", "100.64.0.0/16", "100.0.0.0/8", "100.65.0.0/24",
                   "fd7a::5/128", "fd7a:0:0:1::/64", "10.0.0.0/8")  # fmt: skip
    assert outside_pool(allowed, pool) == nets(
        "100.0.0.0/8", "100.65.0.0/24", "fd7a:0:0:1::/64", "10.0.0.0/8"
    )
    assert outside_pool(allowed, frozenset()) is allowed


# --- incremental building ----------------------------------------------------

POOL = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.2.0.0/16",
    "100.64.0.0/24",  # holds this device's own address
    "100.64.1.7/32",
    "0.0.0.0/0",
    "10.0.0.1/8",  # host bits: refused
    "fd7a:7767:6174::/48",
    "fd7a:7767:6174:1::/64",
    "fd00::/8",
    "2001:db8::/32",
]
FIXED_KEYS = [key() for _ in range(6)]
POOLS = [
    (),  # an older gateway: a route per allowed IP
    ("100.64.0.0/16", "fd7a:7767:6174::/64"),
    ("100.64.0.0/10",),
    ("100.64.8.0/21", "fd7a:7767:6174::/48"),  # the v4 one does not hold this device
]


def _naive(nm: NetMap, settings: LocalSettings) -> tuple[set[str], frozenset[object]]:
    """The rules spelled out pairwise with ipaddress: accepted keys and routes (the pool's
    prefixes, and the allowed IPs no pool prefix holds)."""
    candidates = {}
    for device_id, p in nm.peers.items():
        try:
            candidates[device_id] = _check_peer(p, settings.allow_default_route, OWN)
        except ValueError:
            continue
    keys = [c.public_key for c in candidates.values()]
    unique = {i: c for i, c in candidates.items() if keys.count(c.public_key) == 1}
    own = [ipaddress.ip_network("100.64.0.1/32"), ipaddress.ip_network("fd7a:7767:6174::1/128")]

    def clashes(i: str) -> bool:
        mine = [n for n in unique[i].allowed_ips if n.prefixlen]
        others = [n for j, c in unique.items() if j != i for n in c.allowed_ips if n.prefixlen]
        return any(a.version == b.version and a.overlaps(b) for a in mine for b in others + own)

    accepted = [c for i, c in unique.items() if not clashes(i)]
    pool: list[Any] = [ipaddress.ip_network(p) for p in nm.self_view.pool]
    pooled = [p for p in pool if p.prefixlen and any(p.version == o.version and o.subnet_of(p)
                                                     for o in own)]  # fmt: skip

    def routed(n: Any) -> bool:
        return not any(n.version == p.version and n.subnet_of(p) for p in pooled)

    routes = frozenset(pooled) | {n for c in accepted for n in c.allowed_ips if routed(n)}
    return {c.public_key for c in accepted}, routes


OWN = encode_key(public_from_private(PRIVATE))
peer_spec = st.tuples(
    st.integers(0, 7),  # device id
    st.integers(0, 5),  # key (collisions on purpose)
    st.sets(st.sampled_from(POOL), max_size=3),
)
map_specs = st.lists(
    st.tuples(
        st.lists(peer_spec, max_size=7, unique_by=lambda t: t[0]),
        st.sampled_from(POOLS),
    ),
    min_size=1,
    max_size=5,
)


def _map(spec: list[tuple[int, int, set[str]]], pool: tuple[str, ...] = ()) -> NetMap:
    peers = []
    for device_id, key_index, extra in spec:
        host = f"100.64.{9 + device_id}.1/32"
        peers.append(
            peer(
                device_id,
                id=f"d{device_id}",
                public_key=FIXED_KEYS[key_index],
                allowed_ips=(host, *sorted(extra)),
                endpoints=(),
            )
        )
    return netmap(*peers, pool=pool)


@settings(max_examples=300, deadline=None)
@given(map_specs, st.booleans())
def test_incremental_builds_match_fresh_and_naive(specs: list[Any], exits: bool) -> None:
    local = replace(SETTINGS, allow_default_route=exits)
    builder = DesiredBuilder(local)
    for spec, pool in specs:
        nm = _map(spec, pool)
        got, fresh = builder.build(nm), build_desired(nm, local)
        assert got.device.peers == fresh.device.peers
        assert got.link == fresh.link
        assert sorted(got.problems) == sorted(fresh.problems)
        accepted, routes = _naive(nm, local)
        assert set(got.device.peers) == accepted and got.link.routes == routes
        refused = len(nm.peers) - len(got.device.peers)
        assert refused == 0 or got.problems


def test_unchanged_map_returns_the_previous_config() -> None:
    builder = DesiredBuilder(SETTINGS)
    p2, p3 = peer(2), peer(3)
    first = builder.build(netmap(p2, p3))
    assert builder.build(netmap(replace(p2), p3)) is first  # equal, not identical


def test_fixing_a_duplicate_restores_the_other_peer() -> None:
    builder = DesiredBuilder(SETTINGS)
    a = peer(2)
    b = peer(3, public_key=a.public_key)
    assert builder.build(netmap(a, b)).device.peers == {}
    fixed = builder.build(netmap(a, peer(3)))
    assert a.public_key in fixed.device.peers and len(fixed.device.peers) == 2
    assert fixed.problems == ()


# --- the overlap index and the CIDR parser -----------------------------------

SPANS = [(4, 0x0A000000, 8), (4, 0x0A010000, 16), (4, 0x0A010200, 24), (4, 0x0B000000, 8),
         (4, 0x0A010203, 32), (6, 0xFD << 120, 8), (6, 0xFD7A << 112, 16)]  # fmt: skip


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    if a[0] != b[0]:
        return False
    bits = 32 if a[0] == 4 else 128
    shift = bits - min(a[2], b[2])
    return a[1] >> shift == b[1] >> shift


owner_spans = st.tuples(st.integers(0, 5), st.sets(st.sampled_from(SPANS), max_size=3))


@settings(max_examples=200)
@given(st.lists(st.lists(owner_spans, min_size=1, max_size=6)))
def test_overlap_index_matches_pairwise(batches: list[list[tuple[int, set[Any]]]]) -> None:
    """Single changes go through assign/remove, larger batches through the bulk load."""
    index, owned = OverlapIndex(), {}
    for batch in batches:
        if len(batch) == 1:
            owner, spans = batch[0]
            if spans:
                index.assign(str(owner), spans)
                owned[str(owner)] = spans
            else:
                index.remove(str(owner))
                owned.pop(str(owner), None)
        else:
            index.assign_many({str(o): s for o, s in batch})
            owned.update({str(o): s for o, s in batch})
        expected = {
            o: {p for p, theirs in owned.items() if p != o and any(
                _overlap(a, b) for a in mine for b in theirs)}
            for o, mine in owned.items()
        }  # fmt: skip
        assert index.clashes == {o: s for o, s in expected.items() if s}


cidr_text = st.one_of(
    st.text(alphabet="0123456789abcdefABCDEF.:/%_ ", max_size=24),
    st.builds(
        lambda a, n, sep: f"{ipaddress.ip_address(a)}{sep}{n}",
        st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32, 2**128 - 1)),
        st.integers(-1, 130),
        st.sampled_from(["/", "/0", ""]),
    ),
)


@given(cidr_text)
def test_network_parses_like_ipaddress(text: str) -> None:
    try:
        expected = ipaddress.ip_network(text, strict=True)
    except ValueError:
        with pytest.raises(ValueError):
            network(text)
    else:
        assert network(text) == expected and network(text) is network(str(expected))
