"""wiregate relay: a STUN server (RFC 8489) and, later, an authenticated UDP relay.

The public surface: the sans-IO STUN codec (``parse_message``, ``build_message``
and the attribute values), the sans-IO server core (``StunServer``), the client
helpers (``build_binding_request``, ``parse_binding_response``, ``stun_query``),
the process entry point ``run_relay`` and the errors.
"""

from __future__ import annotations

from relay.client import BindingResponse, build_binding_request, parse_binding_response, stun_query
from relay.errors import (
    BadFingerprint,
    DuplicateAttribute,
    MalformedAttribute,
    MalformedHeader,
    MisplacedAttribute,
    NotStun,
    StunError,
    StunErrorResponse,
    StunTimeout,
    UnexpectedMessage,
)
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

__all__ = [
    "BadFingerprint",
    "BindingResponse",
    "ChangeRequest",
    "DuplicateAttribute",
    "ErrorCode",
    "MalformedAttribute",
    "MalformedHeader",
    "MappedAddress",
    "Message",
    "MessageClass",
    "MisplacedAttribute",
    "NotStun",
    "OtherAddress",
    "RateLimiter",
    "RawAttribute",
    "RelayServer",
    "ResponseOrigin",
    "Software",
    "StunError",
    "StunErrorResponse",
    "StunServer",
    "StunTimeout",
    "UnexpectedMessage",
    "UnknownAttributes",
    "Username",
    "XorMappedAddress",
    "build_binding_request",
    "build_message",
    "parse_binding_response",
    "parse_message",
    "run_relay",
    "stun_query",
    "verify_integrity",
]
