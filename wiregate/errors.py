"""The one error tree of wiregate.

::

    WiregateError
    ├── LocalError            something on this side is wrong (config, kernel, state dir)
    │   ├── ConfigError
    │   └── DataPlaneError    the WireGuard device / netlink / UAPI refused an operation
    └── RemoteError           the other side sent something we refuse, or failed
        ├── BadInput          malformed or invalid input (HTTP 400/422)
        │   └── BadKey        a WireGuard key that is not 32 bytes of base64, all-zero, low-order
        ├── Unauthorized      missing/unknown/expired credential (HTTP 401)
        ├── Forbidden         credential valid but not allowed (HTTP 403)
        ├── NotFound          (HTTP 404)
        ├── Conflict          duplicate public key, address exhausted... (HTTP 409)
        └── Unavailable       the gateway/peer cannot be reached (HTTP 503)

Every error carries a human ``message``, a stable machine ``code`` and, where it
maps to HTTP, a ``status``; ``hint`` tells the operator what to do next.
"""

from __future__ import annotations

__all__ = [
    "BadInput",
    "BadKey",
    "ConfigError",
    "Conflict",
    "DataPlaneError",
    "Forbidden",
    "LocalError",
    "NotFound",
    "RemoteError",
    "Unauthorized",
    "Unavailable",
    "WiregateError",
    "from_api_response",
]


class WiregateError(Exception):
    """Base of every error wiregate raises on purpose."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        """The JSON body an API returns for this error."""
        body = {"error": self.code, "message": self.message}
        if self.hint:
            body["hint"] = self.hint
        return body


class LocalError(WiregateError):
    """A fault on this side: configuration, kernel, filesystem."""


class ConfigError(LocalError):
    code = "config"


class DataPlaneError(LocalError):
    code = "dataplane"


class RemoteError(WiregateError):
    """The peer (client, gateway, IdP) sent something refused, or failed."""

    status = 400
    code = "bad_request"


class BadInput(RemoteError):
    status = 400
    code = "bad_input"


class BadKey(BadInput):
    code = "bad_key"


class Unauthorized(RemoteError):
    status = 401
    code = "unauthorized"


class Forbidden(RemoteError):
    status = 403
    code = "forbidden"


class NotFound(RemoteError):
    status = 404
    code = "not_found"


class Conflict(RemoteError):
    status = 409
    code = "conflict"


class Unavailable(RemoteError):
    status = 503
    code = "unavailable"


def from_api_response(status: int, body: object) -> RemoteError:
    """The error a client raises for a gateway's error response (``status`` ≥ 400)."""
    doc = body if isinstance(body, dict) else {}
    message = str(doc.get("message") or f"request refused (HTTP {status})")
    hint = doc.get("hint")
    err: RemoteError = Unauthorized(message) if status == 401 else RemoteError(message)
    err.hint = str(hint) if hint else None
    err.status = status
    if isinstance(doc.get("error"), str):
        err.code = doc["error"]
    return err
