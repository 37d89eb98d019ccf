"""Abuse limits and key history against a real PostgreSQL (lab.pg): the cases of
tests/service/limit_cases.py, shared by every replica through the database."""

from __future__ import annotations

import pytest

from lab.pg import PgServer
from tests.service.limit_cases import *  # noqa: F403 (its tests and fixtures, on PostgreSQL)


@pytest.fixture(params=["postgresql"])
def db_url(pg_server: PgServer) -> str:
    return pg_server.create_database()
