"""OpenAPI pieces for the policy routes (``/api/v1/policy``).

Merged into :data:`gateway.api.openapi.DOCUMENT`.
"""

from __future__ import annotations

from typing import Any

from gateway.api.policy import MAX_DOCUMENT

__all__ = ["PATHS", "SCHEMAS"]

JSON = "application/json"
_STR: dict[str, Any] = {"type": "string"}
_ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]
_HASH: dict[str, Any] = {"type": "string", "pattern": "^[0-9a-f]{64}$"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": "#/components/responses/Error"} for s in statuses}


def _obj(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": props,
            "required": required}  # fmt: skip


SCHEMAS: dict[str, Any] = {
    "PolicyInForce": _obj(
        {
            "source": {"enum": ["api", "file", "default"]},
            "hash": _HASH,
            "format": {"enum": ["yaml", "json", "toml"]},
            "document": _STR,
            "version": {"type": "integer", "minimum": 0},
            "set_by": {"type": ["string", "null"]},
            "set_at": {"type": ["string", "null"], "format": "date-time"},
        },
        ["source", "hash", "format", "document", "version", "set_by", "set_at"],
    ),
    "PolicyBody": _obj(
        {
            "document": {"type": "string", "minLength": 1, "maxLength": MAX_DOCUMENT},
            "format": {"enum": ["yaml", "json"], "default": "yaml"},
        },
        ["document"],
    ),
}

_CHANGED = _json(
    _obj(
        {
            "policy": _ref("PolicyInForce"),
            "changed": {"type": "boolean"},
            "previous_hash": {"oneOf": [_HASH, {"type": "null"}]},
        },
        ["policy", "changed", "previous_hash"],
    ),
    "the policy in force afterwards; changed false: it was in force already",
)

PATHS: dict[str, Any] = {
    "/api/v1/policy": {
        "get": {
            "summary": "The policy document in force, its SHA-256 and where it came from",
            "security": _ADMIN,
            "responses": {
                "200": _json(_obj({"policy": _ref("PolicyInForce")}, ["policy"]), "in force"),
                **_errors(401, 403),
            },
        },
        "put": {
            "summary": "Validate a policy document (fields, then its tests) and put it in "
            "force on every replica; it wins over the policy files until reset",
            "security": _ADMIN,
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("PolicyBody")}}},
            "responses": {"200": _CHANGED, **_errors(400, 401, 403, 413, 415)},
        },
        "delete": {
            "summary": "Drop the API-set document: the policy file (or everyone peering) "
            "is put in force",
            "security": _ADMIN,
            "responses": {"200": _CHANGED, **_errors(400, 401, 403)},
        },
    },
}
