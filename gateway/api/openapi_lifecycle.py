"""OpenAPI pieces for the device lifecycle routes: audit, identities, rotation.

Merged into :data:`gateway.api.openapi.DOCUMENT`.
"""

from __future__ import annotations

from typing import Any

from gateway.api.openapi_parts import ADMIN as _ADMIN
from gateway.api.openapi_parts import JSON
from gateway.api.openapi_parts import STR as _STR
from gateway.api.openapi_parts import TIME as _TIME
from gateway.api.openapi_parts import errors as _errors
from gateway.api.openapi_parts import json_body as _json
from gateway.api.openapi_parts import ref as _ref

__all__ = ["PATHS", "SCHEMAS"]

SCHEMAS: dict[str, Any] = {
    "IdentityRecord": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "id": {"type": "integer"},
            "issuer": _STR,
            "subject": _STR,
            "created_at": _TIME,
            "disabled": {"type": "boolean"},
            "devices": {"type": "integer", "minimum": 0},
        },
        "required": ["id", "issuer", "subject", "created_at", "disabled", "devices"],
    },
    "AuditEvent": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "id": {"type": "integer"},
            "at": _TIME,
            "actor": {
                "type": "string",
                "description": "admin:socket, admin:token (with #<name>: an administrator"
                " who named themselves), device:<id>, oidc:<iss>#<sub>, system:<duty>",
            },
            "action": _STR,
            "target": _STR,
            "detail": {"type": "object", "additionalProperties": _STR},
        },
        "required": ["id", "at", "actor", "action", "target", "detail"],
    },
}

_IDENTITY_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}]
_CHANGED = _json(
    {
        "type": "object",
        "properties": {
            "identity": _ref("IdentityRecord"),
            "removed": {"type": "array", "items": _STR},
            "map_version": {"type": ["integer", "null"]},
        },
        "required": ["identity", "removed", "map_version"],
    },
    "changed; every removed device has left every map and its stream was told revoked",
)


def _identity_op(summary: str) -> dict[str, Any]:
    return {"summary": summary, "security": _ADMIN,
            "responses": {"200": _CHANGED, **_errors(400, 401, 403, 404)}}  # fmt: skip


PATHS: dict[str, Any] = {
    "/api/v1/identities": {
        "get": {
            "summary": "List identities (issuer and subject together narrow to one)",
            "description": "Give `issuer` and `subject` together (just that identity, 404 if"
            " unknown) or neither (every identity); one without the other is a 400.",
            "security": _ADMIN,
            "parameters": [
                {
                    "name": "issuer",
                    "in": "query",
                    "schema": _STR,
                    "description": "with `subject`: the identity's issuer",
                },
                {
                    "name": "subject",
                    "in": "query",
                    "schema": _STR,
                    "description": "with `issuer`: the identity's subject",
                },
            ],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "identities": {"type": "array", "items": _ref("IdentityRecord")}
                        },
                        "required": ["identities"],
                    },
                    "identities",
                ),
                **_errors(400, 401, 403, 404),
            },
        }
    },
    "/api/v1/identities/{id}": {
        "parameters": _IDENTITY_ID,
        "delete": _identity_op("Revoke an identity: all its devices leave every map"),
    },
    "/api/v1/identities/{id}/disable": {
        "parameters": _IDENTITY_ID,
        "post": _identity_op("Disable an identity: its devices go; no new login or enrollment"),
    },
    "/api/v1/identities/{id}/enable": {
        "parameters": _IDENTITY_ID,
        "post": _identity_op("Enable a disabled identity again"),
    },
    "/api/v1/devices/self/rotate": {
        "post": {
            "summary": "Rotate the calling device's key (make-before-break, one map version)",
            "security": [{"deviceToken": []}],
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"public_key": _STR},
                            "required": ["public_key"],
                        }
                    }
                },
            },
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "device": _ref("Device"),
                            "map_version": {"type": "integer"},
                        },
                        "required": ["device", "map_version"],
                    },
                    "rotated: the next map version carries the new key",
                ),
                **_errors(400, 401, 409, 413, 415),
            },
        }
    },
    "/api/v1/devices/self/logout": {
        "post": {
            "summary": "Delete the calling device (wiregate logout): peers drop it, its token ends",
            "security": [{"deviceToken": []}],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "device_id": _STR,
                            "map_version": {"type": "integer"},
                        },
                        "required": ["device_id", "map_version"],
                    },
                    "deleted: the next map version removes the device",
                ),
                **_errors(401),
            },
        }
    },
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
