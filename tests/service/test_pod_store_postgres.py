"""Nodes' pods in the store on a real PostgreSQL (the cases: lab/pod_store_cases.py)."""

from __future__ import annotations

import pytest

from lab.pg import PgServer
from lab.pod_store_cases import *  # noqa: F403 (its tests and fixtures, here on PostgreSQL)


@pytest.fixture(params=["postgresql"])
def db_url(pg_server: PgServer) -> str:
    return pg_server.create_database()
