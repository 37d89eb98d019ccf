"""WireGuard over TLS/TCP: the real relay on loopback, real TLS, real agent links."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from prometheus_client import generate_latest

from agent.paths.relaylink import RelayBinding, RelayGrant
from agent.paths.tcplink import TcpFallback, TcpLink, open_link
from lab.relay_fixtures import RELAY_ID, initiation, node, pair_tickets, signer, ticket, transport
from lab.tls import LabCA
from relay.aio.forwarding import ForwardingSettings
from relay.aio.stun import RelayServer
from relay.aio.tcp import TcpBridgeServer, TcpSettings
from relay.client.bind import build_allocate
from relay.client.framed import FramedStream
from relay.errors import RelayRefused
from relay.forwarding import RelayConfig
from relay.streamwire import (
    MAX_PAYLOAD,
    PREAMBLE,
    Datagram,
    Frame,
    Refusal,
    StreamDecoder,
    build_frame,
)
from relay.tickets import Node
from wiregate.errors import ConfigError, Unavailable
from wiregate.settings import RelaySettings

LOOPBACK = "127.0.0.1"


class Env:
    def __init__(self, server: RelayServer, ca: Path, key: SigningKey) -> None:
        self.server, self.ca, self.key = server, ca, key
        assert server.tcp is not None and server.tcp.address is not None
        assert server.forwarder is not None and server.forwarder.control_address is not None
        self.tcp = server.tcp.address
        self.control = server.forwarder.control_address

    def grants(self, a: Node, b: Node) -> tuple[RelayGrant, RelayGrant]:
        ta, tb = pair_tickets(self.key, a, b, now=time.time())
        return RelayGrant(RELAY_ID, self.control, ta), RelayGrant(RELAY_ID, self.control, tb)


async def start_relay(tmp: Path, max_connections: int = 64) -> tuple[RelayServer, Path, SigningKey]:
    ca = LabCA.create(tmp / "ca")
    pair = ca.issue(tmp / "relay", [LOOPBACK, "localhost"])
    key, trusted = signer()
    settings = RelaySettings(
        stun_listen=[f"{LOOPBACK}:0"],
        metrics_listen="",
        relay_id=RELAY_ID,
        tcp_listen=f"{LOOPBACK}:0",
        tls_cert=pair.cert,
        tls_key=pair.key,
        tcp_max_connections=max_connections,
    )
    config = RelayConfig(RELAY_ID, 0, ())  # loopback stays forbidden: only bridges pass
    forwarding = ForwardingSettings(LOOPBACK, 0, (0,) * 4, config, (trusted,), b"k" * 32)
    server = RelayServer(settings, forwarding=forwarding)
    await server.start()
    return server, ca.ca_file, key


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    server, ca, key = await start_relay(tmp_path)
    yield Env(server, ca, key)
    await server.close()


@pytest.fixture
def wireguards() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two UDP sockets standing in for two WireGuard devices' listen ports."""
    socks = []
    for _ in range(2):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((LOOPBACK, 0))
        sock.setblocking(False)
        socks.append(sock)
    yield socks[0], socks[1]
    for sock in socks:
        sock.close()


async def recv(sock: socket.socket, wait: float = 2.0) -> bytes | None:
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), wait)
    except TimeoutError:
        return None


def endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def test_two_sides_on_tcp_forward_wireguard_both_ways(
    env: Env, wireguards: tuple[socket.socket, socket.socket]
) -> None:
    wg_a, wg_b = wireguards
    a, b = node("a"), node("b")
    grant_a, grant_b = env.grants(a, b)
    link_a = await open_link(env.tcp, wg_a.getsockname()[1], ca_file=env.ca)
    link_b = await open_link(env.tcp, wg_b.getsockname()[1], ca_file=env.ca)
    bound_a = await link_a.bind(grant_a)
    bound_b = await link_b.bind(grant_b)
    assert not bound_a.peer_bound and bound_b.peer_bound
    loop = asyncio.get_running_loop()
    hello = initiation(b)  # mac1 keyed with b's key: the relay checks it as for UDP
    await loop.sock_sendto(wg_a, hello, endpoint(bound_a.endpoint))
    assert await recv(wg_b) == hello
    for _ in range(50):
        data = transport(1200)
        await loop.sock_sendto(wg_b, data, endpoint(bound_b.endpoint))
        assert await recv(wg_a) == data
    assert (await link_a.ping(env.control[1])).capacity > 0
    assert env.server.forwarder is not None and env.server.forwarder.core is not None
    assert env.server.forwarder.core.counters["forwarded"] == 51
    link_a.close()
    link_b.close()
    await link_a.closed
    await asyncio.sleep(0.05)
    assert len(env.server.forwarder.core.bridges) == 0  # gone with their connections


