"""The key that seals the web pages' cookies: ``state_dir/web-session.key``.

32 random bytes (base64), 0600 (see :mod:`wiregate.files`). Deleting the file
(and restarting) ends every session and every login in progress.
"""

from __future__ import annotations

from pathlib import Path

from wiregate.files import load_or_create_key_file

__all__ = ["KEY_FILE", "load_or_create_session_key"]

KEY_FILE = "web-session.key"


def load_or_create_session_key(state_dir: Path) -> bytes:
    """The 32-byte key in ``state_dir/web-session.key``, created (0600) on first use."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return load_or_create_key_file(state_dir / KEY_FILE, "web session key")
