"""A throwaway PostgreSQL server for tests: Debian's binaries, a temporary directory, loopback.

:class:`PgServer` runs ``initdb`` and ``pg_ctl`` from ``/usr/lib/postgresql/*/bin``
as the ``postgres`` system user when the tests run as root (PostgreSQL refuses to
run as root), listens on 127.0.0.1 on a free port with its socket in the data
directory, and is torn down with ``pg_ctl stop -m immediate``. ``restart`` and
``kill`` exist for the fault tests. Each test database is created fresh with
:meth:`PgServer.create_database`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["PgServer", "Wrap", "pg_bin"]

Wrap = Callable[[list[str]], list[str]]


def pg_bin() -> Path:
    """The directory holding Debian's PostgreSQL server binaries (newest version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgServer:
    """One PostgreSQL cluster in a temporary directory (see the module docstring)."""

    def __init__(self, *, host: str = "127.0.0.1", wrap: Wrap | None = None) -> None:
        """``host``: the address to listen on; ``wrap`` prefixes every command (e.g. to run
        the server inside a lab network namespace: ``ip netns exec NS …``)."""
        # In the system temporary directory: pytest's own are private to root, and
        # the server runs as the postgres user.
        self.root = Path(tempfile.mkdtemp(prefix="wiregate-pg-"))
        self.data = self.root / "data"
        self.host = host
        self._wrap = wrap or (lambda argv: argv)
        self.port = _free_port() if wrap is None else 5432
        self.user = "postgres"
        self._bin = pg_bin()
        self._as_root = os.geteuid() == 0
        self._databases = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> PgServer:
        """initdb (first time) and start; returns once the server accepts connections."""
        if not self.data.exists():
            self.root.chmod(0o755)
            self.data.mkdir(mode=0o700)
            if self._as_root:
                pw = pwd.getpwnam("postgres")
                os.chown(self.root, pw.pw_uid, pw.pw_gid)
                os.chown(self.data, pw.pw_uid, pw.pw_gid)
            self._run(
                "initdb", "-D", str(self.data), "-U", self.user, "--auth=trust",
                "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
            )  # fmt: skip
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write(
                    f"listen_addresses = '{self.host}'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.data}'\n"
                    "fsync = on\nmax_connections = 300\nshared_buffers = 64MB\n"
                )
            with (self.data / "pg_hba.conf").open("a") as hba:  # initdb trusts loopback only
                hba.write(f"host all all {self.host}/32 trust\n")
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients cleanly; ``immediate``: crash-like)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop (fast), stay down ``down_for`` seconds, start again on the same port."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash; the next start runs crash recovery)."""
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text().split()[0]), 9)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._accepting():
            time.sleep(0.05)

    def destroy(self) -> None:
        """Stop immediately and remove every file."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.destroy()

    # -- databases -------------------------------------------------------------

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its SQLAlchemy asyncpg URL."""
        self._databases += 1
        name = name or f"wiregate_{self._databases}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql; its output (tuples only, unaligned)."""
        out = subprocess.run(
            self._wrap([str(self._bin / "psql"), "-h", self.host, "-p", str(self.port),
             "-U", self.user, "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql]),
            check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return out.stdout.strip()

    # -- internals -------------------------------------------------------------

    def _accepting(self) -> bool:
        argv = [str(self._bin / "pg_isready"), "-h", self.host, "-p", str(self.port), "-t", "1"]
        return subprocess.run(self._wrap(argv), capture_output=True, check=False).returncode == 0

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        argv = [str(self._bin / tool), *args]
        if self._as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        argv = self._wrap(argv)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/")
        if check and result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed: {result.stderr.strip()}\n{tail}")
