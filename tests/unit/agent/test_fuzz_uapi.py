"""UAPI codec properties (tests/unit/agent/test_uapi.py has captured replies and byte fuzzing).

A generated device is rendered the way wireguard-go answers ``get=1``
(lab/uapi_text.py, shared with the atheris harness) and parses back to
itself; replies with a line removed, duplicated, given an arbitrary value or
an arbitrary errno are refused with a :class:`UapiError` only; ``build_set``
always writes one well-formed request.
"""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.public import PrivateKey

from agent.dataplane.backend import DeviceUpdate, IPNetwork, LiveDevice, LivePeer, PeerUpdate
from agent.dataplane.uapi import MalformedUapi, UapiError, UapiRefused, build_set, parse_get
from lab.uapi_text import render_get
from wiregate.keys import decode_key, encode_key

raw_keys = st.binary(min_size=32, max_size=32)
public_keys = raw_keys.map(lambda seed: encode_key(bytes(PrivateKey(seed).public_key)))
networks: st.SearchStrategy[IPNetwork] = st.one_of(
    st.ip_addresses(v=4).flatmap(
        lambda a: st.integers(0, 32).map(lambda n: ipaddress.ip_network(f"{a}/{n}", strict=False))
    ),
    st.ip_addresses(v=6).flatmap(
        lambda a: st.integers(0, 128).map(lambda n: ipaddress.ip_network(f"{a}/{n}", strict=False))
    ),
)
endpoints = st.one_of(
    st.builds(lambda a, p: f"{a}:{p}", st.ip_addresses(v=4), st.integers(1, 65535)),
    st.builds(lambda a, p: f"[{a}]:{p}", st.ip_addresses(v=6), st.integers(1, 65535)),
)
u64 = st.integers(0, 2**64 - 1)
live_peers = st.builds(
    LivePeer,
    public_key=public_keys,
    allowed_ips=st.frozensets(networks, max_size=4),
    endpoint=st.none() | endpoints,
    keepalive=st.integers(0, 65535),
    last_handshake=st.none() | st.integers(1, 2**40).map(float),
    rx=u64,
    tx=u64,
)


devices = st.tuples(
    st.none() | raw_keys,
    st.integers(0, 65535),
    st.integers(0, 2**32 - 1),
    st.lists(live_peers, max_size=4, unique_by=lambda p: p.public_key),
)


@given(devices)
def test_rendered_devices_parse_back(device: tuple) -> None:  # type: ignore[type-arg]
    private, port, fwmark, peers = device
    parsed = parse_get(render_get(private, port, fwmark, peers))
    expected_public = (
        None
        if private is None or private == bytes(32)
        else encode_key(bytes(PrivateKey(private).public_key))
    )
    assert parsed == LiveDevice(
        public_key=expected_public,
        listen_port=port,
        fwmark=fwmark,
        peers={p.public_key: p for p in peers},
    )


def only_uapi_errors(reply: bytes) -> None:
    with contextlib.suppress(UapiError):
        parse_get(reply)


line_edit = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 100), st.just("")),
    st.tuples(st.just("dup"), st.integers(0, 100), st.just("")),
    st.tuples(st.just("value"), st.integers(0, 100), st.text(max_size=30)),
    st.tuples(
        st.just("value"),
        st.integers(0, 100),
        st.integers(-(2**80), 2**80).map(str) | st.sampled_from(["9" * 5000, "1_0", " 1", "ff"]),
    ),
    st.tuples(st.just("insert"), st.integers(0, 100), st.text(max_size=30)),
)


@given(devices, st.lists(line_edit, min_size=1, max_size=4))
def test_edited_replies_raise_only_uapi_errors(device: tuple, edits: list) -> None:  # type: ignore[type-arg]
    lines = render_get(*device)[:-2].decode().split("\n")  # the last is errno=0
    for op, where, text in edits:
        i = where % len(lines)
        if op == "drop" and len(lines) > 1:
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "value":
            lines[i] = lines[i].partition("=")[0] + "=" + text
        elif op == "insert":
            lines.insert(i, text)
    only_uapi_errors("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n\n")


@given(st.integers(-(2**200), 2**200))
def test_any_errno_is_a_refusal_or_malformed(errno: int) -> None:
    try:
        parse_get(f"errno={errno}\n\n".encode())
    except UapiRefused as exc:
        assert exc.errno == errno != 0
    except MalformedUapi:
        assert errno != 0
    else:
        assert errno == 0


peer_updates = st.builds(
    PeerUpdate,
    public_key=public_keys,
    remove=st.booleans(),
    update_only=st.booleans(),
    allowed_ips=st.none() | st.frozensets(networks, max_size=4),
    endpoint=st.none() | endpoints,
    keepalive=st.none() | st.integers(0, 65535),
)
updates = st.builds(
    DeviceUpdate,
    private_key=st.none() | raw_keys,
    listen_port=st.none() | st.integers(0, 65535),
    fwmark=st.none() | st.integers(0, 2**32 - 1),
    peers=st.lists(peer_updates, max_size=5, unique_by=lambda p: p.public_key).map(tuple),
)


@given(updates)
def test_build_set_writes_one_request_that_reads_back(update: DeviceUpdate) -> None:
    request = build_set(update).decode("ascii")
    assert request.startswith("set=1\n") and request.endswith("\n\n")
    lines = request[len("set=1\n") : -2].split("\n") if request != "set=1\n\n" else []
    assert all("=" in line for line in lines)
    keys = [line.partition("=")[2] for line in lines if line.startswith("public_key=")]
    assert keys == [decode_key(p.public_key).hex() for p in update.peers]
    allowed = [line.partition("=")[2] for line in lines if line.startswith("allowed_ip=")]
    wanted = [n for p in update.peers if not p.remove and p.allowed_ips for n in p.allowed_ips]
    assert sorted(allowed) == sorted(str(n) for n in wanted)


# --- regressions found by fuzzing ----------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        # errno too large for os.strerror: OverflowError instead of a refusal (hypothesis)
        b"errno=2147483648\n\n",
        b"errno=-2147483648\n\n",
        # a handshake time too large for a float: OverflowError
        b"public_key="
        + b"11" * 32
        + b"\nlast_handshake_time_nsec="
        + b"9" * 400
        + b"\nerrno=0\n\n",
    ],
)
def test_regression_overflowing_numbers_are_malformed(reply: bytes) -> None:
    with pytest.raises(MalformedUapi):
        parse_get(reply)
