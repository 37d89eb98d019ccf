"""The CLI refuses secrets in argv and parses durations strictly."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from wiregate.cli.admin import parse_duration
from wiregate.cli.device import format_status
from wiregate.cli.main import main


def test_auth_key_literal_in_argv_is_refused() -> None:
    result = CliRunner().invoke(main, ["agent", "--auth-key", "wgk_secretvalue"])
    assert result.exit_code == 2
    assert "file:PATH or env:VAR" in result.output


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("15m", 900), ("1h", 3600), ("7d", 604800)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1y", "-5m", "1.5h", "h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_duration(text)


def test_status_table_lists_peers_and_problems() -> None:
    doc = {
        "device": {"id": "d1", "name": "a", "addresses": ["100.64.0.1/32"]},
        "interface": "wg0",
        "backend": "userspace",
        "gateway": {"server": "http://gw", "connected": True, "map_version": 4},
        "peers": [
            {
                "name": "b",
                "addresses": ["100.64.0.2/32"],
                "endpoint": "198.51.100.2:51820",
                "last_handshake": None,
                "rx_bytes": 10,
                "tx_bytes": 20,
            }
        ],
        "problems": ["peer x: allowed IPs overlap"],
    }
    text = format_status(doc)
    assert "100.64.0.2" in text and "never" in text and "map v4" in text
    assert "problem: peer x" in text and "pods:" not in text
    doc["pods"] = {"reported": 12, "messages": 3, "lists": 1, "refused": False}
    assert "pods: 12 reported (3 messages, 1 lists)" in format_status(doc)


def test_admin_without_gateway_fails_clearly(tmp_path: object) -> None:
    result = CliRunner().invoke(main, ["admin", "--socket", "/nonexistent/gw.sock", "keys", "list"])
    assert result.exit_code == 1
    assert "cannot reach the gateway admin API" in result.output
