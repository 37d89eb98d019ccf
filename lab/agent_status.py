"""A sample of the agent's status document, as its metrics endpoint reads it."""

from __future__ import annotations

from typing import Any

NOW = 1_700_000_000.0


def peer(name: str, path: str | None, handshake: float | None, rx: int = 0) -> dict[str, Any]:
    report = None if path is None else {"path": path, "state": path, "reason": ""}
    return {
        "id": f"dev-{name}",
        "name": name,
        "path": report,
        "last_handshake": handshake,
        "rx_bytes": rx,
        "tx_bytes": 2 * rx,
    }


def status_document() -> dict[str, Any]:
    """What ``Agent.status()`` returns, plus the metrics' own ``agent`` section."""
    return {
        "device": {"id": "dev-me", "name": "me", "expires_at": NOW + 86_400},
        "interface": "wg0",
        "backend": "userspace",
        "gateway": {"connected": True, "map_version": 42, "last_sync": NOW - 3, "reconnects": 2},
        "problems": ["peer x: overlapping allowed IPs"],
        "netcheck": {"nat_type": "eim"},
        "pmtu": {"searches": 1, "probes": 9, "probes_lost": 1, "frag_needed": 0, "black_holes": 0},
        "peers": [
            peer("a", "direct", NOW - 10, rx=100),
            peer("b", "relayed", NOW - 200),
            peer("c", "probing", None),
            peer("d", None, None),
        ],
        "agent": {"applies": 5, "apply_failures": 1, "apply_writes": 12, "last_rotation": NOW},
        "firewall": {"packets": 7, "bytes": 420},
    }
