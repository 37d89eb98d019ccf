"""Private files: the one writer of 0600 files, and the gateway's secret key files.

:func:`write_private` writes every private file (keys, the agent's state, store
backups): a temporary 0600 file beside the target, fsynced, then renamed over
it or hard-linked into place, and the directory fsynced; a reader never sees a
half-written file.

:func:`load_or_create_key_file` keeps 32 random bytes, base64, mode 0600,
created on first use with an exclusive :func:`write_private`, so two processes
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
from collections.abc import Iterable
from pathlib import Path

from wiregate.errors import ConfigError

__all__ = [
    "check_private_mode",
    "credential_path",
    "fsync_dir",
    "load_or_create_key_file",
    "write_private",
]

CREDENTIALS_PREFIX = "%d/"  # systemd's specifier of $CREDENTIALS_DIRECTORY (LoadCredential=)


def credential_path(path: Path | str, what: str) -> Path:
    """``path``, with a leading ``%d/`` read as ``$CREDENTIALS_DIRECTORY/``.

    systemd's ``LoadCredential=`` copies a root-only secret file to a directory
    the service (``DynamicUser=``) may read and names it in
    ``$CREDENTIALS_DIRECTORY``; settings name such a file ``%d/NAME``.
    """
    text = str(path)
    if not text.startswith(CREDENTIALS_PREFIX):
        return Path(text)
    directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        raise ConfigError(
            f"{what} {text}: $CREDENTIALS_DIRECTORY is not set",
            hint="%d/ names a file of systemd's LoadCredential=; elsewhere give its real path",
        )
    return Path(directory) / text.removeprefix(CREDENTIALS_PREFIX)


def check_private_mode(path: Path, what: str) -> None:
    """:class:`ConfigError` (one line) when ``path`` is readable by group or others.

    A root-owned file given to this process's group only (a Kubernetes Secret
    mounted with ``fsGroup``) is accepted.
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    mode = st.st_mode
    if not mode & 0o007 and _handed_to_our_group(st):
        mode &= ~0o070
    if mode & 0o077:
        shown = st.st_mode & 0o7777
        raise ConfigError(f"{what} {path} is readable by others (mode {shown:04o}; chmod 600 it)")


def load_or_create_key_file(path: Path, what: str) -> bytes:
    """32 random bytes kept base64 in ``path`` (0600), created on first use.

    :class:`ConfigError` when the file is readable by group or others, unreadable,
    or not 32 bytes of base64; ``what`` names the key in the message.
    """
    if not path.exists():
        _write_new(path)
    return _read_key(path, what)


def write_private(path: Path, data: bytes | Iterable[bytes], *, exclusive: bool = False) -> None:
    """Write ``data`` (bytes, or chunks of bytes) to ``path`` as a 0600 file, whole or not at all.

    The data goes to a temporary file beside ``path``, created 0600 whatever the
    umask, never through a symlink, and fsynced. It then replaces ``path`` (an
    atomic rename), or with ``exclusive`` is hard-linked to it, which never
    overwrites: :class:`FileExistsError` when ``path`` exists. The directory is
    fsynced so the new name survives a crash. The temporary file never outlives
    the call; any :class:`OSError` propagates.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)  # independent of the umask
            if isinstance(data, bytes):
                out.write(data)
            else:
                out.writelines(data)
            out.flush()
            os.fsync(out.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic, and fails if the file exists
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Flush ``directory``'s entries to disk, so a rename or link in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path) -> None:
    with contextlib.suppress(FileExistsError):  # another process won: use its key
        write_private(path, base64.b64encode(secrets.token_bytes(32)) + b"\n", exclusive=True)


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
