"""Test-wide settings.

Hypothesis: no per-example deadline (these 2-core machines are noisy, and a slow
example is not a wrong one); under CI (``CI`` set) the examples are derandomized,
so a red run can be reproduced exactly and a green one is not luck. Run without
``CI`` locally to keep exploring new examples.

Fixtures for every tier: ``clock`` (an injected clock, lab.fakes) and ``pg_server``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from lab.fakes import FakeClock
from lab.pg import PgServer

settings.register_profile("wiregate", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "wiregate")


@pytest.fixture
def clock() -> FakeClock:
    """An injected clock at ``lab.fakes.T0``; the test moves it."""
    return FakeClock()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One real PostgreSQL (Debian's binaries) for the whole run, started on first use."""
    server = PgServer().start()
    try:
        yield server
    finally:
        server.destroy()
