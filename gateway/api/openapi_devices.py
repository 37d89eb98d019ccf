"""OpenAPI pieces for the device routes (list, show, rename and retag, expire, delete,
a device's whois) and the login requests' list.

Merged into :data:`gateway.api.openapi.DOCUMENT`.
"""

from __future__ import annotations

from typing import Any

from gateway.api.keys import TAG_PATTERN
from gateway.api.openapi_parts import ADMIN, JSON, STR, TIME, errors, json_body, obj, ref
from gateway.store.names import LABEL_PATTERN

__all__ = ["DEVICE", "PATHS", "SCHEMAS"]

_NULL_TIME: dict[str, Any] = {"type": ["string", "null"], "format": "date-time"}
_PROPS: dict[str, Any] = {
    "id": STR,
    "name": {"type": "string", "description": "a DNS label, unique among the devices"},
    "public_key": STR,
    "fingerprint": STR,
    "identity": ref("Identity"),
    "addresses": {"type": "array", "items": STR, "minItems": 2, "maxItems": 2},
    "tags": {"type": "array", "items": STR},
    "endpoints": {"type": "array", "items": STR},
    "routes": {"type": "array", "items": STR},
    "created_at": TIME,
    "expires_at": _NULL_TIME,
    "last_seen": _NULL_TIME,
    "key_rotated_at": _NULL_TIME,
    "ephemeral": {"type": "boolean"},
    "agent": {
        "oneOf": [{"type": "null"}, obj({"version": STR, "os": STR})],
        "description": "the agent's version and operating system as it last said (null: not"
        " said yet)",
    },
}
DEVICE = obj(_PROPS)
_ONLINE = {
    "type": "boolean",
    "description": "its agent holds a map stream (on this gateway, or with replicas on any:"
    " recorded within two sweep intervals)",
}

SCHEMAS: dict[str, Any] = {
    "ListedDevice": obj({**_PROPS, "online": _ONLINE}),
    "DeviceUpdate": {
        **obj(
            {
                "name": {"type": "string", "pattern": LABEL_PATTERN},
                "tags": {
                    "type": "array",
                    "maxItems": 32,
                    "items": {"type": "string", "pattern": TAG_PATTERN},
                },
            },
            [],
        ),
        "minProperties": 1,
    },
    "DeviceUpdated": obj({"device": ref("Device"), "map_version": {"type": "integer"}}),
    "DeviceExpired": obj({"device_id": STR, "reason": STR, "map_version": {"type": "integer"}}),
    "Whois": obj(
        {
            "device": obj({"id": STR, "name": STR, "tags": {"type": "array", "items": STR}}),
            "owner": obj(
                {
                    "issuer": STR,
                    "subject": STR,
                    "kind": {
                        "type": "string",
                        "enum": ["person", "workload", "enrollment-key", "identity"],
                    },
                    "via": {
                        "type": ["string", "null"],
                        "description": "the configured issuer's name (or how it was approved)",
                    },
                    "email": {
                        "type": ["string", "null"],
                        "description": "a person's verified email, once they approved on the web",
                    },
                    "name": {"type": ["string", "null"], "description": "a person's name"},
                }
            ),
        }
    ),
}

_ID = [{"name": "id", "in": "path", "required": True, "schema": STR}]
_FILTERS = [
    {"name": "tag", "in": "query", "schema": STR,
     "description": "only devices with this tag (repeat: with every one)"},
    {"name": "online", "in": "query", "schema": {"type": "string", "enum": ["true", "false"]}},
    {"name": "owner", "in": "query", "schema": STR,
     "description": "only devices whose identity has this subject"},
]  # fmt: skip

PATHS: dict[str, Any] = {
    "/api/v1/devices": {
        "get": {
            "summary": "List devices with tags, owner, presence and last seen",
            "security": ADMIN,
            "parameters": _FILTERS,
            "responses": {
                "200": json_body(
                    obj({"devices": {"type": "array", "items": ref("ListedDevice")}}), "devices"
                ),
                **errors(400, 401, 403),
            },
        }
    },
    "/api/v1/devices/{id}": {
        "parameters": _ID,
        "get": {
            "summary": "Show a device",
            "security": ADMIN,
            "responses": {
                "200": json_body(ref("ListedDevice"), "the device"),
                **errors(401, 403, 404),
            },
        },
        "patch": {
            "summary": "Rename a device and/or replace its tags (a map change every peer gets)",
            "description": "`name` must be a DNS label no other device has (409 `name_taken`);"
            " `tags` replace the device's tags, and the policy decides its peers again.",
            "security": ADMIN,
            "requestBody": {"required": True, "content": {JSON: {"schema": ref("DeviceUpdate")}}},
            "responses": {
                "200": json_body(ref("DeviceUpdated"), "changed"),
                **errors(400, 401, 403, 404, 409, 413, 415),
            },
        },
        "delete": {
            "summary": "Delete a device (its stream is revoked)",
            "security": ADMIN,
            "responses": {"204": {"description": "deleted"}, **errors(401, 403, 404)},
        },
    },
    "/api/v1/devices/self/whois": {
        "get": {
            "summary": "Who owns a device the caller peers with, or the caller (wiregate whois)",
            "security": [{"deviceToken": []}],
            "parameters": [{"name": "device", "in": "query", "required": True, "schema": STR}],
            "responses": {
                "200": json_body(ref("Whois"), "the device, its tags and its owner"),
                **errors(400, 401, 404),
            },
        }
    },
    "/api/v1/devices/{id}/expire": {
        "parameters": _ID,
        "post": {
            "summary": "Expire a device's key now (peers drop it; its agent is told)",
            "security": ADMIN,
            "responses": {
                "200": json_body(ref("DeviceExpired"), "expired and removed"),
                **errors(401, 403, 404),
            },
        },
    },
}

LOGIN_LIST: dict[str, Any] = {
    "summary": "List the login requests waiting for approval (never their codes)",
    "security": ADMIN,
    "responses": {
        "200": json_body(obj({"requests": {"type": "array", "items": ref("Login")}}), "pending"),
        **errors(401, 403),
    },
}
