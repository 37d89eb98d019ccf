"""Admin route for the audit log: ``GET /api/v1/audit?since=&limit=``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from gateway.api.common import require_admin, rfc3339
from gateway.appkeys import STORE
from gateway.store.audit import MAX_LIMIT, AuditRecord
from wiregate.errors import BadInput

__all__ = ["audit_json", "parse_since", "routes"]

routes = web.RouteTableDef()
DEFAULT_LIMIT = 100


def audit_json(record: AuditRecord) -> dict[str, Any]:
    """The API's AUDIT object."""
    return {
        "id": record.id,
        "at": rfc3339(record.at),
        "actor": record.actor,
        "action": record.action,
        "target": record.target,
        "detail": dict(record.detail),
    }


def parse_since(text: str | None) -> float | None:
    """``since``: an RFC 3339 time (``2026-11-24T10:00:00Z``) or POSIX seconds."""
    if text is None or text == "":
        return None
    try:
        return float(text) if text.replace(".", "", 1).isdigit() else _rfc3339(text)
    except ValueError:
        raise BadInput("since must be an RFC 3339 time or POSIX seconds") from None


def _rfc3339(text: str) -> float:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("no time zone")
    return parsed.timestamp()


def _parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise BadInput(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(text)


@routes.get("/api/v1/audit")
async def list_audit(request: web.Request) -> web.Response:
    """Audit records at or after ``since``, newest first, at most ``limit`` (default 100)."""
    require_admin(request)
    since = parse_since(request.query.get("since"))
    limit = _parse_limit(request.query.get("limit"))
    records = await request.app[STORE].list_audit(since, limit)
    return web.json_response({"events": [audit_json(r) for r in records]})
