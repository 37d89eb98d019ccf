"""Parse what an agent sends on its map stream (pure).

The only message an agent sends is
``{"type": "endpoints", "endpoints": ["192.0.2.1:51820", "[2001:db8::1]:51820"], "nat": "eim"}``
(``nat``, optional: the NAT type its netcheck measured, one of :data:`NAT_TYPES`);
anything else is :class:`~wiregate.errors.BadInput`.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType

from wiregate.errors import BadInput

__all__ = ["MAX_ENDPOINTS", "NAT_TYPES", "AgentEndpoints", "parse_agent_message", "parse_endpoint"]

MAX_ENDPOINTS = 32
NAT_TYPES = frozenset({"open", "eim", "symmetric", "udp-blocked", "unknown"})


@dataclass(frozen=True, slots=True)
class AgentEndpoints:
    """An agent's endpoint candidates and, when measured, its NAT type."""

    endpoints: list[str]
    nat: str | None = None


def parse_agent_message(kind: WSMsgType, data: Any) -> AgentEndpoints:
    """The content of an agent's ``endpoints`` message, or raise :class:`BadInput`."""
    if kind is not WSMsgType.TEXT:
        raise BadInput(f"expected a text frame, got {kind.name}")
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can read
        raise BadInput("message is not JSON") from None
    if not isinstance(msg, dict) or msg.get("type") != "endpoints":
        raise BadInput("expected a message of type 'endpoints'")
    endpoints = msg.get("endpoints")
    if not isinstance(endpoints, list) or len(endpoints) > MAX_ENDPOINTS:
        raise BadInput(f"endpoints: expected a list of at most {MAX_ENDPOINTS} 'ip:port'")
    nat = msg.get("nat")
    if nat is not None and (not isinstance(nat, str) or nat not in NAT_TYPES):
        raise BadInput(f"nat: expected one of {', '.join(sorted(NAT_TYPES))}")
    return AgentEndpoints(list(dict.fromkeys(parse_endpoint(e) for e in endpoints)), nat)


def parse_endpoint(text: Any) -> str:
    """Normalize ``ip:port`` / ``[ipv6]:port``, or raise :class:`BadInput`."""
    if not isinstance(text, str) or len(text) > 64:
        raise BadInput(f"endpoint {text!r} is not 'ip:port'")
    host, sep, port = text.rpartition(":")
    v6 = host.startswith("[") and host.endswith("]")
    try:
        addr = ipaddress.ip_address(host[1:-1] if v6 else host)
        number = int(port)
    except ValueError:
        raise BadInput(f"endpoint {text!r} is not 'ip:port'") from None
    if not sep or not 0 < number < 65536 or (addr.version == 6) != v6:
        raise BadInput(f"endpoint {text!r} is not 'ip:port'")
    return f"[{addr}]:{number}" if v6 else f"{addr}:{number}"
