"""What the agent tells the gateway about itself: its version and the host's operating
system (``/etc/os-release``'s PRETTY_NAME and the kernel), shown to admins only."""

from __future__ import annotations

import platform
from importlib import metadata

__all__ = ["agent_info"]


def agent_info() -> tuple[str, str]:
    """(wiregate's version, the operating system), printable and within the message's
    limits (64 and 128 characters)."""
    try:
        version = metadata.version("wiregate")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        pretty = platform.freedesktop_os_release().get("PRETTY_NAME") or platform.system()
    except OSError:
        pretty = platform.system()
    system = f"{pretty} ({platform.system()} {platform.release()})"
    return _printable(version)[:64], _printable(system)[:128]


def _printable(text: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text) or "unknown"
