"""The UAPI codec (agent.dataplane.uapi) against replies captured from wireguard-go 0.0.20220316."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.dataplane.backend import DeviceUpdate, PeerUpdate
from agent.dataplane.uapi import (
    MalformedUapi,
    UapiBackend,
    UapiError,
    UapiRefused,
    build_set,
    parse_errno,
    parse_get,
)
from wiregate.keys import encode_key, public_from_private

# `get=1` on a wireguard-go interface in the lab (throw-away key), configured with
# `wg set ... listen-port 51820 fwmark 0xca6c peer P1 endpoint 192.0.2.2:51820
#  allowed-ips 100.64.0.2/32,fd7a:7767:6174::2/128 persistent-keepalive 25
#  peer P2 endpoint [2001:db8::5]:4500 allowed-ips 10.0.0.0/8`
CAPTURED_GET = (
    b"private_key=d841a6b6b54387b97fd726f8f89452c713642dbfca9163e7454ce547e2d5025a\n"
    b"listen_port=51820\nfwmark=51820\n"
    b"public_key=b9a27c7d053514d65e7ca70baa7bc77cfd9874e2e8e2fc1c92a68c404b534450\n"
    b"preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    b"protocol_version=1\nendpoint=192.0.2.2:51820\n"
    b"last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n"
    b"persistent_keepalive_interval=25\n"
    b"allowed_ip=100.64.0.2/32\nallowed_ip=fd7a:7767:6174::2/128\n"
    b"public_key=baf9f014eac0bac7bd44cc030672f0c69746c7d6ffd738f2854f91bc71df2e1d\n"
    b"preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    b"protocol_version=1\nendpoint=[2001:db8::5]:4500\n"
    b"last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n"
    b"persistent_keepalive_interval=0\nallowed_ip=10.0.0.0/8\n"
    b"errno=0\n\n"
)
# replies to `set=1\nlisten_port=abc\n\n` and `set=1\nfwmark=0\n\n`
CAPTURED_SET_EINVAL = b"errno=-22\n\n"
CAPTURED_SET_OK = b"errno=0\n\n"
# an empty interface right after `wireguard-go -f NAME`
CAPTURED_EMPTY = b"listen_port=48823\nerrno=0\n\n"

P1 = encode_key(bytes.fromhex("b9a27c7d053514d65e7ca70baa7bc77cfd9874e2e8e2fc1c92a68c404b534450"))
P2 = encode_key(bytes.fromhex("baf9f014eac0bac7bd44cc030672f0c69746c7d6ffd738f2854f91bc71df2e1d"))


def test_parse_captured_get() -> None:
    dev = parse_get(CAPTURED_GET)
    private = bytes.fromhex("d841a6b6b54387b97fd726f8f89452c713642dbfca9163e7454ce547e2d5025a")
    assert dev.public_key == encode_key(public_from_private(private))
    assert dev.listen_port == 51820 and dev.fwmark == 0xCA6C
    p1, p2 = dev.peers[P1], dev.peers[P2]
    assert p1.endpoint == "192.0.2.2:51820" and p1.keepalive == 25
    assert p1.allowed_ips == {
        ipaddress.ip_network("100.64.0.2/32"),
        ipaddress.ip_network("fd7a:7767:6174::2/128"),
    }
    assert p1.last_handshake is None and p1.rx == 0
    assert p2.endpoint == "[2001:db8::5]:4500" and p2.keepalive == 0


def test_private_key_is_not_kept() -> None:
    assert "d841a6b6" not in repr(parse_get(CAPTURED_GET))


def test_handshake_and_counters() -> None:
    reply = CAPTURED_GET.replace(
        b"last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n"
        b"persistent_keepalive_interval=25",
        b"last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\n"
        b"tx_bytes=92\nrx_bytes=148\npersistent_keepalive_interval=25",
    )
    p1 = parse_get(reply).peers[P1]
    assert p1.last_handshake == 1700000000.5 and p1.tx == 92 and p1.rx == 148


def test_empty_device() -> None:
    dev = parse_get(CAPTURED_EMPTY)
    assert dev.public_key is None and dev.peers == {}


def test_errno() -> None:
    assert parse_errno(CAPTURED_SET_OK) == 0
    assert parse_errno(CAPTURED_SET_EINVAL) == -22
    with pytest.raises(UapiRefused) as info:
        parse_get(CAPTURED_SET_EINVAL)
    assert info.value.errno == -22


@pytest.mark.parametrize(
    "reply",
    [
        b"",
        b"errno=0\n",
        b"listen_port=1\n\n",
        b"garbage\nerrno=0\n\n",
        b"listen_port=x\nerrno=0\n\n",
        b"public_key=abcd\nerrno=0\n\n",
        b"errno=zero\n\n",
        b"private_key=zz\nerrno=0\n\n",
        b"public_key=" + b"00" * 32 + b"\nendpoint=nowhere\nerrno=0\n\n",
        b"public_key=" + b"00" * 32 + b"\nallowed_ip=10.0.0.0/99\nerrno=0\n\n",
        b"\xff\xfe=1\nerrno=0\n\n",
    ],
)
def test_malformed(reply: bytes) -> None:
    with pytest.raises(MalformedUapi):
        parse_get(reply)


@given(st.binary(max_size=300))
def test_fuzz_only_named_errors(data: bytes) -> None:
    with contextlib.suppress(UapiError):
        parse_get(data)


@given(st.lists(st.sampled_from(CAPTURED_GET.split(b"\n")[:-3]), max_size=30))
def test_fuzz_reordered_lines(lines: list[bytes]) -> None:
    with contextlib.suppress(UapiError):
        parse_get(b"\n".join([*lines, b"errno=0"]) + b"\n\n")


def test_build_set_full() -> None:
    update = DeviceUpdate(
        private_key=bytes(range(32)),
        listen_port=51820,
        fwmark=0xCA6C,
        peers=(
            PeerUpdate(P2, remove=True),
            PeerUpdate(
                P1,
                allowed_ips=frozenset({ipaddress.ip_network("100.64.0.2/32")}),
                endpoint="192.0.2.2:51820",
                keepalive=25,
            ),
        ),
    )
    assert build_set(update) == (
        b"set=1\nprivate_key=" + bytes(range(32)).hex().encode() + b"\n"
        b"listen_port=51820\nfwmark=51820\n"
        b"public_key=baf9f014eac0bac7bd44cc030672f0c69746c7d6ffd738f2854f91bc71df2e1d\n"
        b"remove=true\n"
        b"public_key=b9a27c7d053514d65e7ca70baa7bc77cfd9874e2e8e2fc1c92a68c404b534450\n"
        b"endpoint=192.0.2.2:51820\npersistent_keepalive_interval=25\n"
        b"allowed_ip=100.64.0.2/32\n\n"
    )


def test_build_set_update_only_and_replace_only_when_ips_change() -> None:
    nets = frozenset({ipaddress.ip_network("fd7a::/64"), ipaddress.ip_network("10.0.0.0/8")})
    text = build_set(
        DeviceUpdate(
            peers=(
                PeerUpdate(P1, update_only=True, keepalive=0),
                PeerUpdate(P2, update_only=True, allowed_ips=nets),
            )
        )
    ).decode()
    first, second = text.split("public_key=")[1:]
    assert "update_only=true" in first and "replace_allowed_ips" not in first
    assert "persistent_keepalive_interval=0" in first
    assert "update_only=true\nreplace_allowed_ips=true\nallowed_ip=10.0.0.0/8\n" in second
    assert "allowed_ip=fd7a::/64" in second


class FakeDaemon:
    """One UAPI connection on a unix socket: records the request, answers when told."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.reply, self.request = reply, b""
        self.received, self.answer = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while not self.request.endswith(b"\n\n"):
                self.request += conn.recv(1 << 16)
            self.received.set()
            self.answer.wait(5)
            conn.sendall(self.reply)

    def close(self) -> None:
        self.thread.join(5)
        self.listener.close()


