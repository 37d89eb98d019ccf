"""Abuse limits and key history in a real SQLite file (tests/service/limit_cases.py;
tests/service/test_limits_postgres.py runs the same cases on PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.limit_cases import *  # noqa: F403 (its tests and fixtures, here on SQLite)


@pytest.fixture(params=["sqlite"])
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'wiregate.db'}"
