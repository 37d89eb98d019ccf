"""``wiregate admin report`` against a real gateway app on a unix socket: text by
default (verdicts with the data they rest on), the gateway's JSON with ``--json``,
the gateway's one-line refusal of a bad period."""

from __future__ import annotations

import json
from pathlib import Path

import structlog
from click.testing import CliRunner

from tests.unit.wiregate.test_cli_lifecycle import admin, invoke, socket_path
from wiregate.cli.main import main

__all__ = ["socket_path"]  # the fixture the tests take


def test_the_report_as_text_and_as_json(socket_path: Path) -> None:
    created = json.loads(admin(socket_path, "keys", "create", "--json"))
    assert created["secret"]
    text = admin(socket_path, "report")
    assert text.startswith("EVIDENCE REPORT ")
    assert "[FAIL] host_traffic: host traffic: not shown to be encrypted" in text
    assert "[PASS] pairs_without_live_handshake: 0 of 0 pairs" in text
    assert "rests on: devices (store), as GET /api/v1/devices: 0" in text
    assert "policy sha256 " in text and created["secret"] not in text
    data = json.loads(admin(socket_path, "report", "--json", "--max-key-age", "30",
                            "--since", "2023-01-01T00:00:00Z"))  # fmt: skip
    assert data["max_key_age_days"] == 30 and data["period"]["since"] == "2023-01-01T00:00:00Z"
    assert {v["id"] for v in data["verdicts"]} >= {"keys_over_max_age", "host_traffic"}


def test_a_bad_period_is_refused_in_one_line(socket_path: Path) -> None:
    result = invoke(socket_path, "report", "--since", "soon")
    assert result.exit_code == 1
    assert "since must be an RFC 3339 time or POSIX seconds" in result.output
    out = invoke(socket_path, "report", "--json", "--since", "200", "--until", "100")
    assert out.exit_code == 1 and "since must be before until" in out.output


def test_wiregate_report_is_admin_report(socket_path: Path) -> None:
    """``wiregate report`` takes the admin group's connection options and the report's."""
    admin(socket_path, "keys", "create", "--json")
    with structlog.testing.capture_logs():
        top = CliRunner().invoke(main, ["report", "--socket", str(socket_path), "--json",
                                        "--max-key-age", "30"])  # fmt: skip
    assert top.exit_code == 0, top.output
    short, full = json.loads(top.output), json.loads(admin(socket_path, "report", "--json",
                                                           "--max-key-age", "30"))  # fmt: skip
    for doc in (short, full):
        del doc["generated_at"]  # the only figure that moves between the two calls
    assert short == full and short["max_key_age_days"] == 30
    with structlog.testing.capture_logs():
        bad = CliRunner().invoke(main, ["report", "--socket", str(socket_path), "--since", "x"])
    assert bad.exit_code == 1 and "since must be an RFC 3339 time" in bad.output
