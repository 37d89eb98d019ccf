"""Addresses on the wire and in settings: ``host:port`` parsing.

Every ``host:port`` a wiregate process reads (flags, settings, the map, the
stream) is parsed here.
"""

from __future__ import annotations

from wiregate.errors import ConfigError

__all__ = ["Addr", "parse_hostport"]

Addr = tuple[str, int]


def parse_hostport(text: str) -> Addr:
    """``"127.0.0.1:3478"``, ``"[::1]:3478"`` or ``"name:3478"`` to ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"{text!r} is not host:port", hint='write "127.0.0.1:3478" or "[::1]:3478"'
        )
    return host, int(port)
