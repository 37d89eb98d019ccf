"""TLS of the gateway's API: the server's context (reloadable) and the clients' one context.

The gateway serves HTTPS with :func:`server_context`; :class:`CertReloader` loads a
changed certificate and key into that same context, so new handshakes get the new
certificate and open connections stay up. Every client of the gateway (agent,
``wiregate login``, ``wiregate admin`` over TCP, netcheck's relay list) verifies it
with :func:`client_context`: the system's CA store plus the operator's ``ca_file``.
A verification failure becomes one line with :func:`tls_failure`.
"""

from __future__ import annotations

import asyncio
import ssl
import stat
from pathlib import Path

from wiregate.errors import ConfigError
from wiregate.logging import get_logger

__all__ = [
    "RELOAD_INTERVAL",
    "CertReloader",
    "client_context",
    "load_server_pair",
    "server_context",
    "tls_failure",
    "tls_refusal",
]

RELOAD_INTERVAL = 5.0  # s between looks at the certificate and key files' mtimes
_log = get_logger("wiregate.tls")


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A verifying client context: the system store, plus ``ca_file`` (PEM) if given.

    Hostnames are checked; TLS 1.2 is the oldest version offered.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except ssl.SSLError as exc:  # before OSError: it is one
            raise ConfigError(f"ca_file {ca_file} has no usable PEM CA: {_reason(exc)}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read ca_file {ca_file}: {exc.strerror}") from exc
    return ctx


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server context of the API listener with ``cert`` (PEM chain) and ``key``.

    :class:`~wiregate.errors.ConfigError` (one line) if a file is unreadable, the
    key does not match the certificate, or the key file is readable by others.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_server_pair(ctx, cert, key)
    return ctx


def load_server_pair(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Load ``cert`` and ``key`` into ``ctx`` (new handshakes use them), checked first."""
    for path, what in ((cert, "tls_cert"), (key, "tls_key")):
        try:
            mode = path.stat().st_mode
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{what} {path} is not a regular file")
    if key.stat().st_mode & 0o077:
        mode = stat.S_IMODE(key.stat().st_mode)
        raise ConfigError(f"tls_key {key} is readable by others (mode {mode:04o}; chmod 600 it)")
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        reason = _reason(exc)
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in reason:
            raise ConfigError(f"tls_key {key} does not match tls_cert {cert}") from exc
        raise ConfigError(f"cannot load tls_cert {cert} / tls_key {key}: {reason}") from exc


def _mtimes(*paths: Path) -> tuple[int, ...]:
    stamps: list[int] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            stamps.append(-1)
            continue
        stamps.extend((st.st_mtime_ns, st.st_ino, st.st_size))
    return tuple(stamps)


class CertReloader:
    """Reloads the certificate and key into the server context when the files change.

    :meth:`check` compares the files' mtimes with the last load's; :meth:`reload`
    loads unconditionally (SIGHUP). A pair that fails to load is logged and the
    context keeps serving the last good one.
    """

    def __init__(
        self,
        ctx: ssl.SSLContext,
        cert: Path,
        key: Path,
        *,
        interval: float | None = None,
    ) -> None:
        self.ctx = ctx
        self.cert = cert
        self.key = key
        self.interval = RELOAD_INTERVAL if interval is None else interval
        self.loads = 0
        self.last_error = ""
        self._seen = _mtimes(cert, key)

    def check(self) -> bool:
        """Reload if either file changed since the last look; True if loaded now."""
        now = _mtimes(self.cert, self.key)
        if now == self._seen:
            return False
        return self.reload()

    def reload(self) -> bool:
        """Load the pair now; False (logged, old pair kept) if it cannot be loaded."""
        self._seen = _mtimes(self.cert, self.key)
        try:
            load_server_pair(self.ctx, self.cert, self.key)
        except ConfigError as exc:
            self.last_error = exc.message
            _log.warning("tls_reload_failed", error=exc.message)
            return False
        self.loads += 1
        self.last_error = ""
        _log.info("tls_reloaded", cert=str(self.cert))
        return True

    async def run(self) -> None:
        """Look at the files every :attr:`interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            self.check()  # in the loop's thread: no handshake sees a half-loaded context


def tls_failure(exc: BaseException) -> str | None:
    """Why a TLS handshake with the server failed, in one line; None if ``exc`` is not one.

    Understands aiohttp's connector errors (their ``certificate_error`` /
    ``os_error``) and the exceptions they were raised from.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for attr in ("certificate_error", "os_error"):  # aiohttp's wrappers (first: some
            inner = getattr(current, attr, None)  # of them are SSLErrors themselves)
            if isinstance(inner, ssl.SSLError) and inner is not current:
                return tls_failure(inner)
        if isinstance(current, ssl.SSLError):
            message = getattr(current, "verify_message", None)
            return str(message) if message else _reason(current)
        current = current.__cause__ or current.__context__
    return None


def tls_refusal(server: str, exc: BaseException) -> str | None:
    """``TLS with SERVER failed: WHY`` if ``exc`` is a TLS failure, else None."""
    why = tls_failure(exc)
    return None if why is None else f"TLS with {server} failed: {why.strip().rstrip('.')}"


def _reason(exc: ssl.SSLError) -> str:
    text = exc.reason or exc.strerror or str(exc)
    return str(text).replace("_", " ").lower() if exc.reason else str(text)
