"""Nodes' pods in the store on SQLite (the cases: lab/pod_store_cases.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.pod_store_cases import *  # noqa: F403 (its tests and fixtures, here on SQLite)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'pods.db'}"
