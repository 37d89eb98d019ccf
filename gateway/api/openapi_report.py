"""OpenAPI pieces for the evidence report (``GET /api/v1/report``).

Merged into :data:`gateway.api.openapi.DOCUMENT`.
"""

from __future__ import annotations

from typing import Any

from gateway.api.openapi_parts import ADMIN, STR, TIME, errors, json_body, obj, ref

__all__ = ["PATHS", "SCHEMAS"]

_NTIME: dict[str, Any] = {"type": ["string", "null"], "format": "date-time"}
_NSTR: dict[str, Any] = {"type": ["string", "null"]}
_STRS: dict[str, Any] = {"type": "array", "items": STR}
_SOURCE = obj({"data": STR, "count": {"type": ["integer", "null"]}, "as_of": _NTIME})
_SOURCES = {"type": "array", "items": _SOURCE}
_NODE = obj({"id": STR, "name": STR})
_EVENT = obj({"at": TIME, "actor": STR, "action": STR, "target": STR,
              "detail": {"type": "object", "additionalProperties": STR}})  # fmt: skip
_EVENTS = {"type": "array", "items": _EVENT}

SCHEMAS: dict[str, Any] = {
    "ReportVerdict": obj({
        "id": STR, "result": {"type": "string", "enum": ["pass", "fail", "info"]},
        "text": STR, "items": _STRS, "rests_on": _SOURCES,
    }),
    "ReportStatement": obj({"id": STR, "text": STR, "rests_on": _SOURCES}),
    "ReportDevice": obj({
        "id": STR, "name": STR, "owner": STR, "tags": _STRS, "online": {"type": "boolean"},
        "last_seen": _NTIME, "created_at": TIME, "key_since": TIME,
        "key_age_days": {"type": "number"}, "expires_at": _NTIME,
        "rotations": {"type": "integer"}, "approvals": {"type": "integer"},
        "routes": _STRS, "carried_routes": _STRS,
    }),
    "ReportPair": obj({
        "a": _NODE, "b": _NODE,
        "status": {"type": "string", "enum": ["encrypted", "no-live-handshake", "unknown"]},
        "path": _NSTR, "relay": _NSTR, "handshake_age": {"type": ["number", "null"]},
        "reported_at": _NTIME,
    }),
    "Report": obj({
        "period": obj({"since": TIME, "until": TIME}),
        "generated_at": TIME,
        "max_key_age_days": {"type": "number"},
        "verdicts": {"type": "array", "items": ref("ReportVerdict")},
        "statements": {"type": "array", "items": ref("ReportStatement")},
        "devices": {"type": "array", "items": ref("ReportDevice")},
        "identities": {"type": "array", "items": obj({
            "id": {"type": "integer"}, "owner": STR, "created_at": TIME,
            "disabled": {"type": "boolean"}, "devices": {"type": "integer"},
        })},
        "pairs": {"type": "array", "items": ref("ReportPair")},
        "events": obj({"rotations": _EVENTS, "approvals": _EVENTS, "revocations": _EVENTS,
                       "policy": _EVENTS}),
        "policy": obj({"hash": STR, "source": STR, "version": {"type": "integer"},
                       "set_at": _NTIME, "set_by": _NSTR}),
        "relays": obj({"configured": _STRS, "in_reports": _STRS}),
        "host_traffic": obj({"mode": _NSTR, "available": {"type": "boolean"}}),
    }),
}  # fmt: skip

_PARAMS = [
    {"name": "since", "in": "query", "schema": STR,
     "description": "RFC 3339 time or POSIX seconds (default: 30 days before until)"},
    {"name": "until", "in": "query", "schema": STR,
     "description": "RFC 3339 time or POSIX seconds (default: now)"},
    {"name": "max_key_age_days", "in": "query",
     "schema": {"type": "integer", "minimum": 1, "maximum": 3650},
     "description": "keys older than this fail the keys_over_max_age verdict (default 90)"},
]  # fmt: skip

PATHS: dict[str, Any] = {
    "/api/v1/report": {
        "get": {
            "summary": "The evidence report: keys, encryption coverage, policy, relays",
            "description": "For a period: every device and identity with key age, rotations,"
            " expiry, approvals and revocations (audit log); whether each pair the policy lets"
            " talk has a live handshake (`unknown` without a fresh report); routes leaving the"
            " tunnel; host traffic; the policy in force and its hash; relays. Every verdict and"
            " statement names the data it rests on (`rests_on`).",
            "security": ADMIN,
            "parameters": _PARAMS,
            "responses": {"200": json_body(ref("Report"), "the report"), **errors(400, 401, 403)},
        }
    },
}