async def test_what_wireguard_did_not_send_is_not_carried(
    env: Env, wireguards: tuple[socket.socket, socket.socket]
) -> None:
    wg_a, wg_b = wireguards
    a, b = node("a"), node("b")
    grant_a, grant_b = env.grants(a, b)
    link_a = await open_link(env.tcp, wg_a.getsockname()[1], ca_file=env.ca)
    link_b = await open_link(env.tcp, wg_b.getsockname()[1], ca_file=env.ca)
    bound_a, _ = await link_a.bind(grant_a), await link_b.bind(grant_b)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.sendto(transport(64), endpoint(bound_a.endpoint))
    assert await recv(wg_b, wait=0.3) is None
    link_a.close()
    link_b.close()


async def test_tickets_are_the_same_tickets(env: Env) -> None:
    forger, _ = signer()
    a, b = node("a"), node("b")
    link = await open_link(env.tcp, 9, ca_file=env.ca)
    forged = RelayGrant(RELAY_ID, env.control, ticket(forger, a, b, now=time.time()))
    with pytest.raises(RelayRefused, match="ticket_unknown_signer"):
        await link.bind(forged)
    link.close()


async def test_a_loopback_sender_that_is_no_bridge_is_still_refused(env: Env) -> None:
    a, b = node("a"), node("b")
    grant, _ = env.grants(a, b)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_sendto(
            sock, build_allocate(grant.ticket), env.control
        )
        assert await recv(sock, wait=0.3) is None
    assert env.server.forwarder is not None and env.server.forwarder.core is not None
    assert env.server.forwarder.core.counters["forbidden_destination"] == 1


async def raw_stream(env: Env, first: bytes) -> list[Frame]:
    ctx = ssl.create_default_context(cafile=str(env.ca))
    reader, writer = await asyncio.open_connection(*env.tcp, ssl=ctx, server_hostname=LOOPBACK)
    writer.write(first)
    data = await asyncio.wait_for(reader.read(), 5)  # until the relay closes
    writer.close()
    return StreamDecoder(preamble=False).feed(data)


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n", "not a wiregate relay stream"),
        (PREAMBLE + build_frame(Datagram(22, b"x")), "port 22 is not one of this relay's"),
        (PREAMBLE + b"\xff\xff\x01", "frame of 65535 bytes"),
    ],
)
async def test_bad_input_gets_one_line_and_the_door(env: Env, first: bytes, reason: str) -> None:
    (frame,) = await raw_stream(env, first)
    assert isinstance(frame, Refusal) and reason in frame.reason and "\n" not in frame.reason
    assert env.server.forwarder is not None and env.server.forwarder.core is not None
    assert sum(env.server.forwarder.core.counters.values()) == 0  # nothing reached the core
    text = generate_latest(env.server.registry).decode()
    event = "refused_port" if "port" in reason else "refused_stream"
    assert f'wiregate_relay_tcp_events_total{{event="{event}"}} 1.0' in text


async def test_connections_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    server, ca, _ = await start_relay(tmp_path, max_connections=1)
    try:
        assert server.tcp is not None and server.tcp.address is not None
        first = await open_link(server.tcp.address, 9, ca_file=ca)
        second = await open_link(server.tcp.address, 9, ca_file=ca)
        await asyncio.wait_for(second.closed, 5)
        assert second.refused == "relay refused: too many TCP connections"
        assert first.transport is not None and not first.transport.is_closing()
        first.close()
    finally:
        await server.close()


