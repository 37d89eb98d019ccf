"""Errors of the relay process, rooted in wiregate's one error tree.

::

    WiregateError
    ├── RemoteError
    │   ├── BadInput
    │   │   ├── StunError                 a datagram the STUN codec refuses
    │   │   │   ├── NotStun               too short, wrong magic cookie, top bits set
    │   │   │   ├── MalformedHeader       length field vs datagram, alignment
    │   │   │   ├── MalformedAttribute    overrun, bad family, bad value length or text
    │   │   │   ├── BadFingerprint        FINGERPRINT wrong or not last
    │   │   │   ├── MisplacedAttribute    something after MESSAGE-INTEGRITY
    │   │   │   ├── DuplicateAttribute    the same attribute type twice
    │   │   │   └── UnexpectedMessage     well-formed, but not the answer a client waits for
    │   │   └── ControlError              a relay control datagram the codec refuses
    │   ├── StunErrorResponse             the server answered with an ERROR-CODE
    │   ├── RelayRefused                  the relay answered a control request with a refusal
    │   ├── Unauthorized
    │   │   └── TicketError               a relay ticket that does not admit its bearer
    │   │       ├── MalformedTicket       truncated, oversized, bad field
    │   │       ├── UnknownSigner         signed by a key the relay does not trust
    │   │       ├── BadTicketSignature    the signature does not verify
    │   │       ├── WrongRelay            issued for another relay
    │   │       ├── WrongTenant           the signer is not trusted for that tenant
    │   │       ├── ExpiredTicket         past expires_at
    │   │       ├── TicketNotYetValid     issued in the future
    │   │       └── ReplayedTicket        its id already bound an address
    │   └── Unavailable
    │       ├── StunTimeout               no answer from the STUN server in time
    │       └── RelayTimeout              no PONG from a relay's control port in time
    └── LocalError
        └── ConfigError
            └── NoTrustedSigners          no verify key loaded: the relay admits nobody

Each ``StunError`` carries ``reason``, a short stable label the server uses as a
metric label when it drops a datagram, and ``stun_code``, the STUN error code
(RFC 8489 section 14.8) a request with that fault would deserve.
"""

from __future__ import annotations

from wiregate.errors import BadInput, ConfigError, RemoteError, Unauthorized, Unavailable

__all__ = [
    "BadFingerprint",
    "BadTicketSignature",
    "ControlError",
    "DuplicateAttribute",
    "ExpiredTicket",
    "MalformedAttribute",
    "MalformedHeader",
    "MalformedTicket",
    "MisplacedAttribute",
    "NoTrustedSigners",
    "NotStun",
    "RelayRefused",
    "RelayTimeout",
    "ReplayedTicket",
    "StunError",
    "StunErrorResponse",
    "StunTimeout",
    "TicketError",
    "TicketNotYetValid",
    "UnexpectedMessage",
    "UnknownSigner",
    "WrongRelay",
    "WrongTenant",
]


class StunError(BadInput):
    """A datagram the STUN codec refuses to parse."""

    code = "stun_malformed"
    reason: str = "malformed"
    stun_code: int = 400


class NotStun(StunError):
    """Not a STUN message at all: too short, wrong magic cookie or top bits set."""

    reason = "not_stun"


class MalformedHeader(StunError):
    """The length field does not match the datagram or is not a multiple of 4."""

    reason = "bad_header"


class MalformedAttribute(StunError):
    """An attribute overruns the message or has a value it cannot have."""

    reason = "bad_attribute"


class BadFingerprint(StunError):
    """FINGERPRINT is not the last attribute or its CRC does not match."""

    reason = "bad_fingerprint"


class MisplacedAttribute(StunError):
    """An attribute follows MESSAGE-INTEGRITY (only FINGERPRINT and -SHA256 may)."""

    reason = "misplaced_attribute"


class DuplicateAttribute(StunError):
    """The same attribute type appears twice; wiregate refuses, rather than keeping the first."""

    reason = "duplicate_attribute"


class UnexpectedMessage(StunError):
    """A well-formed message that is not the response a client is waiting for."""

    reason = "unexpected"


class StunErrorResponse(RemoteError):
    """The STUN server answered with an error response."""

    code = "stun_error_response"

    def __init__(self, stun_code: int, reason: str) -> None:
        super().__init__(f"STUN server answered {stun_code} {reason}".rstrip())
        self.stun_code = stun_code
        self.reason = reason


class StunTimeout(Unavailable):
    """The STUN server did not answer in time."""

    code = "stun_timeout"


class RelayTimeout(Unavailable):
    """A relay's control port did not answer a PING in time (down, or filtered)."""

    code = "relay_timeout"


# --- the authenticated UDP relay -------------------------------------------------------------


class TicketError(Unauthorized):
    """A relay ticket that does not admit its bearer; ``reason`` is the metric label."""

    code = "relay_ticket"
    reason: str = "ticket_malformed"


class MalformedTicket(TicketError):
    """Not a ticket of a version this relay reads: truncated, oversized, bad fields."""

    reason = "ticket_malformed"


class UnknownSigner(TicketError):
    """Signed by a key this relay does not trust."""

    reason = "ticket_unknown_signer"


class BadTicketSignature(TicketError):
    """The Ed25519 signature does not verify under the named signer's key."""

    reason = "ticket_bad_signature"


class WrongRelay(TicketError):
    """Issued for another relay."""

    reason = "ticket_wrong_relay"


class WrongTenant(TicketError):
    """The signer is not trusted for the tenant the ticket names (a cross-tenant ticket)."""

    reason = "ticket_wrong_tenant"


class ExpiredTicket(TicketError):
    """Past ``expires_at``."""

    reason = "ticket_expired"


class TicketNotYetValid(TicketError):
    """``issued_at`` is in the future (beyond the allowed clock skew)."""

    reason = "ticket_not_yet_valid"


class ReplayedTicket(TicketError):
    """A ticket id that already bound an address."""

    reason = "ticket_replayed"


class NoTrustedSigners(ConfigError):
    """No verify key is loaded, so no ticket can be checked: the relay admits nobody."""

    code = "relay_no_verify_keys"
    reason = "no_verify_keys"


class ControlError(BadInput):
    """A relay control datagram the codec refuses (wrong magic, version, kind or length)."""

    code = "relay_control_malformed"
    reason = "malformed_control"


class RelayRefused(RemoteError):
    """The relay answered a control request with a refusal; ``reason`` says why."""

    code = "relay_refused"

    def __init__(self, reason: str) -> None:
        super().__init__(f"relay refused: {reason}")
        self.reason = reason
