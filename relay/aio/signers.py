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

Revocations: the same watcher polls the sibling ``…/revocations`` of ``signers_url``
(:func:`revocations_url`; the format is :mod:`relay.revocations`) every
``revocations_refresh`` seconds (1 s by default) with a conditional GET: the
gateway answers ``304 Not Modified`` to the ETag it last sent, so an unchanged list
costs one small request. Each changed list goes to ``revoke``, which releases the
allocations of every listed device at once. A gateway that serves no such
document (404: an older gateway) is asked again at the signers' pace; a failed
fetch keeps the list last fetched and retries with the signers' backoff.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urljoin

import aiohttp

from relay.aio.forwarding import signers_document
from relay.revocations import Revoked, revocations_document
from relay.tickets import TrustedSigner
from wiregate.errors import ConfigError
from wiregate.logging import get_logger

__all__ = [
    "MAX_DOCUMENT",
    "MAX_REVOCATIONS",
    "NotServed",
    "SignersUnavailable",
    "SignersWatcher",
    "fetch_revocations",
    "fetch_signers",
    "revocations_url",
    "ssl_context",
]

log = get_logger("relay.signers")

MAX_DOCUMENT = 64 * 1024  # bytes; a signers document is a few hundred
MAX_REVOCATIONS = 8 << 20  # bytes; about 90 000 removed devices within the window
MAX_RETRY = 30.0
TIMEOUT = 10.0

Apply = Callable[[tuple[TrustedSigner, ...]], None]
Revoke = Callable[[Revoked], None]


class SignersUnavailable(Exception):
    """The signers could not be fetched or were refused; the message is one line."""


class NotServed(SignersUnavailable):
    """The gateway has no such document (404: a gateway older than the document)."""


def revocations_url(signers_url: str) -> str:
    """The revocation document next to ``signers_url`` (``…/relay/signers`` ->
    ``…/relay/revocations``)."""
    return urljoin(signers_url, "revocations")


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
    body, _ = await _get(session, url, None, MAX_DOCUMENT, time_limit)
    if body is None:  # not asked conditionally: never
        raise SignersUnavailable("HTTP 304 to an unconditional GET")
    try:
        return signers_document(body)
    except ValueError as exc:
        raise SignersUnavailable(_one_line(f"refused: {exc}")) from exc


async def fetch_revocations(
    session: aiohttp.ClientSession, url: str, etag: str | None, *, time_limit: float = TIMEOUT
) -> tuple[Revoked, str | None] | None:
    """GET ``url`` unless it still has ``etag``: the revocation list and its ETag, or
    None when unchanged (304). :class:`NotServed` on 404, :class:`SignersUnavailable`
    for any other failure or a refused document."""
    body, tag = await _get(session, url, etag, MAX_REVOCATIONS, time_limit)
    if body is None:
        return None
    try:
        return revocations_document(body), tag
    except ValueError as exc:
        raise SignersUnavailable(_one_line(f"refused: {exc}")) from exc


async def _get(
    session: aiohttp.ClientSession, url: str, etag: str | None, limit: int, time_limit: float
) -> tuple[bytes | None, str | None]:
    """The body of ``url`` (at most ``limit`` bytes) and its ETag; None for 304."""
    headers = {"If-None-Match": etag} if etag else {}
    try:
        async with session.get(
            url,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=time_limit),
        ) as resp:
            if resp.status == 304 and etag:
                return None, etag
            if resp.status == 404:
                raise NotServed("HTTP 404: the gateway serves no such document")
            if resp.status != 200:
                raise SignersUnavailable(f"HTTP {resp.status} {_one_line(resp.reason or '')}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(8192):
                body += chunk
                if len(body) > limit:
                    raise SignersUnavailable(f"document larger than {limit} bytes")
            return bytes(body), resp.headers.get("ETag")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise SignersUnavailable(_one_line(f"{type(exc).__name__}: {exc}")) from exc


class SignersWatcher:
    """Keeps the relay's signers in step with ``url``; ``apply`` gets each new set.
    With ``revoke``, the sibling revocation list too: ``revoke`` gets each new list."""

    def __init__(
        self,
        url: str,
        apply: Apply,
        *,
        ca_file: Path | None = None,
        refresh: float = 60.0,
        retry: float = 1.0,
        timeout: float = TIMEOUT,
        revoke: Revoke | None = None,
        revocations_refresh: float = 1.0,
    ) -> None:
        self._url, self._apply, self._revoke = url, apply, revoke
        self._ssl = ssl_context(ca_file) if url.startswith("https:") else None
        self._refresh, self._retry, self._timeout = refresh, retry, timeout
        self._revocations_url, self._revocations_refresh = revocations_url(url), revocations_refresh
        self._task: asyncio.Task[None] | None = None
        self.signers: tuple[TrustedSigner, ...] = ()
        self.revoked: Revoked = {}
        self.updated = asyncio.Event()  # set at every change of the signers (tests wait on it)
        self.revocations_updated = asyncio.Event()  # set at every change of the list
        self.failures = 0  # failed fetches of the signers
        self.revocation_failures = 0  # failed fetches of the revocation list (404 is none)

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
            loops = [self._signers_loop(session)]
            if self._revoke is not None:
                loops.append(self._revocations_loop(session))
            await asyncio.gather(*loops)

    async def _signers_loop(self, session: aiohttp.ClientSession) -> None:
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

    async def _revocations_loop(self, session: aiohttp.ClientSession) -> None:
        delay, etag, unserved = self._retry, None, False
        while True:
            wait = self._revocations_refresh
            try:
                found = await fetch_revocations(
                    session, self._revocations_url, etag, time_limit=self._timeout
                )
            except NotServed:
                if not unserved:
                    log.info("gateway serves no revocation list", url=self._revocations_url)
                unserved, wait = True, max(self._refresh, self._revocations_refresh)
            except SignersUnavailable as exc:
                self.revocation_failures += 1
                log.warning("relay revocations fetch failed", url=self._revocations_url,
                            error=str(exc), retry_in=round(delay, 3))  # fmt: skip
                wait, delay = delay, min(delay * 2, MAX_RETRY)
            else:
                delay, unserved = self._retry, False
                if found is not None:
                    revoked, etag = found
                    if revoked != self.revoked:
                        self._revoked(revoked)
            await asyncio.sleep(wait)

    def _revoked(self, revoked: Revoked) -> None:
        self.revoked = revoked
        if self._revoke is not None:
            self._revoke(revoked)
        self.revocations_updated.set()
        self.revocations_updated = asyncio.Event()
        log.info("relay revocations changed", url=self._revocations_url, devices=len(revoked))

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
