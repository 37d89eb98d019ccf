"""Device names, tags and expiry against a real PostgreSQL (lab.pg): the cases of
lab/device_name_cases.py, which tests/unit/gateway/test_device_names.py runs on SQLite."""

from __future__ import annotations

import pytest

from lab.device_name_cases import *  # noqa: F403 (its tests and fixtures, here on PostgreSQL)
from lab.pg import PgServer


@pytest.fixture(params=["postgresql"])
def db_url(pg_server: PgServer) -> str:
    return pg_server.create_database()
