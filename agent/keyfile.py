"""The agent's WireGuard private key on disk: ``state_dir/private.key``, base64, mode 0600.

The key is generated on the host and never leaves it: it is never printed,
logged or put in an exception message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import stat
from pathlib import Path

from wiregate.errors import ConfigError
from wiregate.files import write_private
from wiregate.keys import KEY_LEN, generate_private_key

__all__ = ["KEY_FILE", "NEXT_KEY_FILE", "KeyFileError", "load_or_create_key"]

KEY_FILE = "private.key"
NEXT_KEY_FILE = "private.key.next"  # the next key while a rotation is under way


class KeyFileError(ConfigError):
    """The key file is unsafe or unreadable."""

    code = "key_file"


def load_or_create_key(state_dir: Path, name: str = KEY_FILE) -> bytes:
    """Load the private key from ``state_dir``, creating it (atomically, 0600) if absent.

    ``name`` is the file (``private.key``; the next key of a rotation has its own).
    """
    path = Path(state_dir) / name
    try:
        return _load(path)
    except FileNotFoundError:
        pass
    _create(path)
    return _load(path)


def _load(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a symlink; EACCES...
        raise KeyFileError(f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path} is not a regular file")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"{path} is accessible by group or others (mode {info.st_mode & 0o777:o})",
                hint=f"chmod 600 {path}, and consider the key compromised",
            )
        text = os.read(fd, 4096)
    finally:
        os.close(fd)
    return _decode(text, path)


def _decode(text: bytes, path: Path) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{path} does not hold base64") from None
    if len(raw) != KEY_LEN:
        raise KeyFileError(f"{path} does not hold a 32-byte key")
    return raw


def _create(path: Path) -> None:
    """Write a fresh key as a 0600 file (never overwrites: another process's key wins)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        write_private(path, base64.b64encode(generate_private_key()) + b"\n", exclusive=True)
