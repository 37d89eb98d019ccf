"""The lab tier's fixtures: a fresh network-namespace lab per test, torn down even on
failure, and a wheelhouse of this checkout for the bootstrap tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.lab_fixture import lab, pytest_runtest_makereport
from lab.vm import build_wheelhouse

__all__ = ["lab", "pytest_runtest_makereport"]


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``wiregate wheelhouse build --platform <this machine>``, once per session."""
    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse") / "house")
