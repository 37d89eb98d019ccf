"""The relay's trusted signers, fetched from the gateway (``signers_url``).

The gateway serves its relay-ticket verify keys at ``GET /api/v1/relay/signers``
in the format of a relay's ``verify_keys_file``; both are parsed by the one
function :func:`~relay.aio.forwarding.signers_document`. :class:`SignersWatcher`
fetches that document at start, retrying with backoff (1 s doubling up to 30 s)
until the gateway answers, then again every ``refresh`` seconds so that a
rotated gateway key is picked up. Each failure is one log line.

Fail closed: until the first good document the relay has no signer, and every
ALLOCATE is refused (``no_verify_keys``); STUN is served meanwhile. A failed or
refused fetch later on keeps the signers last fetched (the relay keeps admitting
what the gateway signed until it answers again); a good document replaces them.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp

from relay.aio.forwarding import signers_document
from relay.tickets import TrustedSigner
from wiregate.errors import ConfigError
from wiregate.logging import get_logger

__all__ = ["MAX_DOCUMENT", "SignersUnavailable", "SignersWatcher", "fetch_signers", "ssl_context"]

log = get_logger("relay.signers")

MAX_DOCUMENT = 64 * 1024  # bytes; a signers document is a few hundred
MAX_RETRY = 30.0
TIMEOUT = 10.0

Apply = Callable[[tuple[TrustedSigner, ...]], None]


class SignersUnavailable(Exception):
    """The signers could not be fetched or were refused; the message is one line."""


def ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verification against ``ca_file`` (a cluster CA), or the system's CAs."""
    try:
        return ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load signers_ca_file {ca_file}: {exc}") from exc


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


async def fetch_signers(
    session: aiohttp.ClientSession, url: str, *, time_limit: float = TIMEOUT
) -> tuple[TrustedSigner, ...]:
    """GET ``url`` and parse it as a signers document; :class:`SignersUnavailable` otherwise."""
    try:
        async with session.get(
            url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=time_limit)
        ) as resp:
            if resp.status != 200:
                raise SignersUnavailable(f"HTTP {resp.status} {_one_line(resp.reason or '')}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(8192):
                body += chunk
                if len(body) > MAX_DOCUMENT:
                    raise SignersUnavailable(f"document larger than {MAX_DOCUMENT} bytes")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise SignersUnavailable(_one_line(f"{type(exc).__name__}: {exc}")) from exc
    try:
        return signers_document(bytes(body))
    except ValueError as exc:
        raise SignersUnavailable(_one_line(f"refused: {exc}")) from exc


class SignersWatcher:
    """Keeps the relay's signers in step with ``url``; ``apply`` gets each new set."""

    def __init__(
        self,
        url: str,
        apply: Apply,
        *,
        ca_file: Path | None = None,
        refresh: float = 60.0,
        retry: float = 1.0,
        timeout: float = TIMEOUT,
    ) -> None:
        self._url, self._apply = url, apply
        self._ssl = ssl_context(ca_file) if url.startswith("https:") else None
        self._refresh, self._retry, self._timeout = refresh, retry, timeout
        self._task: asyncio.Task[None] | None = None
        self.signers: tuple[TrustedSigner, ...] = ()
        self.updated = asyncio.Event()  # set at every change of the signers (tests wait on it)
        self.failures = 0

    def start(self) -> None:
        """Start fetching in the background (the first fetch at once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="relay-signers")

    async def close(self) -> None:
        """Stop fetching; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
        async with aiohttp.ClientSession(connector=connector) as session:
            delay = self._retry
            while True:
                try:
                    signers = await fetch_signers(session, self._url, time_limit=self._timeout)
                except SignersUnavailable as exc:
                    self.failures += 1
                    log.warning(
                        "relay signers fetch failed",
                        url=self._url,
                        error=str(exc),
                        retry_in=round(delay, 3),
                        signers=len(self.signers),
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_RETRY, max(self._refresh, self._retry))
                    continue
                delay = self._retry
                if signers != self.signers:
                    self._changed(signers)
                await asyncio.sleep(self._refresh)

    def _changed(self, signers: tuple[TrustedSigner, ...]) -> None:
        first = not self.signers
        self.signers = signers
        self._apply(signers)
        self.updated.set()
        self.updated = asyncio.Event()
        log.info(
            "relay signers loaded" if first else "relay signers changed",
            url=self._url,
            signers=[s.key_id.hex() for s in signers],
        )
