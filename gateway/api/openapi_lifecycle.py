"""OpenAPI pieces for the device lifecycle routes: audit, identities, rotation.

Merged into :data:`gateway.api.openapi.DOCUMENT`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PATHS", "SCHEMAS"]

JSON = "application/json"
_STR: dict[str, Any] = {"type": "string"}
_TIME: dict[str, Any] = {"type": "string", "format": "date-time"}
_ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": "#/components/responses/Error"} for s in statuses}


SCHEMAS: dict[str, Any] = {
    "AuditEvent": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "id": {"type": "integer"},
            "at": _TIME,
            "actor": {
                "type": "string",
                "description": "admin:socket, admin:token, device:<id>, oidc:<iss>#<sub>, "
                "system:<duty>",
            },
            "action": _STR,
            "target": _STR,
            "detail": {"type": "object", "additionalProperties": _STR},
        },
        "required": ["id", "at", "actor", "action", "target", "detail"],
    },
}

PATHS: dict[str, Any] = {
    "/api/v1/audit": {
        "get": {
            "summary": "The audit log, newest first",
            "security": _ADMIN,
            "parameters": [
                {
                    "name": "since",
                    "in": "query",
                    "schema": _STR,
                    "description": "RFC 3339 time or POSIX seconds",
                },
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                },
            ],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {"events": {"type": "array", "items": _ref("AuditEvent")}},
                        "required": ["events"],
                    },
                    "audit events",
                ),
                **_errors(400, 401, 403),
            },
        }
    },
}
