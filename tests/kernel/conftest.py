"""The kernel tier: runs only where the real WireGuard module is loaded (under QEMU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab.lab_fixture import lab, pytest_runtest_makereport

__all__ = ["lab", "pytest_runtest_makereport"]


def kernel_has_wireguard() -> bool:
    return Path("/sys/module/wireguard").exists()


@pytest.fixture(autouse=True)
def _real_kernel_module() -> None:
    """Deselected on the host (-m 'not kernel'); where selected, the module must be there."""
    assert os.geteuid() == 0, "the kernel tier runs as root"
    assert kernel_has_wireguard(), "no wireguard module: run scripts/kernel-test.sh (QEMU)"
