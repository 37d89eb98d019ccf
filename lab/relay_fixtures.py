"""Shared builders for the relay tests: signers, nodes, tickets, WireGuard-shaped datagrams."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry

from relay.aio.forwarding import ForwardingSettings, RelayForwarder
from relay.client.bind import build_allocate, build_bind, build_confirm
from relay.controlwire import Allocated, Bound, Challenge, Refused, parse_control
from relay.filters import mac1
from relay.forwarding import Relay, RelayConfig, Send
from relay.tickets import Node, Side, Ticket, TrustedSigner, issue_pair, sign_ticket
from wiregate.keys import decode_key, encode_key, generate_private_key, public_from_private

RELAY_ID = "relay-1"
TENANT = "acme"
NOW = 1_700_000_000.0
CONTROL = 3479
PORTS = tuple(range(40000, 40016))


def signer(tenants: tuple[str, ...] = (TENANT,)) -> tuple[SigningKey, TrustedSigner]:
    key = SigningKey.generate()
    return key, TrustedSigner(bytes(key.verify_key), frozenset(tenants))


def node(name: str) -> Node:
    return Node(name, encode_key(public_from_private(generate_private_key())))


def ticket(
    key: SigningKey,
    a: Node,
    b: Node,
    side: Side = Side.A,
    *,
    now: float = NOW,
    lifetime: int = 120,
    relay_id: str = RELAY_ID,
    tenant: str = TENANT,
) -> bytes:
    t = Ticket(os.urandom(16), relay_id, tenant, a, b, side, int(now), int(now) + lifetime)
    return sign_ticket(t, key)


def pair_tickets(key: SigningKey, a: Node, b: Node, now: float = NOW) -> tuple[bytes, bytes]:
    return issue_pair(key, relay_id=RELAY_ID, tenant=TENANT, node_a=a, node_b=b, now=now)


def initiation(receiver: Node) -> bytes:
    """A handshake initiation (148 bytes) whose mac1 is keyed with ``receiver``'s key."""
    body = b"\x01\x00\x00\x00" + os.urandom(112)
    return body + mac1(body, decode_key(receiver.public_key)) + bytes(16)


def response(receiver: Node) -> bytes:
    body = b"\x02\x00\x00\x00" + os.urandom(56)
    return body + mac1(body, decode_key(receiver.public_key)) + bytes(16)


def transport(payload: int = 32) -> bytes:
    return b"\x04\x00\x00\x00" + os.urandom(12) + os.urandom(payload)


def config(**overrides: object) -> RelayConfig:
    base: dict[str, object] = {"relay_id": RELAY_ID, "control_port": CONTROL, "ports": PORTS}
    base.update(overrides)
    return RelayConfig(**base)  # type: ignore[arg-type]


@dataclass
class Lab:
    """A sans-IO relay with a settable clock and helpers for the bind handshake."""

    relay: Relay
    now: float = NOW
    sent: list[Send] = field(default_factory=list)

    def send(self, data: bytes, src: tuple[str, int], port: int) -> list[Send]:
        out = self.relay.handle(data, src, port, self.now)
        self.sent += out
        for s in out:  # a reply to the sender is never larger than what it sent
            assert s.dst != src or (len(s.data) <= len(data) and s.local_port == port)
        return out

    def allocate(self, tkt: bytes, src: tuple[str, int]) -> int:
        (reply,) = self.send(build_allocate(tkt), src, CONTROL)
        msg = parse_control(reply.data)
        assert isinstance(msg, Allocated), msg
        return msg.port

    def challenge(self, tkt: bytes, src: tuple[str, int], port: int) -> bytes:
        (reply,) = self.send(build_bind(tkt), src, port)
        assert reply.dst == src
        msg = parse_control(reply.data)
        assert isinstance(msg, Challenge), msg
        return msg.cookie

    def confirm(self, tkt: bytes, cookie: bytes, src: tuple[str, int], port: int) -> bool:
        (reply,) = self.send(build_confirm(tkt, cookie), src, port)
        msg = parse_control(reply.data)
        assert isinstance(msg, Bound), msg
        return msg.peer_bound

    def bind(self, tkt: bytes, src: tuple[str, int]) -> int:
        port = self.allocate(tkt, src)
        self.confirm(tkt, self.challenge(tkt, src, port), src, port)
        return port


def refusal(sends: list[Send]) -> str | None:
    """The reason of a single REFUSED reply, None if nothing was sent."""
    if not sends:
        return None
    (reply,) = sends
    msg = parse_control(reply.data)
    assert isinstance(msg, Refused), msg
    return msg.reason


def make_lab(signers: list[TrustedSigner], **overrides: object) -> Lab:
    return Lab(Relay(config(**overrides), signers, secret=b"s" * 32))


async def loopback_forwarder(signers: tuple[TrustedSigner, ...], ports: int = 4) -> RelayForwarder:
    """A real relay forwarder on 127.0.0.1 (control port + ``ports`` relay ports); close it."""
    socks = []
    for _ in range(ports + 1):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
    config = RelayConfig(RELAY_ID, 0, (), allow_loopback=True)
    settings = ForwardingSettings("127.0.0.1", 0, (0,) * ports, config, signers, b"k" * 32)
    forwarder = RelayForwarder(settings, CollectorRegistry())
    await forwarder.start(socks)
    return forwarder
