"""A real OpenID Provider for the tests (lab/idp.py).

The ``idp`` fixture is one provider for the whole session; ``throwaway_idp`` is a
private one a test may stop; ``secret_files`` holds the test clients' secrets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.idp import CLIENT_SECRETS, RunningIdp, start_idp


@pytest.fixture(scope="session")
def idp() -> Iterator[RunningIdp]:
    """One OpenID Provider for the session, always stopped at the end."""
    running = start_idp()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def throwaway_idp() -> Iterator[RunningIdp]:
    """A private OpenID Provider that the test may stop."""
    running = start_idp()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def secret_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test clients' secrets, each in a file as in production."""
    folder = tmp_path_factory.mktemp("oidc-secrets")
    files = {}
    for client_id, secret in CLIENT_SECRETS.items():
        path = folder / client_id
        path.write_text(secret + "\n")
        path.chmod(0o600)
        files[client_id] = path
    return files
