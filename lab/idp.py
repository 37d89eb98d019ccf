"""A real OpenID Provider: panva's oidc-provider (tests/idp) under Node.

``start_idp`` runs ``node tests/idp/provider.mjs PORT`` on a free loopback port
and waits for its discovery document; :class:`RunningIdp` stops it.
``tests/idp/node_modules`` comes from ``npm ci`` in scripts/setup.sh; starting
fails clearly when it is missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

IDP_DIR = Path(__file__).resolve().parents[1] / "tests" / "idp"


START_TIMEOUT = 20.0


CLIENT_SECRETS = {
    "wiregate": "wiregate-test-secret-basic",
    "wiregate-post": "wiregate-test-secret-post",
}


REDIRECT_URI = "http://127.0.0.1/oidc/callback"


@dataclass
class RunningIdp:
    """An OpenID Provider process listening on 127.0.0.1."""

    issuer: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Stop the provider (TERM, then KILL) and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: scripts/setup.sh installs nodejs (tests/idp)")
    if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("tests/idp/node_modules is missing: scripts/setup.sh installs it (npm ci)")
    return node


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_discovery(idp: RunningIdp) -> bool:
    url = idp.issuer + "/.well-known/openid-configuration"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if idp.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def start_idp() -> RunningIdp:
    """Start the provider on a free port; retry on another port if it does not come up."""
    node = _node()
    for _ in range(3):
        port = free_port()
        process = subprocess.Popen(
            [node, str(IDP_DIR / "provider.mjs"), str(port)],
            cwd=IDP_DIR,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        idp = RunningIdp(f"http://127.0.0.1:{port}", process)
        if _wait_for_discovery(idp):
            return idp
        idp.stop()
    pytest.fail("the test OpenID Provider (tests/idp/provider.mjs) did not start")
