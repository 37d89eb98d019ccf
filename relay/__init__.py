"""wiregate relay: a STUN server (RFC 8489) and an authenticated UDP relay for WireGuard.

The public surface: the sans-IO STUN codec (``parse_message``, ``build_message``
and the attribute values), the sans-IO server core (``StunServer``), the client
helpers (``build_binding_request``, ``parse_binding_response``, ``stun_query``);
relay tickets (``Ticket``, ``sign_ticket``, ``issue_pair``, ``parse_ticket``), the
sans-IO relay core (``Relay``, ``RelayConfig``, ``Send``), the agent's bind
helpers (``build_allocate`` ... ``parse_bound``), the liveness probe
(``build_ping``, ``parse_pong``, ``ping_relay``), the asyncio adapter settings
(``ForwardingSettings``); the process entry point ``run_relay`` and the errors.
"""

from __future__ import annotations

from relay.allocation import Relay, RelayConfig, Send
from relay.client import BindingResponse, build_binding_request, parse_binding_response, stun_query
from relay.errors import (
    BadFingerprint,
    BadTicketSignature,
    ControlError,
    DuplicateAttribute,
    ExpiredTicket,
    MalformedAttribute,
    MalformedHeader,
    MalformedTicket,
    MisplacedAttribute,
    NoTrustedSigners,
    NotStun,
    RelayRefused,
    RelayTimeout,
    ReplayedTicket,
    StunError,
    StunErrorResponse,
    StunTimeout,
    TicketError,
    TicketNotYetValid,
    UnexpectedMessage,
    UnknownSigner,
    WrongRelay,
    WrongTenant,
)
from relay.probe import PingResult, ping_relay
from relay.relay_client import (
    build_allocate,
    build_bind,
    build_confirm,
    build_ping,
    parse_allocated,
    parse_bound,
    parse_challenge,
    parse_pong,
)
from relay.relay_server import ForwardingSettings
from relay.server import RelayServer, run_relay
from relay.stun import (
    ChangeRequest,
    ErrorCode,
    MappedAddress,
    Message,
    MessageClass,
    OtherAddress,
    RawAttribute,
    ResponseOrigin,
    Software,
    UnknownAttributes,
    Username,
    XorMappedAddress,
    build_message,
    parse_message,
    verify_integrity,
)
from relay.stun_server import RateLimiter, StunServer
from relay.tickets import Node, Side, Ticket, TrustedSigner, issue_pair, parse_ticket, sign_ticket

__all__ = [
    "BadFingerprint",
    "BadTicketSignature",
    "BindingResponse",
    "ChangeRequest",
    "ControlError",
    "DuplicateAttribute",
    "ErrorCode",
    "ExpiredTicket",
    "ForwardingSettings",
    "MalformedAttribute",
    "MalformedHeader",
    "MalformedTicket",
    "MappedAddress",
    "Message",
    "MessageClass",
    "MisplacedAttribute",
    "NoTrustedSigners",
    "Node",
    "NotStun",
    "OtherAddress",
    "PingResult",
    "RateLimiter",
    "RawAttribute",
    "Relay",
    "RelayConfig",
    "RelayRefused",
    "RelayServer",
    "RelayTimeout",
    "ReplayedTicket",
    "ResponseOrigin",
    "Send",
    "Side",
    "Software",
    "StunError",
    "StunErrorResponse",
    "StunServer",
    "StunTimeout",
    "Ticket",
    "TicketError",
    "TicketNotYetValid",
    "TrustedSigner",
    "UnexpectedMessage",
    "UnknownAttributes",
    "UnknownSigner",
    "Username",
    "WrongRelay",
    "WrongTenant",
    "XorMappedAddress",
    "build_allocate",
    "build_bind",
    "build_binding_request",
    "build_confirm",
    "build_message",
    "build_ping",
    "issue_pair",
    "parse_allocated",
    "parse_binding_response",
    "parse_bound",
    "parse_challenge",
    "parse_message",
    "parse_pong",
    "parse_ticket",
    "ping_relay",
    "run_relay",
    "sign_ticket",
    "stun_query",
    "verify_integrity",
]
