"""What the gateway checks before it touches anything: its ports, its admin socket,
its directories, and that no other gateway uses its state dir.

Each refusal is a :class:`ConfigError` naming the port, path or process involved,
with a hint; nothing is changed by a refused start. The checks that change
nothing run first (ports, the admin socket); the state dir is created only after
them, unless it already exists, in which case its lock is taken first, so a
second gateway is told who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from pathlib import Path
from types import TracebackType

from wiregate.errors import ConfigError
from wiregate.net import parse_hostport
from wiregate.settings import GatewaySettings

__all__ = ["LOCK_NAME", "StateLock", "check_admin_socket", "preflight"]

LOCK_NAME = "gateway.lock"
_CONNECT_TIMEOUT = 1.0  # seconds a live admin socket has to accept


class StateLock:
    """An exclusive ``flock`` on ``state_dir/gateway.lock``, held while the gateway runs;
    the file holds the holder's pid. The kernel drops it when the process ends."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path) -> StateLock:
        path = state_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _dir_error(exc, state_dir, "state dir", "--state-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise ConfigError(
                f"another gateway ({who}) is using state dir {state_dir} (lock {path})",
                hint="stop that gateway first, or give this one its own --state-dir",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> StateLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def preflight(settings: GatewaySettings) -> StateLock:
    """Refuse a start that would fail or do harm; return the state dir's lock, held."""
    lock = StateLock.acquire(settings.state_dir) if settings.state_dir.is_dir() else None
    try:
        for what, flag, address in _listeners(settings):
            check_port(address, what, flag)
        check_admin_socket(settings.admin_socket, replace=False)
        if lock is None:
            _make_dir(settings.state_dir, "state dir", "--state-dir")
            lock = StateLock.acquire(settings.state_dir)
        _make_dir(settings.admin_socket.parent, "admin socket directory", "--admin-socket")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def _listeners(settings: GatewaySettings) -> list[tuple[str, str, str]]:
    found = [
        ("listen", "--listen", settings.listen),
        ("metrics_listen", "--metrics-listen", settings.metrics_listen),
    ]
    redirect = str(getattr(settings, "http_redirect_listen", "") or "")
    if redirect:
        found.append(("http_redirect_listen", "http_redirect_listen", redirect))
    return [item for item in found if item[2]]


def check_port(address: str, what: str, flag: str) -> None:
    """Bind ``address`` for a moment the way the server will (``SO_REUSEADDR``);
    :class:`ConfigError` when that fails. Port 0 (ephemeral) always passes."""
    host, port = parse_hostport(address, allow_port_zero=True, what=what)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(
            f"{what} {address}: cannot resolve {host}: {exc.strerror}",
            hint=f"give an address of this host with {flag}",
        ) from None
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise _port_error(exc, what, flag, address, port) from None


def _port_error(exc: OSError, what: str, flag: str, address: str, port: int) -> ConfigError:
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(
            f"{what} {address}: port {port} is already in use",
            hint=f"stop what listens there (ss -ltnp 'sport = :{port}') or choose another"
            f" address with {flag}",
        )
    if exc.errno == errno.EACCES:
        return ConfigError(
            f"{what} {address}: permission denied binding port {port}",
            hint=f"ports below 1024 need CAP_NET_BIND_SERVICE; or choose another port with {flag}",
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(
            f"{what} {address}: not an address of this host",
            hint=f"give an address of this host with {flag}",
        )
    return ConfigError(f"{what} {address}: cannot bind: {exc.strerror}", hint=f"check {flag}")


def check_admin_socket(path: Path, *, replace: bool) -> None:
    """Refuse an admin socket path another live process answers on, or that is not a
    socket; a stale socket (nobody answers) is removed when ``replace`` is set."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _dir_error(exc, path.parent, "admin socket directory", "--admin-socket") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(
            f"admin socket {path} exists and is not a socket",
            hint="remove it if it is yours, or set --admin-socket / admin_socket to another path",
        )
    if _answers(path):
        raise ConfigError(
            f"admin socket {path} is in use: another process answers on it",
            hint="stop that gateway first, or set --admin-socket / admin_socket to another path",
        )
    if replace:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_CONNECT_TIMEOUT)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False  # stale: its process is gone
        except OSError:
            return True  # there, but not ours to take (permission denied, a full backlog)
        return True


def _make_dir(path: Path, what: str, flag: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise _dir_error(exc, path, what, flag) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _dir_error(PermissionError(errno.EACCES, "Permission denied"), path, what, flag)


def _dir_error(exc: OSError, path: Path, what: str, flag: str) -> ConfigError:
    reason = (exc.strerror or str(exc)).lower()
    return ConfigError(
        f"cannot use {what} {path}: {reason}",
        hint=f"create it for the gateway's user (the systemd unit does), or choose another"
        f" path with {flag}",
    )


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
