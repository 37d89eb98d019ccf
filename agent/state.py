"""The agent's durable state: its enrollment and the last network map (for fail-static).

Files live in the agent's state directory and are written atomically with mode
0600: ``device.json`` (device id, name, tunnel addresses and the device token the
gateway issued), ``netmap.json`` (the last map applied, so that a restarted
agent brings the tunnel back before the gateway answers) and ``server.json`` (the
gateway URL ``wiregate login`` used).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.keyfile import KEY_FILE, NEXT_KEY_FILE
from wiregate.errors import LocalError
from wiregate.files import write_private
from wiregate.mapwire import MapWireError, build_full, read_full
from wiregate.model import NetMap
from wiregate.settings import AgentSettings

__all__ = ["Enrollment", "StateDir", "with_saved_server"]


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What the gateway told the agent when it enrolled."""

    device_id: str
    name: str
    addresses: tuple[str, ...]
    token: str

    def __repr__(self) -> str:  # the token never reaches logs or tracebacks
        return f"Enrollment(device_id={self.device_id!r}, name={self.name!r})"


class StateDir:
    """Reads and writes the agent's state files."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def load_enrollment(self) -> Enrollment | None:
        data = self._read("device.json")
        if data is None:
            return None
        return Enrollment(
            device_id=str(data["device_id"]),
            name=str(data["name"]),
            addresses=tuple(str(a) for a in data["addresses"]),
            token=str(data["token"]),
        )

    def save_enrollment(self, enrollment: Enrollment) -> None:
        self._write(
            "device.json",
            {
                "device_id": enrollment.device_id,
                "name": enrollment.name,
                "addresses": list(enrollment.addresses),
                "token": enrollment.token,
            },
        )

    def load_server(self) -> str | None:
        """The gateway URL ``wiregate login`` used (``server.json``); None if none saved."""
        data = self._read("server.json")
        server = data.get("server") if data is not None else None
        return server if isinstance(server, str) and server else None

    def save_server(self, server: str) -> None:
        self._write("server.json", {"server": server})

    def load_netmap(self) -> NetMap | None:
        data = self._read("netmap.json")
        if data is None:
            return None
        try:
            return read_full(data)
        except MapWireError as exc:
            raise LocalError(f"state file {self.path / 'netmap.json'} is corrupt: {exc}") from exc

    def save_netmap(self, netmap: NetMap) -> None:
        self._write("netmap.json", build_full(netmap))

    def forget(self) -> None:
        """Drop the enrollment, the cached map and the private keys (after the device
        was revoked): the gateway never registers a key twice, so the next
        enrollment needs a new one."""
        for name in ("device.json", "netmap.json", KEY_FILE, NEXT_KEY_FILE):
            (self.path / name).unlink(missing_ok=True)

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            text = (self.path / name).read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LocalError(f"state file {self.path / name} is corrupt: {exc}") from exc
        if not isinstance(data, dict):
            raise LocalError(f"state file {self.path / name} is corrupt")
        return data

    def _write(self, name: str, data: dict[str, Any]) -> None:
        write_private(self.path / name, json.dumps(data).encode())


def with_saved_server(settings: AgentSettings) -> AgentSettings:
    """``settings``, with the gateway URL ``wiregate login`` saved when no ``server``
    was given (flag, ``WIREGATE_SERVER`` or the config file)."""
    if "server" in settings.model_fields_set:
        return settings
    try:
        saved = StateDir(settings.state_dir).load_server()
    except (OSError, LocalError):
        return settings  # unreadable here: the agent's own checks say why
    return settings if saved is None else settings.model_copy(update={"server": saved})