def _update(count: int) -> DeviceUpdate:
    nets = [ipaddress.ip_network(f"10.{i >> 8}.{i & 255}.0/24") for i in range(count)]
    keys = [encode_key(bytes([i & 255, i >> 8]) * 16) for i in range(count)]
    peers = (PeerUpdate(k, allowed_ips=frozenset({n})) for k, n in zip(keys, nets, strict=True))
    return DeviceUpdate(peers=tuple(peers))


@pytest.mark.parametrize(("reply", "errno"), [(CAPTURED_SET_OK, 0), (CAPTURED_SET_EINVAL, -22)])
def test_begin_write_sends_before_the_answer_is_read(
    tmp_path: Path, reply: bytes, errno: int
) -> None:
    daemon = FakeDaemon(tmp_path / "wgt.sock", reply)
    backend = UapiBackend(run_dir=tmp_path, socket_dir=tmp_path)
    update = _update(1500)  # ~250 kB: more than a default socket buffer
    try:
        finish = backend.begin_write("wgt", update)
        assert daemon.received.wait(5), "the whole request is out before finish()"
        assert daemon.request == build_set(update)
        daemon.answer.set()
        if errno:
            with pytest.raises(UapiRefused):
                finish()
        else:
            assert finish() == 1
    finally:
        daemon.answer.set()
        daemon.close()


def test_empty_update_does_not_connect(tmp_path: Path) -> None:
    backend = UapiBackend(run_dir=tmp_path, socket_dir=tmp_path / "missing")
    assert backend.begin_write("wgt", DeviceUpdate())() == 0
    assert backend.write("wgt", DeviceUpdate()) == 0
    with pytest.raises(UapiError):
        backend.begin_write("wgt", _update(1))
