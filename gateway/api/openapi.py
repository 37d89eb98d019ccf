"""The OpenAPI 3.1 description of the gateway's HTTP API, as data.

A test checks that every route the app registers is described here and that
nothing described here is missing from the app.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.api.enroll import MAX_ENDPOINTS, NAME_PATTERN
from gateway.api.keys import MAX_EXPIRY, TAG_PATTERN
from gateway.api.login import ADMIN_NAME_PATTERN
from gateway.api.openapi_devices import DEVICE, LOGIN_LIST
from gateway.api.openapi_devices import PATHS as DEVICE_PATHS
from gateway.api.openapi_devices import SCHEMAS as DEVICE_SCHEMAS
from gateway.api.openapi_lifecycle import PATHS as LIFECYCLE_PATHS
from gateway.api.openapi_lifecycle import SCHEMAS as LIFECYCLE_SCHEMAS
from gateway.api.openapi_parts import JSON
from gateway.api.openapi_parts import STR as _STR
from gateway.api.openapi_parts import TIME as _TIME
from gateway.api.openapi_parts import errors as _errors
from gateway.api.openapi_parts import json_body as _json
from gateway.api.openapi_parts import obj as _obj
from gateway.api.openapi_parts import ref as _ref
from gateway.api.openapi_paths import PATHS as PATH_MATRIX_PATHS
from gateway.api.openapi_paths import SCHEMAS as PATH_MATRIX_SCHEMAS
from gateway.api.openapi_policy import PATHS as POLICY_PATHS
from gateway.api.openapi_policy import SCHEMAS as POLICY_SCHEMAS
from gateway.api.openapi_report import PATHS as REPORT_PATHS
from gateway.api.openapi_report import SCHEMAS as REPORT_SCHEMAS
from wiregate.mapwire import MAX_ROUTES

__all__ = ["DOCUMENT", "routes"]

routes = web.RouteTableDef()
_TAGS: dict[str, Any] = {"type": "array", "items": {"type": "string", "pattern": TAG_PATTERN}}


_SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _STR, "message": _STR, "hint": _STR}, ["error", "message"]),
    "Identity": _obj({"issuer": _STR, "subject": _STR}),
    "Device": DEVICE,
    "Key": _obj(
        {
            "id": _STR,
            "tags": _TAGS,
            "reusable": {"type": "boolean"},
            "ephemeral": {"type": "boolean"},
            "description": _STR,
            "created_at": _TIME,
            "expires_at": _TIME,
            "used_count": {"type": "integer", "minimum": 0},
            "revoked": {"type": "boolean"},
            "device_key_expiry": {"type": ["number", "null"], "description": "seconds"},
        }
    ),
    "EnrollRequest": _obj(
        {
            "auth_key": {"type": "string", "description": "enrollment key secret, wgk_..."},
            "workload_token": {
                "type": "string",
                "maxLength": 16384,
                "description": "instead of auth_key: a JWT of a trusted workload issuer "
                "(OIDC or a Kubernetes ServiceAccount token), audience = the gateway",
            },
            "public_key": {"type": "string", "description": "WireGuard public key, base64"},
            "name": {"type": "string", "pattern": NAME_PATTERN},
            "endpoints": {"type": "array", "items": _STR, "maxItems": MAX_ENDPOINTS},
            "routes": {"type": "array", "items": _STR, "maxItems": MAX_ROUTES},
        },
        ["public_key", "name"],  # and exactly one of auth_key, workload_token
    ),
    "EnrollResponse": _obj(
        {"device": _ref("Device"), "token": _STR, "map_version": {"type": "integer"}}
    ),
    "KeyRequest": _obj(
        {
            "tags": _TAGS,
            "expiry": {"type": "integer", "minimum": 1, "maximum": MAX_EXPIRY, "default": 3600},
            "reusable": {"type": "boolean", "default": False},
            "ephemeral": {"type": "boolean", "default": False},
            "description": {"type": "string", "maxLength": 255},
            "device_key_expiry": {
                "type": ["integer", "null"],
                "minimum": 60,
                "description": "lifetime (s) of the keys of devices it enrolls; null: none",
            },
        },
        [],
    ),
    "KeyCreated": _obj({"key": _ref("Key"), "secret": _STR}),
    "RelaySigners": _obj(
        {
            "signers": {
                "type": "array",
                "items": _obj(
                    {
                        "public_key": {"type": "string", "description": "Ed25519, base64"},
                        "tenants": {"type": "array", "items": _STR, "minItems": 1},
                    }
                ),
            }
        }
    ),
    "RelayRevocations": _obj(
        {
            "revoked": {
                "type": "array",
                "items": _obj(
                    {
                        "tenant": _STR,
                        "device_id": _STR,
                        "revoked_at": {"type": "number", "description": "unix seconds"},
                    }
                ),
            },
            "window": {"type": "integer", "description": "seconds a removal stays listed"},
        }
    ),
    "TicketRequest": _obj(
        {
            "peer": {"type": "string", "description": "the peer's device id"},
            "avoid": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[A-Za-z0-9._-]+$", "maxLength": 64},
                "maxItems": 8,
                "description": "relay ids this device could not use (suspect for the pair)",
            },
        },
        ["peer"],
    ),
    "Ticket": _obj(
        {
            "relay": _obj(
                {
                    "id": _STR,
                    "control": {"type": "string", "description": "host:port"},
                    "tcp": {
                        "type": "string",
                        "description": "host:port of the relay's TLS listener (WireGuard over"
                        " TCP where UDP is blocked); absent when the relay has none",
                    },
                },
                ["id", "control"],
            ),
            "ticket": {"type": "string", "description": "signed ticket for the caller, base64"},
            "expires_in": {"type": "integer", "description": "seconds the ticket is valid"},
        }
    ),
    "Relays": _obj(
        {
            "relays": {
                "type": "array",
                "items": _obj(
                    {
                        "id": _STR,
                        "control": {"type": "string", "description": "host:port"},
                        "up": {"type": "boolean", "description": "answers the gateway's PING"},
                        "rtt_ms": {"type": ["number", "null"]},
                        "allocations": {"type": "integer", "minimum": 0},
                        "capacity": {"type": "integer", "minimum": 0},
                        "load": {"type": ["number", "null"], "description": "allocations/capacity"},
                        "error": {"type": ["string", "null"], "description": "last probe failure"},
                    }
                ),
            }
        }
    ),
    "LoginRequest": _obj(
        {
            "public_key": {"type": "string", "description": "WireGuard public key, base64"},
            "name": {"type": "string", "pattern": NAME_PATTERN},
        }
    ),
    "LoginCreated": _obj(
        {
            "request_id": _STR,
            "user_code": {"type": "string", "description": "XXXX-XXXX, shown to the person"},
            "verification_uri": _STR,
            "verification_uri_complete": _STR,
            "poll_token": {"type": "string", "description": "secret; only for polling"},
            "interval": {"type": "integer", "description": "seconds between polls"},
            "expires_in": {"type": "integer", "description": "seconds"},
        }
    ),
    "PollRequest": _obj({"poll_token": _STR}),
    "PollResponse": _obj(
        {
            "status": {
                "type": "string",
                "enum": ["pending", "slow_down", "approved", "denied", "expired"],
            },
            "interval": {"type": "integer"},
            "device": _ref("Device"),
            "token": {"type": "string", "description": "device token, only once with approved"},
        },
        ["status", "interval"],
    ),
    "Login": _obj(
        {
            "request_id": _STR,
            "name": _STR,
            "public_key": _STR,
            "fingerprint": _STR,
            "status": _STR,
            "created_at": _TIME,
            "expires_at": _TIME,
        }
    ),
    "ApproveRequest": {
        **_obj(
            {
                "issuer": _STR,
                "subject": _STR,
                "as": {
                    "type": "string",
                    "pattern": ADMIN_NAME_PATTERN,
                    "description": "the approving administrator's name, in the audit log;"
                    " alone, the device belongs to the identity (wiregate:admin, NAME)",
                },
                "tags": _TAGS,
            },
            [],
        ),
        "dependentRequired": {"issuer": ["subject"], "subject": ["issuer"]},
        "anyOf": [{"required": ["issuer"]}, {"required": ["as"]}],
    },
    "Approved": _obj(
        {"login": _ref("Login"), "device": _ref("Device"), "map_version": {"type": "integer"}}
    ),
    "Health": {"type": "object", "properties": {"status": _STR}, "required": ["status"]},
    **LIFECYCLE_SCHEMAS,
    **POLICY_SCHEMAS,
    **DEVICE_SCHEMAS,
    **PATH_MATRIX_SCHEMAS,
    **REPORT_SCHEMAS,
}

_ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]
_ID = [{"name": "id", "in": "path", "required": True, "schema": _STR}]
_CODE = [{"name": "user_code", "in": "path", "required": True, "schema": _STR}]
_PATHS: dict[str, Any] = {
    "/api/v1/enroll": {
        "post": {
            "summary": "Enroll a device with an enrollment key",
            "security": [],
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("EnrollRequest")}}},
            "responses": {
                "201": _json(_ref("EnrollResponse"), "enrolled"),
                **_errors(400, 401, 409, 413, 415),
            },
        }
    },
    "/api/v1/stream": {
        "get": {
            "summary": "The agent's network map stream (WebSocket upgrade)",
            "security": [{"deviceToken": []}],
            "parameters": [
                {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0}}
            ],
            "responses": {"101": {"description": "switching to WebSocket"}, **_errors(400, 401)},
        }
    },
    "/api/v1/keys": {
        "get": {
            "summary": "List enrollment keys",
            "security": _ADMIN,
            "responses": {
                "200": _json(_obj({"keys": {"type": "array", "items": _ref("Key")}}), "keys"),
                **_errors(401, 403),
            },
        },
        "post": {
            "summary": "Create an enrollment key (the secret is returned only here)",
            "security": _ADMIN,
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("KeyRequest")}}},
            "responses": {
                "201": _json(_ref("KeyCreated"), "created"),
                **_errors(400, 401, 403, 413, 415),
            },
        },
    },
    "/api/v1/keys/{id}": {
        "parameters": _ID,
        "delete": {
            "summary": "Revoke an enrollment key",
            "security": _ADMIN,
            "responses": {"204": {"description": "revoked"}, **_errors(401, 403, 404)},
        },
    },
    "/api/v1/login/requests": {
        "get": LOGIN_LIST,
        "post": {
            "summary": "Start a device login (user code and poll token are returned only here)",
            "security": [],
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("LoginRequest")}}},
            "responses": {
                "201": _json(_ref("LoginCreated"), "created"),
                **_errors(400, 409, 413, 415, 429),
            },
        },
    },
    "/api/v1/login/poll": {
        "post": {
            "summary": "Poll a device login (RFC 8628 semantics: slow_down, expired)",
            "security": [],
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("PollRequest")}}},
            "responses": {
                "200": _json(_ref("PollResponse"), "the login's status"),
                **_errors(400, 401, 413, 415),
            },
        }
    },
    "/api/v1/login/requests/{user_code}": {
        "parameters": _CODE,
        "get": {
            "summary": "Show the pending login a user code names (name, key fingerprint)",
            "security": _ADMIN,
            "responses": {
                "200": _json(_ref("Login"), "the pending login"),
                **_errors(400, 401, 403, 404, 429),
            },
        },
    },
    "/api/v1/login/requests/{user_code}/approve": {
        "parameters": _CODE,
        "post": {
            "summary": "Approve a pending login for an identity: its device is enrolled",
            "security": _ADMIN,
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": _ref("ApproveRequest")}},
            },
            "responses": {
                "200": _json(_ref("Approved"), "approved and enrolled"),
                **_errors(400, 401, 403, 404, 409, 413, 415, 429),
            },
        },
    },
    "/api/v1/login/requests/{user_code}/deny": {
        "parameters": _CODE,
        "post": {
            "summary": "Deny a pending login",
            "security": _ADMIN,
            "responses": {
                "200": _json(_ref("Login"), "denied"),
                **_errors(400, 401, 403, 404, 409, 429),
            },
        },
    },
    "/api/v1/relay/signers": {
        "get": {
            "summary": "The gateway's relay ticket signers, as a relay's verify_keys_file",
            "security": [],
            "responses": {"200": _json(_ref("RelaySigners"), "signers")},
        }
    },
    "/api/v1/relay/revocations": {
        "get": {
            "summary": "Devices removed lately, for relays (conditional GET with ETag)",
            "security": [],
            "responses": {
                "200": _json(_ref("RelayRevocations"), "devices removed in the window"),
                "304": {"description": "unchanged since the If-None-Match ETag"},
            },
        }
    },
    "/api/v1/relay/tickets": {
        "post": {
            "summary": "A relay ticket for the calling device to reach a peer",
            "security": [{"deviceToken": []}],
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": _ref("TicketRequest")}},
            },
            "responses": {
                "201": _json(_ref("Ticket"), "issued"),
                **_errors(400, 401, 403, 404, 413, 415, 503),
            },
        }
    },
    "/api/v1/relays": {
        "get": {
            "summary": "Every relay with the gateway's view: up/down, RTT, load",
            "security": [{"deviceToken": []}, *_ADMIN],
            "responses": {"200": _json(_ref("Relays"), "relays"), **_errors(401, 403)},
        }
    },
    "/api/v1/openapi.json": {
        "get": {
            "summary": "This document",
            "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1 document"}},
        }
    },
    "/bootstrap.sh": {
        "get": {
            "summary": "The VM bootstrap script (deploy/bootstrap.sh), no credential needed",
            "security": [],
            "responses": {
                "200": {
                    "description": "the script",
                    "content": {"text/x-shellscript": {"schema": _STR}},
                },
                "304": {"description": "unchanged (If-None-Match)"},
            },
        }
    },
    "/simple/": {
        "get": {
            "summary": "PEP 503 simple index of the wheelhouse (wheelhouse_dir), no credential",
            "security": [],
            "responses": {"200": {"description": "HTML, one anchor per project"}, **_errors(404)},
        }
    },
    "/simple/{project}/": {
        "get": {
            "summary": "The wheels of one project, each anchor with a #sha256= fragment",
            "security": [],
            "parameters": [{"name": "project", "in": "path", "required": True, "schema": _STR}],
            "responses": {
                "200": {"description": "HTML, one anchor per wheel"},
                "301": {"description": "to the normalized project name (PEP 503)"},
                **_errors(404),
            },
        }
    },
    "/wheels/requirements-{platform}.txt": {
        "get": {
            "summary": "Every package pinned with --hash lines, for x86_64 or aarch64",
            "security": [],
            "parameters": [{"name": "platform", "in": "path", "required": True, "schema": _STR}],
            "responses": {
                "200": {"description": "pip requirements (--require-hashes)"},
                **_errors(404),
            },
        }
    },
    "/wheels/{file}": {
        "get": {
            "summary": "A wheel the wheelhouse's index lists",
            "security": [],
            "parameters": [{"name": "file", "in": "path", "required": True, "schema": _STR}],
            "responses": {"200": {"description": "the wheel"}, **_errors(404)},
        }
    },
    "/livez": {
        "get": {
            "summary": "The process is up",
            "security": [],
            "responses": {"200": _json(_ref("Health"), "alive")},
        }
    },
    "/readyz": {
        "get": {
            "summary": "The store answers and its schema is current",
            "security": [],
            "responses": {
                "200": _json(_ref("Health"), "ready"),
                "503": _json(_ref("Health"), "not ready"),
            },
        }
    },
    **LIFECYCLE_PATHS,
    **POLICY_PATHS,
    **DEVICE_PATHS,
    **PATH_MATRIX_PATHS,
    **REPORT_PATHS,
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "wiregate gateway", "version": "1"},
    "paths": _PATHS,
    "components": {
        "schemas": _SCHEMAS,
        "responses": {"Error": _json(_ref("Error"), "refused; nothing was changed")},
        "securitySchemes": {
            "adminToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "admin token file; not needed on the admin unix socket",
            },
            "deviceToken": {"type": "http", "scheme": "bearer"},
        },
    },
}


@routes.get("/api/v1/openapi.json")
async def openapi(_request: web.Request) -> web.Response:
    """Serve the OpenAPI document."""
    return web.json_response(DOCUMENT)