async def test_a_relay_certificate_the_agent_cannot_verify_is_refused(
    env: Env, tmp_path: Path
) -> None:
    other = LabCA.create(tmp_path / "other", name="someone else")
    with pytest.raises(Unavailable, match=r"TLS with relay 127\.0\.0\.1:\d+ failed: self-signed"):
        await open_link(env.tcp, 9, ca_file=other.ca_file, attempts=1)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class _Sink(FramedStream):
    def frame_received(self, frame: Frame) -> None:
        pass


async def test_a_stalled_stream_drops_the_oldest_frames_not_the_newest() -> None:
    stream, fake = _Sink(preamble=False, queue_frames=3), _Transport()
    stream.connection_made(fake)
    stream.pause_writing()
    for i in range(1, 6):
        stream.send(Datagram(1, bytes([i])))
    assert fake.written == [] and stream.dropped == 2
    stream.resume_writing()
    frames = StreamDecoder(preamble=False).feed(b"".join(fake.written))
    assert frames == [Datagram(1, b"\x03"), Datagram(1, b"\x04"), Datagram(1, b"\x05")]


async def test_a_datagram_no_frame_can_carry_is_dropped_not_raised() -> None:
    stream, fake = _Sink(preamble=False), _Transport()
    stream.connection_made(fake)
    stream.send(Datagram(1, bytes(MAX_PAYLOAD + 1)))
    await asyncio.sleep(0)
    assert fake.written == [] and stream.dropped == 1


def test_link_is_a_framed_stream() -> None:
    assert issubclass(TcpLink, FramedStream)


async def test_the_fallback_binds_over_tcp_when_udp_gets_no_answer_and_goes_back(
    env: Env, wireguards: tuple[socket.socket, socket.socket]
) -> None:
    wg_a, _ = wireguards
    grant, _ = env.grants(node("a"), node("b"))
    udp_up = False
    probed: list[tuple[str, int]] = []

    async def udp_bind(grant: RelayGrant) -> RelayBinding:
        raise Unavailable("relay did not answer within 2s")

    async def udp_probe(control: tuple[str, int]) -> None:
        probed.append(control)
        if not udp_up:
            raise Unavailable("no PONG")

    clock = [0.0]
    fallback = TcpFallback(
        udp_bind=udp_bind, udp_probe=udp_probe, wg_port=wg_a.getsockname()[1],
        ca_file=env.ca, udp_retry=30.0, clock=lambda: clock[0],
    )  # fmt: skip
    binding = await fallback.bind(replace(grant, tcp=env.tcp))
    assert (
        binding.via_tcp
        == f"TCP {env.tcp[1]} via relay {RELAY_ID} (the relay does not answer over UDP)"
    )
    assert binding.control == endpoint(binding.endpoint)  # probes go over the link
    await fallback.probe(binding.control)  # a PING over the stream
    assert probed == []
    assert not await fallback.udp_back(binding)  # not yet due
    clock[0] = 31.0
    assert not await fallback.udp_back(binding) and probed == [env.control]
    udp_up, clock[0] = True, 62.0
    assert await fallback.udp_back(binding)
    ((link, _, _),) = fallback.links.values()
    fallback.release(binding)
    await asyncio.wait_for(link.closed, 5)
    assert fallback.links == {}


async def test_without_a_tcp_address_the_udp_failure_stands(env: Env) -> None:
    async def udp_bind(grant: RelayGrant) -> RelayBinding:
        raise Unavailable("relay did not answer within 2s")

    async def udp_probe(control: tuple[str, int]) -> None:
        return None

    fallback = TcpFallback(udp_bind=udp_bind, udp_probe=udp_probe, wg_port=9)
    grant, _ = env.grants(node("a"), node("b"))
    with pytest.raises(Unavailable, match="did not answer within 2s"):
        await fallback.bind(grant)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"tcp_listen": "0.0.0.0:443", "relay_id": "r1"}, "tcp_listen needs tls_cert and tls_key"),
        ({"tcp_listen": "0.0.0.0:443", "tls_cert": "c.pem", "tls_key": "k.pem"}, "needs relay_id"),
        ({"tls_cert": "c.pem"}, "tls_cert and tls_key go together"),
        (
            {"tcp_listen": "nowhere", "tls_cert": "c", "tls_key": "k", "relay_id": "r1"},
            "tcp_listen",
        ),
        ({"tcp_idle_timeout": 1.0}, "10..3600"),
    ],
)
def test_tcp_settings_are_checked(given: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RelaySettings(**given)  # type: ignore[arg-type]


async def test_a_key_readable_by_others_is_refused_at_start(tmp_path: Path) -> None:
    pair = LabCA.create(tmp_path / "ca").issue(tmp_path / "relay", [LOOPBACK])
    pair.key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"tls_key \S+ is readable by others"):
        await start_relay_with(pair.cert, pair.key)


