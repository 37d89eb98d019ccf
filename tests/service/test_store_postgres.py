"""The Store against a real PostgreSQL (lab.pg): the dialect-independent tests of
lab/store_cases.py, which tests/unit/gateway/test_store.py runs on SQLite."""

from __future__ import annotations

import pytest

from lab.pg import PgServer
from lab.store_cases import *  # noqa: F403 (its tests and fixtures, here on PostgreSQL)


@pytest.fixture(params=["postgresql"])
def db_url(pg_server: PgServer) -> str:
    return pg_server.create_database()
