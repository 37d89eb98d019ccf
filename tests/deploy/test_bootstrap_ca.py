"""bootstrap.sh --ca-file: the gateway's private CA is installed and configured for the agent."""

from __future__ import annotations

import stat
from pathlib import Path

from lab.tls import LabCA
from tests.deploy.test_bootstrap_script import Sandbox, box

__all__ = ["box"]


def test_ca_file_is_copied_and_configured(box: Sandbox, tmp_path: Path) -> None:
    ca = LabCA.create(tmp_path / "ca")
    done = box.install("--ca-file", str(ca.ca_file))
    assert done.returncode == 0, done.stderr
    etc = box.root / "etc/wiregate"
    assert (etc / "ca.pem").read_bytes() == ca.ca_file.read_bytes()
    assert stat.S_IMODE((etc / "ca.pem").stat().st_mode) == 0o644
    assert f'ca_file = "{etc}/ca.pem"' in (etc / "agent.toml").read_text()


def test_without_ca_file_no_ca_is_configured(box: Sandbox) -> None:
    done = box.install()
    assert done.returncode == 0, done.stderr
    assert "\nca_file = " not in (box.root / "etc/wiregate/agent.toml").read_text()
    assert not (box.root / "etc/wiregate/ca.pem").exists()


def test_an_unreadable_or_non_pem_ca_file_is_refused(box: Sandbox, tmp_path: Path) -> None:
    done = box.install("--ca-file", str(tmp_path / "missing.pem"))
    assert done.returncode == 2 and "--ca-file: cannot read" in done.stderr
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    done = box.install("--ca-file", str(junk))
    assert done.returncode == 2 and "holds no PEM certificate" in done.stderr
    assert not (box.root / "etc/wiregate").exists()
