"""The map stream's wire format (wiregate.mapwire): round trips, byte layout, refusals."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wiregate.errors import BadInput
from wiregate.mapwire import (
    NAT_TYPES,
    Delta,
    MalformedMessage,
    MapMessage,
    MapWireError,
    NotJSON,
    Revoked,
    Sync,
    UnknownMessage,
    VersionGap,
    apply_delta,
    build_delta,
    build_endpoints,
    build_full,
    build_message,
    build_peer,
    build_self,
    dumps,
    encode_delta,
    encode_delta_body,
    encode_full,
    encode_peer,
    encode_revoked,
    encode_self,
    encode_sync,
    parse_agent_message,
    parse_map_message,
    pods_field,
    read_full,
    read_map_message,
    read_peer,
    read_self,
    with_filter,
    with_pods,
)
from wiregate.model import Device, Identity, NetMap, Peer, SelfView

texts = st.text(max_size=10)  # any code point: escapes, surrogates, non-ASCII
strs = st.lists(texts, max_size=3).map(tuple)
versions = st.integers(min_value=0, max_value=2**62)
peers = st.builds(
    Peer,
    id=texts,
    name=texts,
    public_key=texts,
    addresses=strs,
    allowed_ips=strs,
    endpoints=strs,
    keepalive=st.none() | st.integers(-(2**40), 2**40),
    tags=strs,
    filter=st.none() | strs,
    nat=st.none() | texts,
)
self_views = st.builds(
    SelfView,
    id=texts,
    name=texts,
    public_key=texts,
    addresses=strs,
    tags=strs,
    expires_at=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    previous_public_key=st.none() | texts,
    refused_routes=strs,
    pool=strs,
)
netmaps = st.builds(
    lambda v, own, ps: NetMap(v, own, {p.id: p for p in ps}),
    versions,
    self_views,
    st.lists(peers, max_size=4),
)
deltas = st.builds(
    Delta,
    base=versions,
    version=versions,
    self_view=st.none() | self_views,
    upsert=st.lists(peers, max_size=3).map(tuple),
    remove=strs,
)
messages: st.SearchStrategy[MapMessage] = st.one_of(
    netmaps, deltas, st.builds(Sync, versions), st.builds(Revoked, texts)
)


def compact(wire: Any) -> str:
    return json.dumps(wire, separators=(",", ":"))


def device(n: int, **kw: Any) -> Device:
    return Device(
        id=f"d{n}",
        name=f"host{n}",
        public_key=f"{n:043d}=",
        identity=Identity("test", f"s{n}"),
        ipv4=f"100.64.0.{n}",
        ipv6=f"fd7a::{n:x}",
        **kw,
    )


# --- round trips ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(messages)
def test_every_message_round_trips_through_its_text(message: MapMessage) -> None:
    text = dumps(build_message(message))
    assert text == compact(build_message(message))
    assert parse_map_message(text) == message
    assert parse_map_message(text.encode()) == message
    assert read_map_message(json.loads(text)) == message


@given(peers, self_views)
def test_unknown_fields_are_ignored(peer: Peer, view: SelfView) -> None:
    assert read_peer({**build_peer(peer), "some_future_field": [1, {"x": None}]}) == peer
    assert read_self({**build_self(view), "x": 1}) == view


def test_optional_fields_are_sent_only_when_they_say_something() -> None:
    peer, view = device(1).to_peer(), device(1).to_self()
    assert list(build_peer(peer)) == [
        "id", "name", "public_key", "addresses", "allowed_ips", "endpoints", "keepalive", "tags",
    ]  # fmt: skip
    assert list(build_self(view)) == ["id", "name", "public_key", "addresses", "tags"]
    assert build_peer(Peer("p", "n", "k", (), (), filter=()))["filter"] == []  # nothing allowed


def test_the_pool_is_sent_when_known_and_read_as_empty_when_absent() -> None:
    view = replace(device(1).to_self(), pool=("100.64.0.0/16", "fd7a:7767:6174::/64"))
    assert build_self(view)["pool"] == ["100.64.0.0/16", "fd7a:7767:6174::/64"]
    assert read_self(build_self(view)) == view
    assert read_self(build_self(device(1).to_self())).pool == ()  # an older gateway


def test_a_stored_map_without_type_is_read() -> None:
    nm = NetMap(3, device(1).to_self(), {"d2": device(2).to_peer()})
    wire = build_full(nm)
    del wire["type"]
    assert read_full(wire) == nm


# --- the gateway's direct encoders: byte for byte the build_* form ------------------


@settings(max_examples=200, deadline=None)
@given(netmaps)
def test_encode_full_is_the_full_message(nm: NetMap) -> None:
    peer_texts = [dumps(build_peer(p)) for p in nm.peers.values()]
    text = encode_full(nm.version, encode_self(nm.self_view), peer_texts)
    assert text == compact(build_full(nm))


@settings(max_examples=200, deadline=None)
@given(deltas)
def test_encode_delta_is_the_delta_message(delta: Delta) -> None:
    own = None if delta.self_view is None else encode_self(delta.self_view)
    body = encode_delta_body([dumps(build_peer(p)) for p in delta.upsert], delta.remove)
    assert encode_delta(delta.base, delta.version, own, body) == compact(build_delta(delta))


@given(peers, strs)
def test_a_filter_is_spliced_into_a_pre_encoded_peer(peer: Peer, rule: tuple[str, ...]) -> None:
    plain, filtered = replace(peer, filter=None), replace(peer, filter=rule)
    assert with_filter(dumps(build_peer(plain)), rule) == compact(build_peer(filtered))


pod_rules = st.dictionaries(texts, strs, max_size=3).map(lambda d: tuple(sorted(d.items())))


@given(peers, st.none() | strs, pod_rules, pod_rules)
def test_pod_rules_are_spliced_into_a_pre_encoded_peer(
    peer: Peer,
    rule: tuple[str, ...] | None,
    pods_from: tuple[tuple[str, tuple[str, ...]], ...],
    pods_to: tuple[tuple[str, tuple[str, ...]], ...],
) -> None:
    plain = dumps(build_peer(replace(peer, filter=rule, pods_from=(), pods_to=())))
    text = with_pods(plain, pods_field("pods_from", pods_from), pods_field("pods_to", pods_to))
    whole = replace(peer, filter=rule, pods_from=pods_from, pods_to=pods_to)
    assert text == compact(build_peer(whole))


def test_encode_peer_writes_a_device_as_its_peer() -> None:
    dev = device(7, endpoints=("192.0.2.7:51820",), routes=("10.7.0.0/16",), keepalive=25)
    assert encode_peer(dev) == compact(build_peer(dev.to_peer()))
    assert encode_peer(device(8, nat="eim")) == compact(build_peer(device(8, nat="eim").to_peer()))


def test_sync_and_revoked_texts() -> None:
    assert encode_sync(5) == '{"type":"sync","version":5}'
    assert encode_revoked("gone") == '{"type":"revoked","reason":"gone"}'


# --- applying deltas -----------------------------------------------------------------


def test_a_delta_applies_on_its_base_only() -> None:
    nm = NetMap(5, device(1).to_self(), {"d2": device(2).to_peer()})
    delta = Delta(5, 9, None, (device(3).to_peer(),), ("d2",))
    after = apply_delta(nm, delta)
    assert after == NetMap(9, nm.self_view, {"d3": device(3).to_peer()})
    with pytest.raises(VersionGap):
        apply_delta(after, delta)
    renamed = Delta(9, 10, replace(device(1).to_self(), name="renamed"))
    assert apply_delta(after, renamed).self_view.name == "renamed"


# --- refusals --------------------------------------------------------------------------

PEER = {"id": "d2", "name": "n", "public_key": "k", "addresses": [], "allowed_ips": []}
SELF = {"id": "d1", "name": "n", "public_key": "k", "addresses": []}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", NotJSON),
        ("{", NotJSON),
        (b"\xff\xfe\x00", NotJSON),
        ("[" * 100_000, NotJSON),
        ("[]", UnknownMessage),
        ('"full"', UnknownMessage),
        ("{}", UnknownMessage),
        ('{"type": "hello"}', UnknownMessage),
        ('{"type": ["full"]}', UnknownMessage),
        ('{"type": "sync"}', MalformedMessage),
        ('{"type": "sync", "version": "5"}', MalformedMessage),
        ('{"type": "sync", "version": true}', MalformedMessage),
        ('{"type": "sync", "version": 1.5}', MalformedMessage),
        ('{"type": "revoked", "reason": 3}', MalformedMessage),
        ('{"type": "full", "version": 1, "self": null, "peers": []}', MalformedMessage),
        (json.dumps({"type": "full", "version": 1, "self": SELF}), MalformedMessage),
        (json.dumps({"type": "full", "version": 1, "self": SELF, "peers": [1]}), MalformedMessage),
        (json.dumps({"type": "full", "version": "x", "self": SELF, "peers": []}), MalformedMessage),
        (json.dumps({"type": "delta", "version": 2}), MalformedMessage),
        (json.dumps({"type": "delta", "base": 1, "version": 2, "self": 3}), MalformedMessage),
        (json.dumps({"type": "delta", "base": 1, "version": 2, "remove": [1]}), MalformedMessage),
        (json.dumps({"type": "delta", "base": 1, "version": 2, "upsert": {}}), MalformedMessage),
    ],
)
def test_map_messages_are_refused_with_named_errors(
    text: str | bytes, error: type[MapWireError]
) -> None:
    with pytest.raises(error):
        parse_map_message(text)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", None),
        ("name", 1),
        ("public_key", ["k"]),
        ("addresses", None),
        ("allowed_ips", "10.0.0.0/8"),
        ("endpoints", [1]),
        ("keepalive", "25"),
        ("keepalive", True),
        ("tags", [None]),
        ("filter", "tcp:22"),
        ("nat", 3),
    ],
)
def test_a_peer_field_of_the_wrong_kind_is_refused(field: str, value: Any) -> None:
    with pytest.raises(MalformedMessage):
        read_peer({**PEER, field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expires_at", "soon"),
        ("expires_at", False),
        ("previous_public_key", 1),
        ("tags", "a"),
        ("pool", "100.64.0.0/16"),
        ("pool", [4]),
    ],
)
def test_a_self_field_of_the_wrong_kind_is_refused(field: str, value: Any) -> None:
    with pytest.raises(MalformedMessage):
        read_self({**SELF, field: value})


def test_the_named_errors_are_bad_input() -> None:
    for error in (NotJSON, UnknownMessage, MalformedMessage):
        assert issubclass(error, MapWireError) and issubclass(error, BadInput)
    assert {NotJSON.code, UnknownMessage.code, MalformedMessage.code, VersionGap.code} == {
        "not_json",
        "unknown_message",
        "malformed_message",
        "version_gap",
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=15,
)


@given(st.sampled_from(["full", "delta", "sync", "revoked", "x"]), json_values, json_values)
def test_any_json_is_read_or_refused_with_a_named_error(kind: str, a: Any, b: Any) -> None:
    doc = {"type": kind, "version": a, "base": 1, "self": b, "peers": [b], "upsert": a}
    for value in (doc, a, b):
        with contextlib.suppress(MapWireError):
            read_map_message(value)


# --- what an agent sends -------------------------------------------------------------


@given(st.none() | st.sampled_from(sorted(NAT_TYPES)))
def test_the_endpoints_message_round_trips(nat: str | None) -> None:
    sent = ["192.0.2.1:51820", "[2001:db8::1]:51820", "192.0.2.1:51820"]
    report = parse_agent_message(dumps(build_endpoints(sent, nat)))
    assert report.endpoints == ["192.0.2.1:51820", "[2001:db8::1]:51820"]
    assert report.nat == nat
    assert ("nat" in build_endpoints(sent, nat)) == (nat is not None)
    assert report.routes is None and "routes" not in build_endpoints(sent, nat)
    routed = parse_agent_message(dumps(build_endpoints(sent, nat, ["10.244.1.0/24"])))
    assert routed.routes == ("10.244.1.0/24",) and routed.agent is None
    said = parse_agent_message(dumps(build_endpoints(sent, nat, None, ("0.1.0", "Debian 12"))))
    assert said.agent == ("0.1.0", "Debian 12")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ("nope", NotJSON),
        (b"\x80", NotJSON),
        ('{"type": "full"}', UnknownMessage),
        ('{"type": "endpoints"}', MalformedMessage),
        ('{"type": "endpoints", "endpoints": [], "nat": "cone"}', MalformedMessage),
        ('{"type": "endpoints", "endpoints": [], "nat": []}', MalformedMessage),
        ('{"type": "endpoints", "endpoints": [], "routes": "10.0.0.0/8"}', MalformedMessage),
        ('{"type": "endpoints", "endpoints": [], "routes": [8]}', MalformedMessage),
        ('{"type": "endpoints", "endpoints": [], "agent": {"version": "1"}}', MalformedMessage),
        (
            '{"type": "endpoints", "endpoints": [], "agent": {"version": "1", "os": "a\\n"}}',
            MalformedMessage,
        ),
        (
            '{"type": "endpoints", "endpoints": [], "agent": {"version": "", "os": "x"}}',
            MalformedMessage,
        ),
        (f'{{"type": "endpoints", "endpoints": [], "routes": ["{"1" * 65}"]}}', MalformedMessage),
    ],
)
def test_agent_messages_are_refused_with_named_errors(
    data: str | bytes, error: type[MapWireError]
) -> None:
    with pytest.raises(error):
        parse_agent_message(data)
