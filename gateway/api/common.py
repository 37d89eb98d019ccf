"""What every API handler shares: strict JSON bodies, errors, admin auth.

Request bodies are parsed strictly: ``application/json`` only (415), at most
``settings.max_body_bytes`` (413) arriving within ``settings.body_timeout`` (408),
valid JSON in UTF-8 with no key twice in an object (400), and validated by a pydantic
model with ``extra="forbid"`` and ``strict=True`` (unknown fields and wrong types
are 400). Every :class:`~wiregate.errors.WiregateError` becomes
``{"error", "message", "hint"?}`` with its status.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from gateway.api.metrics import count_rejected
from gateway.appkeys import ADMIN_TOKEN, SETTINGS
from gateway.mapping.broker import OnEndpoints
from gateway.store import DeviceRecord, KeyRecord
from gateway.store.audit import ADMIN_SOCKET as ADMIN_SOCKET_ACTOR
from gateway.store.audit import ADMIN_TOKEN as ADMIN_TOKEN_ACTOR
from wiregate import strictjson
from wiregate.errors import BadInput, Forbidden, RemoteError, Unauthorized, WiregateError
from wiregate.keys import fingerprint
from wiregate.logging import get_logger
from wiregate.strictjson import StrictJSONError

__all__ = [
    "EndpointsCallback",
    "PayloadTooLarge",
    "RequestTimeout",
    "StrictModel",
    "UnsupportedMediaType",
    "admin_actor",
    "bearer_token",
    "device_json",
    "error_middleware",
    "key_json",
    "model_from_json",
    "read_json",
    "require_admin",
    "rfc3339",
]

_log = get_logger("gateway.api")
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
EndpointsCallback = OnEndpoints


class PayloadTooLarge(RemoteError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(RemoteError):
    status = 408
    code = "request_timeout"


class UnsupportedMediaType(RemoteError):
    status = 415
    code = "unsupported_media_type"


class StrictModel(BaseModel):
    """Base of request schemas: unknown fields and type coercion are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


async def read_json(request: web.Request, model: type[M]) -> M:
    """Parse and validate the request body as ``model``; raise a 4xx error otherwise."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("the request body must be application/json")
    if (request.charset or "utf-8").lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaType("the request body must be UTF-8 (charset=utf-8 or none)")
    settings = request.app[SETTINGS]
    try:
        async with asyncio.timeout(settings.body_timeout):
            body = await _read_limited(request, settings.max_body_bytes)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {settings.body_timeout:g} s"
        ) from None
    return model_from_json(body, model)


def model_from_json(body: bytes, model: type[M]) -> M:
    """Parse ``body`` as one JSON document (UTF-8 without BOM, no duplicate keys, no
    NaN or Infinity) and validate it as ``model``; :class:`BadInput` otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("the request body is not UTF-8", code="malformed_json") from None
    try:
        data = strictjson.loads(text)
    except StrictJSONError as exc:
        code = "malformed_json" if exc.repeated_key else "bad_input"
        raise BadInput(f"malformed JSON: {exc}", code=code) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadInput(_describe(exc), code="invalid_field") from None


async def _read_limited(request: web.Request, limit: int) -> bytes:
    too_large = PayloadTooLarge(f"the request body is larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = await _read_up_to(request, limit + 1)
    if len(body) > limit:
        raise too_large
    return body


async def _read_up_to(request: web.Request, n: int) -> bytes:
    """Up to ``n`` bytes of the body (all of it if shorter): ``read(n)`` may return less."""
    chunks: list[bytes] = []
    size = 0
    while size < n:
        chunk = await request.content.read(n - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn errors into JSON bodies; never leak a traceback to the client."""
    try:
        return await handler(request)
    except WiregateError as exc:
        _log.info("request_refused", route=_route(request), status=exc.status, error=exc.code)
        count_rejected(_route(request), exc.status, exc.code)
        return web.json_response(exc.to_dict(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = (exc.reason or "error").lower().replace(" ", "_")
        count_rejected(_route(request), exc.status, code)
        return web.json_response({"error": code, "message": exc.reason}, status=exc.status)
    except (DisconnectionError, OperationalError, InterfaceError, OSError) as exc:
        # the database is away (restarting, failing over): a retryable 503, not a 500
        _log.warning("store_unavailable", route=_route(request), error=exc.__class__.__name__)
        count_rejected(_route(request), 503, "store_unavailable")
        body = {"error": "store_unavailable",
                "message": "the gateway's database is unavailable; retry shortly"}  # fmt: skip
        return web.json_response(body, status=503, headers={"Retry-After": "2"})
    except Exception:
        _log.exception("request_failed", route=_route(request))
        body = {"error": "internal", "message": "internal error"}
        return web.json_response(body, status=500)


def _route(request: web.Request) -> str:
    """The matched route's template (never the concrete path: it may hold a user code)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if any."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def require_admin(request: web.Request) -> None:
    """Admit requests on the unix socket, or over TCP with the admin bearer token."""
    if _over_unix_socket(request):
        return
    expected = request.app[ADMIN_TOKEN]
    if not expected:
        raise Forbidden(
            "admin calls over TCP are disabled",
            hint="use the admin unix socket, or configure admin_token_file",
        )
    given = bearer_token(request)
    if given is None or not hmac.compare_digest(given.encode(), expected):
        raise Unauthorized("a valid admin bearer token is required", code="invalid_admin_token")


def admin_actor(request: web.Request) -> str:
    """:func:`require_admin`, then the audit actor: ``admin:socket`` or ``admin:token``."""
    require_admin(request)
    return ADMIN_SOCKET_ACTOR if _over_unix_socket(request) else ADMIN_TOKEN_ACTOR


def _over_unix_socket(request: web.Request) -> bool:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


def rfc3339(ts: float | None) -> str | None:
    """POSIX seconds as an RFC 3339 UTC timestamp (``...Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def device_json(record: DeviceRecord) -> dict[str, Any]:
    """The API's DEVICE object."""
    d = record.device
    return {
        "id": d.id,
        "name": d.name,
        "public_key": d.public_key,
        "fingerprint": fingerprint(d.public_key),
        "identity": {"issuer": d.identity.issuer, "subject": d.identity.subject},
        "addresses": [d.ipv4, d.ipv6],
        "tags": list(d.tags),
        "endpoints": list(d.endpoints),
        "routes": list(d.routes),
        "created_at": rfc3339(d.created_at),
        "expires_at": rfc3339(d.expires_at),
        "last_seen": rfc3339(record.last_seen),
        "key_rotated_at": rfc3339(record.key_rotated_at),
        "ephemeral": record.ephemeral,
        "agent": None
        if record.agent_version is None
        else {"version": record.agent_version, "os": record.agent_os},
    }


def key_json(key: KeyRecord) -> dict[str, Any]:
    """The API's KEY object (never the secret or its hash)."""
    return {
        "id": key.id,
        "tags": list(key.tags),
        "reusable": key.reusable,
        "ephemeral": key.ephemeral,
        "description": key.description,
        "created_at": rfc3339(key.created_at),
        "expires_at": rfc3339(key.expires_at),
        "used_count": key.used_count,
        "revoked": key.revoked,
        "device_key_expiry": key.device_key_expiry,
    }
