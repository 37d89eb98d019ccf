"""OpenAPI pieces for the path matrix (``GET /api/v1/paths``).

Merged into :data:`gateway.api.openapi.DOCUMENT`.
"""

from __future__ import annotations

from typing import Any

from gateway.api.openapi_parts import ADMIN, STR, TIME, errors, json_body, obj, ref
from wiregate.pathwire import LIMITS, MAX_REASON, PATH_KINDS

__all__ = ["PATHS", "SCHEMAS"]


def _range(field: str, kind: str, nullable: bool = False) -> dict[str, Any]:
    low, high = LIMITS[field]
    return {"type": [kind, "null"] if nullable else kind, "minimum": low, "maximum": high}


_NODE = obj({"id": STR, "name": STR})

SCHEMAS: dict[str, Any] = {
    "PathPair": obj(
        {
            "reporter": _NODE,
            "peer": _NODE,
            "path_mtu": _range("path_mtu", "integer", nullable=True),
            "black_hole": {"type": "boolean"},
            "frag_needed": _range("frag_needed", "integer"),
            "probe_failures": _range("probe_failures", "integer"),
            "path": {"type": "string", "enum": sorted(PATH_KINDS)},
            "relay": {"type": ["string", "null"]},
            "reason": {"type": "string", "maxLength": MAX_REASON},
            "handshake_age": _range("handshake_age", "number", nullable=True),
            "rtt_ms": _range("rtt_ms", "number", nullable=True),
            "reported_at": TIME,
            "age": {"type": "number", "minimum": 0},
            "stale": {"type": "boolean"},
        }
    ),
}

_FILTERS = [
    {"name": "device", "in": "query", "schema": STR,
     "description": "only pairs this device reported or is the peer of"},
    {"name": "black_hole", "in": "query", "schema": {"type": "string", "enum": ["true", "false"]}},
]  # fmt: skip

PATHS: dict[str, Any] = {
    "/api/v1/paths": {
        "get": {
            "summary": "The fleet's path matrix: each agent's path to each peer",
            "description": "One entry per (reporter, peer) pair, as the reporter's agent last"
            " reported it: path MTU, black hole, fragmentation-needed and lost-probe counts,"
            " direct or relayed (and why), handshake age, RTT. `age` is seconds since the"
            " report; `stale` once it passes 900 s.",
            "security": ADMIN,
            "parameters": _FILTERS,
            "responses": {
                "200": json_body(
                    obj({"paths": {"type": "array", "items": ref("PathPair")}}), "the pairs"
                ),
                **errors(400, 401, 403),
            },
        }
    },
}
