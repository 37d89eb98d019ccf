"""Fixtures shared by the unit tests: an in-process gateway API and its broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.app import create_app
from lab.api_client import Client, ClientFactory, RecordingBroker, make_settings
from lab.fakes import FakeClock


@pytest.fixture
def broker() -> RecordingBroker:
    return RecordingBroker()


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, tmp_path: Path, broker: RecordingBroker, clock: FakeClock
) -> Client:
    app = create_app(make_settings(tmp_path), broker_factory=lambda _p: broker, clock=clock)
    return await aiohttp_client(app)
