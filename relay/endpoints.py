"""Where a relay is: its id (as tickets name it) and its control port (a value).

The gateway hands these out and probes them; agents probe them for netcheck.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from wiregate.errors import ConfigError
from wiregate.settings import parse_relay_entry

__all__ = ["RelayEndpoint", "parse_relays"]


@dataclass(frozen=True, slots=True)
class RelayEndpoint:
    """A relay the gateway hands out: its id (in tickets) and its control port."""

    id: str
    host: str
    port: int

    @property
    def control(self) -> str:
        """``host:port`` (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_relays(entries: Sequence[str]) -> tuple[RelayEndpoint, ...]:
    """``["id=HOST:PORT", ...]`` to relays; ConfigError naming a bad entry."""
    try:
        return tuple(RelayEndpoint(*parse_relay_entry(entry)) for entry in entries)
    except ValueError as exc:
        raise ConfigError(f"relays: {exc}") from exc
