"""Coverage-guided fuzzing of what agents send on the map stream (wiregate/mapwire.py).

Properties: ``parse_agent_message`` raises only :class:`BadInput`; what it
accepts has at most MAX_ENDPOINTS endpoints, each in canonical form (a fixed
point of ``parse_endpoint``), and a known NAT type or none.
"""

from __future__ import annotations

import json

import atheris
from _harness import PROJECT, fuzz

with atheris.instrument_imports(include=PROJECT):
    from wiregate.errors import BadInput
    from wiregate.mapwire import MAX_ENDPOINTS, NAT_TYPES, parse_agent_message, parse_endpoint


def seeds() -> list[bytes]:
    docs = [
        {"type": "endpoints", "endpoints": ["192.0.2.1:51820", "[2001:db8::1]:51820"]},
        {"type": "endpoints", "endpoints": ["198.51.100.7:4500"], "nat": "eim"},
        {"type": "endpoints", "endpoints": [], "nat": "udp-blocked"},
    ]
    return [json.dumps(d).encode() for d in docs]


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")  # a WebSocket text frame is valid UTF-8
    try:
        report = parse_agent_message(text)
    except BadInput:
        return
    assert len(report.endpoints) <= MAX_ENDPOINTS
    assert report.nat is None or report.nat in NAT_TYPES
    assert all(parse_endpoint(e) == e for e in report.endpoints), report.endpoints


if __name__ == "__main__":
    fuzz(test_one_input, seeds())
