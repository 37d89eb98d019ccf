"""Errors of the relay process, rooted in wiregate's one error tree.

::

    WiregateError
    └── RemoteError
        ├── BadInput
        │   └── StunError                 a datagram the STUN codec refuses
        │       ├── NotStun               too short, wrong magic cookie, top bits set
        │       ├── MalformedHeader       length field vs datagram, alignment
        │       ├── MalformedAttribute    overrun, bad family, bad value length or text
        │       ├── BadFingerprint        FINGERPRINT wrong or not last
        │       ├── MisplacedAttribute    something after MESSAGE-INTEGRITY
        │       ├── DuplicateAttribute    the same attribute type twice
        │       └── UnexpectedMessage     well-formed, but not the answer a client waits for
        ├── StunErrorResponse             the server answered with an ERROR-CODE
        └── Unavailable
            └── StunTimeout               no answer from the STUN server in time

Each ``StunError`` carries ``reason``, a short stable label the server uses as a
metric label when it drops a datagram, and ``stun_code``, the STUN error code
(RFC 8489 section 14.8) a request with that fault would deserve.
"""

from __future__ import annotations

from gateway.errors import BadInput, RemoteError, Unavailable

__all__ = [
    "BadFingerprint",
    "DuplicateAttribute",
    "MalformedAttribute",
    "MalformedHeader",
    "MisplacedAttribute",
    "NotStun",
    "StunError",
    "StunErrorResponse",
    "StunTimeout",
    "UnexpectedMessage",
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
