"""The systemd units in deploy/systemd pass systemd's own verifier and stay hardened."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "systemd").glob("*.service"))
WIREGATE = Path(sys.executable).with_name("wiregate")


def _installed_copy(unit: Path, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's wiregate (the verifier checks it)."""
    text = unit.read_text().replace("/usr/local/bin/wiregate", str(WIREGATE))
    copy = tmp_path / unit.name
    copy.write_text(text)
    return copy


def test_there_are_units() -> None:
    assert {u.name for u in UNITS} == {"wiregate-agent.service", "wiregate-gateway.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    verifier = shutil.which("systemd-analyze")
    assert verifier, "systemd-analyze is missing: scripts/setup.sh installs systemd"
    proc = subprocess.run(
        [verifier, "verify", str(_installed_copy(unit, tmp_path))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert unit.name not in proc.stderr, proc.stderr  # no warning about our unit


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_secrets_never_on_the_command_line(unit: Path) -> None:
    exec_start = re.search(r"^ExecStart=(.*?)(?<!\\)$", unit.read_text(), re.M | re.S)
    assert exec_start is not None
    assert "auth-key" not in exec_start.group(1) and "wgk_" not in exec_start.group(1)


def test_agent_keeps_the_tunnel_when_it_stops() -> None:
    text = (UNITS[0].parent / "wiregate-agent.service").read_text()
    assert "KillMode=process" in text  # wireguard-go outlives the agent (fail static)
    assert "RestartPreventExitStatus=3" in text  # a removed device is not restarted
    assert re.search(r"^RuntimeDirectory=.*\bwireguard\b", text, re.M)  # UAPI sockets writable


def test_gateway_unit_and_wiregate_admin_agree_on_the_admin_socket() -> None:
    from wiregate.settings import ADMIN_SOCKET, GatewaySettings

    text = (UNITS[0].parent / "wiregate-gateway.service").read_text()
    runtime = re.search(r"^RuntimeDirectory=(\S+)$", text, re.M)
    assert runtime is not None
    exec_start = re.search(r"^ExecStart=(.*?)(?<!\\)$", text, re.M | re.S)
    assert exec_start is not None
    # not overridden on the command line: the config file's admin_socket (or the
    # default) is what both the gateway and `wiregate admin --config` use
    assert "--admin-socket" not in exec_start.group(1)
    assert Path("/run") / runtime.group(1) / "gateway.sock" == ADMIN_SOCKET
    assert GatewaySettings.model_fields["admin_socket"].default == ADMIN_SOCKET
    help_text = subprocess.run(
        [str(WIREGATE), "admin", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert str(ADMIN_SOCKET) in " ".join(help_text.split())


def test_gateway_unit_hands_secrets_over_as_credentials(tmp_path: Path) -> None:
    """DynamicUser= cannot read root-only files: LoadCredential= copies them to %d."""
    unit = UNITS[0].parent / "wiregate-gateway.service"
    text = unit.read_text()
    assert "DynamicUser=yes" in text
    lines = re.findall(r"^#?LoadCredential=([\w-]+):(/etc/wiregate/\S+)$", text, re.M)
    assert {name for name, _ in lines} == {"admin-token", "oidc-corp"}
    assert 'admin_token_file = "%d/admin-token"' in text
    verifier = shutil.which("systemd-analyze")
    assert verifier
    enabled = tmp_path / unit.name  # with the credentials in use, the unit still verifies
    enabled.write_text(
        _installed_copy(unit, tmp_path).read_text().replace("#LoadCredential=", "LoadCredential=")
    )
    proc = subprocess.run([verifier, "verify", str(enabled)], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 0 and unit.name not in proc.stderr, proc.stderr
