"""STUN client helpers: sans-IO request/response functions and an asyncio query.

Requests are padded (with the SOFTWARE text, a comprehension-optional attribute
every server accepts) to :data:`REQUEST_SIZE` bytes, because a server that limits
amplification (wiregate's answers with no more than max(request, the smallest
complete reply)) sheds optional attributes to fit: 112 bytes fit the fullest IPv6
answer of :mod:`relay.stun_core`, RFC 5780 OTHER-ADDRESS included, which netcheck
uses to find a second server address.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from dataclasses import dataclass

from relay.errors import StunError, StunErrorResponse, StunTimeout, UnexpectedMessage
from relay.stun import (
    BINDING,
    ErrorCode,
    MappedAddress,
    MessageClass,
    OtherAddress,
    ResponseOrigin,
    Software,
    XorMappedAddress,
    build_message,
    parse_message,
)

__all__ = [
    "REQUEST_SIZE",
    "BindingResponse",
    "build_binding_request",
    "parse_binding_response",
    "stun_query",
]

REQUEST_SIZE = 112
_FIXED = 20 + 4 + 8  # header, SOFTWARE's TLV header, FINGERPRINT


@dataclass(frozen=True, slots=True)
class BindingResponse:
    """What a Binding success response says, as ``(host, port)`` pairs."""

    mapped: tuple[str, int]
    response_origin: tuple[str, int] | None = None
    other_address: tuple[str, int] | None = None


def build_binding_request(
    *, software: str = "wiregate", size: int = REQUEST_SIZE
) -> tuple[bytes, bytes]:
    """A Binding request with a random 96-bit transaction id: ``(transaction_id, datagram)``.

    The datagram carries SOFTWARE (space-padded so the request is ``size`` bytes)
    and FINGERPRINT.
    """
    width = max(len(software.encode()), size - _FIXED)
    if width > 127 or (size - _FIXED) % 4:
        raise ValueError(f"cannot pad a request to {size} bytes with SOFTWARE")
    transaction_id = secrets.token_bytes(12)
    attrs = [Software(software + " " * (width - len(software.encode())))]
    request = build_message(BINDING, MessageClass.REQUEST, transaction_id, attrs, fingerprint=True)
    return transaction_id, request


def _pair(attr: object) -> tuple[str, int] | None:
    if isinstance(attr, XorMappedAddress | MappedAddress | ResponseOrigin | OtherAddress):
        return str(attr.ip), attr.port
    return None


def parse_binding_response(data: bytes, transaction_id: bytes) -> BindingResponse:
    """Parse the answer to the request with ``transaction_id``.

    Raises :class:`~relay.errors.StunError` if it is malformed or not that answer
    (``UnexpectedMessage``), :class:`~relay.errors.StunErrorResponse` for an error
    response. XOR-MAPPED-ADDRESS wins over MAPPED-ADDRESS (RFC 3489 servers).
    """
    msg = parse_message(data)
    if msg.transaction_id != transaction_id or msg.method != BINDING:
        raise UnexpectedMessage("not the answer to this request")
    if msg.msg_class is MessageClass.ERROR:
        error = msg.get(ErrorCode)
        code, reason = (error.code, error.reason) if isinstance(error, ErrorCode) else (0, "")
        raise StunErrorResponse(code, reason)
    mapped = _pair(msg.get(XorMappedAddress)) or _pair(msg.get(MappedAddress))
    if msg.msg_class is not MessageClass.SUCCESS or mapped is None:
        raise UnexpectedMessage("not a success response with a mapped address")
    return BindingResponse(mapped, _pair(msg.get(ResponseOrigin)), _pair(msg.get(OtherAddress)))


class _QueryProtocol(asyncio.DatagramProtocol):
    """Resolves ``answer`` with the first datagram that is this query's response."""

    def __init__(self, transaction_id: bytes) -> None:
        self.transaction_id = transaction_id
        self.answer: asyncio.Future[BindingResponse] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if self.answer.done():
            return
        try:
            self.answer.set_result(parse_binding_response(data, self.transaction_id))
        except StunErrorResponse as exc:
            self.answer.set_exception(exc)
        except StunError:
            pass  # malformed, or a stale answer: keep waiting

    def error_received(self, exc: Exception) -> None:
        """ICMP errors (port unreachable...) are not answers: keep retransmitting."""


async def stun_query(
    server: tuple[str, int],
    local_port: int | None = None,
    timeout: float = 1.0,  # noqa: ASYNC109 - it also sets the retransmission schedule
) -> tuple[str, int]:
    """Ask ``server`` for our reflexive ``(host, port)``; retransmit until ``timeout``.

    With ``local_port`` the query leaves from that port (wildcard address of the
    server's family), so the answer is the NAT mapping of that port. Raises
    :class:`~relay.errors.StunTimeout` or :class:`~relay.errors.StunErrorResponse`.
    """
    return (await _query(server, local_port, timeout)).mapped


async def _query(server: tuple[str, int], local_port: int | None, wait: float) -> BindingResponse:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(*server, type=socket.SOCK_DGRAM)
    family, remote = infos[0][0], (str(infos[0][4][0]), int(infos[0][4][1]))
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"  # noqa: S104 - source port only
    local = (wildcard, local_port) if local_port is not None else None
    transaction_id, request = build_binding_request()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _QueryProtocol(transaction_id), local_addr=local, remote_addr=remote, family=family
    )
    try:
        return await _exchange(transport, proto, request, wait)
    finally:
        transport.close()


async def _exchange(
    transport: asyncio.DatagramTransport, proto: _QueryProtocol, request: bytes, wait: float
) -> BindingResponse:
    rto = wait / 4
    try:
        async with asyncio.timeout(wait):
            while True:
                transport.sendto(request)
                done, _ = await asyncio.wait({proto.answer}, timeout=rto)
                if done:
                    return proto.answer.result()
                rto *= 2
    except TimeoutError:
        raise StunTimeout(f"no STUN answer within {wait}s") from None
