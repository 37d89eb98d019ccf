"""``wiregate admin policy get | set FILE | reset`` against a real gateway app on a unix
socket: a refused document prints one line and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.wiregate import test_cli_lifecycle as served

socket_path = served.socket_path  # the fixture: a gateway app on a unix socket
invoke, admin = served.invoke, served.admin

DOC = "acls:\n  - {src: ['tag:a'], dst: ['tag:b'], ports: ['tcp:5432']}\n"
TESTS = "tests:\n  - {src: tag:a, accept: ['tag:b:5432'], deny: ['tag:b:22']}\n"


def test_set_get_and_reset(socket_path: Path, tmp_path: Path) -> None:
    before = json.loads(admin(socket_path, "policy", "get", "--json"))["policy"]
    assert before["source"] == "default"
    policy = tmp_path / "policy.yaml"
    policy.write_text(DOC + TESTS)
    out = admin(socket_path, "policy", "set", str(policy))
    assert out.startswith("policy in force: source api, sha256 ")
    assert out.endswith("(was none)\n")  # nothing was ever stored: the built-in default
    assert "unchanged" in admin(socket_path, "policy", "set", str(policy))
    result = invoke(socket_path, "policy", "get")
    assert result.exit_code == 0 and result.stdout == DOC + TESTS
    assert (
        result.stderr.startswith("# source api, sha256 ") and "set by admin:socket" in result.stderr
    )
    reset = json.loads(admin(socket_path, "policy", "reset", "--json"))
    assert reset["changed"] and reset["policy"]["source"] == "default"


def test_a_refused_document_prints_one_line_and_changes_nothing(
    socket_path: Path, tmp_path: Path
) -> None:
    before = admin(socket_path, "policy", "get", "--json")
    failing = tmp_path / "failing.yaml"
    failing.write_text(DOC + TESTS.replace("tag:b:22", "tag:b:5432"))
    result = invoke(socket_path, "policy", "set", str(failing))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: policy refused: policy test failed: tests[0] (src tag:a): tag:b:5432 should be "
        "denied but is accepted"
    ]
    toml = tmp_path / "policy.toml"
    toml.write_text("rules = []\n")
    result = invoke(socket_path, "policy", "set", str(toml))
    assert result.exit_code == 1 and "sent as YAML (.yaml, .yml) or JSON" in result.stderr
    assert admin(socket_path, "policy", "get", "--json") == before
