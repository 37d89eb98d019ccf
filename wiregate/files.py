"""Secret key files of the gateway: 32 random bytes, base64, mode 0600.

Created on first use through a temporary file and a hard link, so two processes
never see a half-written key nor overwrite each other's. A key readable by group
or others is refused. Used for the relay ticket signing seed and the web pages'
cookie key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
from pathlib import Path

from wiregate.errors import ConfigError

__all__ = ["load_or_create_key_file"]


def load_or_create_key_file(path: Path, what: str) -> bytes:
    """32 random bytes kept base64 in ``path`` (0600), created on first use.

    :class:`ConfigError` when the file is readable by group or others, unreadable,
    or not 32 bytes of base64; ``what`` names the key in the message.
    """
    if not path.exists():
        _write_new(path)
    return _read_key(path, what)


def _write_new(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(base64.b64encode(secrets.token_bytes(32)) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another process won: use its key
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_key(path: Path, what: str) -> bytes:
    try:
        st, text = path.stat(), path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from exc
    mode = st.st_mode
    if not mode & 0o007 and _handed_to_our_group(st):
        mode &= ~0o070  # a Kubernetes Secret mounted with fsGroup: root-owned, our group
    if mode & 0o077:
        raise ConfigError(
            f"the {what} {path} is readable by group or others", hint=f"chmod 600 {path}"
        )
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigError(f"the {what} {path} is not 32 bytes of base64")
    return key


def _handed_to_our_group(st: os.stat_result) -> bool:
    """Whether another user (root) gave the file to this process's group only, as the
    kubelet mounts a Secret volume for a pod with ``fsGroup``."""
    return st.st_uid != os.geteuid() and st.st_gid == os.getegid() and st.st_gid != 0
