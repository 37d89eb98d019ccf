"""A ``wiregate gateway`` process with SSO configured, called over its JSON API."""

from __future__ import annotations

import json
import subprocess
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
