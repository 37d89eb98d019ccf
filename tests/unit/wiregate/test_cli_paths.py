"""``wiregate admin paths``: the matrix drawn from the API's JSON, and the command
against a real gateway app on a unix socket (no reports yet, a refused device id)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.unit.wiregate.test_cli_lifecycle import admin, invoke, socket_path
from wiregate.cli.admin_paths import render_matrix

__all__ = ["socket_path"]  # the fixture the tests take


def pair(a: str, b: str, mtu: int | None, **over: Any) -> dict[str, Any]:
    doc = {"reporter": {"id": a, "name": a}, "peer": {"id": b, "name": b}, "path_mtu": mtu,
           "black_hole": False, "path": "direct", "reason": "handshake", "stale": False,
           "age": 3.0}  # fmt: skip
    return doc | over


def test_the_matrix_marks_relayed_pairs_black_holes_and_stale_reports() -> None:
    text = render_matrix({"paths": [
        pair("alpha", "bravo", 1420),
        pair("bravo", "alpha", 1340, path="relayed", black_hole=True, reason="no direct path"),
        pair("alpha", "charlie", None, stale=True, age=1200.0),
    ]})  # fmt: skip
    lines = text.splitlines()
    assert lines[1].split() == ["alpha", "bravo", "charlie"]
    assert lines[2].split() == ["alpha", "·", "1420", "-"]
    assert lines[3].split() == ["bravo", "1340r!", "·"]
    assert "  bravo -> alpha: black hole; relayed, no direct path" in lines
    assert "  alpha -> charlie: stale report (1200 s old); direct, handshake" in lines
    assert render_matrix({"paths": []}) == "no path reports yet"


def test_the_command_reads_the_gateway(socket_path: Path) -> None:
    assert admin(socket_path, "paths") == "no path reports yet\n"
    assert json.loads(admin(socket_path, "paths", "--json")) == {"paths": []}
    refused = invoke(socket_path, "paths", "--device", "x" * 40)
    assert refused.exit_code == 1 and "device must be a device id" in refused.output