async def start_relay_with(cert: Path, key: Path) -> None:
    settings = RelaySettings(
        stun_listen=[f"{LOOPBACK}:0"], metrics_listen="", relay_id=RELAY_ID,
        tcp_listen=f"{LOOPBACK}:0", tls_cert=cert, tls_key=key,
    )  # fmt: skip
    forwarding = ForwardingSettings(
        LOOPBACK, 0, (0,), RelayConfig(RELAY_ID, 0, ()), (signer()[1],), b"k" * 32
    )
    server = RelayServer(settings, forwarding=forwarding)
    try:
        await server.start()
    finally:
        await server.close()


async def test_silent_and_idle_streams_are_closed(env: Env, tmp_path: Path) -> None:
    pair = LabCA.create(tmp_path / "ca2").issue(tmp_path / "short", [LOOPBACK])
    ca = tmp_path / "ca2" / "ca.pem"
    settings = TcpSettings(
        LOOPBACK, 0, pair.cert, pair.key, handshake_timeout=0.2, idle_timeout=0.4
    )
    assert env.server.forwarder is not None
    server = TcpBridgeServer(settings, env.server.forwarder)
    await server.start()
    assert server.address is not None
    try:
        for first, reason in ((b"", "no preamble within 0.2 s"), (PREAMBLE, "idle stream")):
            ctx = ssl.create_default_context(cafile=str(ca))
            reader, writer = await asyncio.open_connection(
                *server.address, ssl=ctx, server_hostname=LOOPBACK
            )
            writer.write(first)
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            (frame,) = StreamDecoder(preamble=False).feed(data)
            assert isinstance(frame, Refusal) and reason in frame.reason
        assert server.counters["refused_handshake_timeout"] == 1
        assert server.counters["idle_closed"] == 1
    finally:
        await server.close()


async def test_one_address_cannot_take_every_connection(env: Env, tmp_path: Path) -> None:
    pair = LabCA.create(tmp_path / "ca3").issue(tmp_path / "few", [LOOPBACK])
    settings = TcpSettings(LOOPBACK, 0, pair.cert, pair.key, max_per_client=2)
    assert env.server.forwarder is not None
    server = TcpBridgeServer(settings, env.server.forwarder)
    await server.start()
    assert server.address is not None
    try:
        ca = tmp_path / "ca3" / "ca.pem"
        links = [await open_link(server.address, 9, ca_file=ca) for _ in range(3)]
        await asyncio.wait_for(links[2].closed, 5)
        assert links[2].refused == "relay refused: too many TCP connections from this address"
        assert all(link.transport is not None for link in links[:2])
        for link in links:
            link.close()
    finally:
        await server.close()


async def test_a_renewed_certificate_is_served_to_new_connections(env: Env, tmp_path: Path) -> None:
    assert env.server.tcp is not None and env.server.tcp.reloader is not None
    reloader = env.server.tcp.reloader
    other = LabCA.create(tmp_path / "renewed-ca", name="renewed")
    pair = other.issue(tmp_path / "renewed", [LOOPBACK])
    reloader.cert.write_bytes(pair.cert.read_bytes())
    reloader.key.write_bytes(pair.key.read_bytes())
    assert reloader.check()  # what the relay's reload task does every few seconds
    link = await open_link(env.tcp, 9, ca_file=other.ca_file, attempts=1)
    link.close()
    with pytest.raises(Unavailable, match="self-signed"):
        await open_link(env.tcp, 9, ca_file=env.ca, attempts=1)
