"""A ``wiregate gateway`` process with SSO configured, called over its JSON API."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADMIN_TOKEN = "browser-test-admin-token-0123456789"


@dataclass
class Gateway:
    """A running ``wiregate gateway`` process with SSO configured."""

    url: str
    state_dir: Path
    process: subprocess.Popen[bytes]
    log: Path

    def api(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> tuple[int, Any]:
        """Call the JSON API; ``token`` is a device or admin bearer token."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        return status, json.loads(raw) if raw else None

    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Call an admin route with the admin bearer token."""
        return self.api(method, path, body, token=ADMIN_TOKEN)


def write_config(tmp: Path, port: int, metrics_port: int, extra: str = "") -> Path:
    """``tmp/gateway.toml`` for a gateway on loopback ``port`` with the admin token of
    :data:`ADMIN_TOKEN` (in a file); ``extra`` is TOML that follows the ``[gateway]`` keys."""
    token = tmp / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    token.chmod(0o600)
    config = tmp / "gateway.toml"
    config.write_text(f"""
[gateway]
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:{metrics_port}"
admin_socket = "{tmp / "gw.sock"}"
admin_token_file = "{token}"
state_dir = "{tmp / "state"}"
public_url = "http://127.0.0.1:{port}"
{extra}""")
    return config


def wait_live(gw: Gateway, timeout: float = 20.0) -> None:
    """Return once ``/livez`` answers; kill the process and raise with its log if it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and gw.process.poll() is None:
        try:
            if gw.api("GET", "/livez")[0] == 200:
                return
        except OSError:
            time.sleep(0.1)
    gw.process.kill()
    raise RuntimeError("the gateway did not start:\n" + gw.log.read_text()[-3000:])


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate a gateway process, killing it if it does not exit in 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
