"""The ``pods`` messages on the map stream: when the agent sends what its pod watcher reports.

A node agent with ``kubernetes = true`` runs a :class:`agent.kubepods.PodWatcher`; the
:class:`PodReporter` sends its reports on the current map stream. Every new stream (the
first full map on it, after each (re)connect or replica change) gets the whole book as a
``full`` report first; until then, and while no stream is up, deltas are not sent (the
next stream's ``full`` carries them). Sends are serialized, so a delta never goes out
ahead of the ``full`` of its stream. A stream closed with 1008 (policy violation) after
a ``pods`` message went out on it means the gateway refused it (one older than pod
identity): reports stop until the agent restarts, rather than costing a reconnect each
time (as :mod:`agent.pathreport` does).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import aiohttp

from agent.kubepods import PodWatcher
from agent.pathreport import POLICY_VIOLATION
from wiregate.logging import get_logger
from wiregate.podwire import PodReport, build_pods

__all__ = ["PodReporter", "Stream"]

log = get_logger("agent.podreport")


class Stream(Protocol):
    """What the reporter uses of the map stream's websocket."""

    @property
    def closed(self) -> bool: ...

    async def send_json(self, data: Any) -> None: ...


class PodReporter:
    """Sends the watcher's reports on the stream that got this book's ``full``."""

    def __init__(self, watcher: PodWatcher) -> None:
        self.watcher = watcher
        self._stream: Stream | None = None  # the stream the book's full went out on
        self._lock = asyncio.Lock()
        self.messages = 0  # pods messages sent
        self.refused = False  # the gateway closed a stream over a report: no more reports
        self._sent_on_stream = False

    async def run(self) -> None:
        """Watch the node's pods and send what changes, until cancelled."""
        await self.watcher.run(self._emit)

    async def stream_started(self, stream: Stream) -> None:
        """A new map stream: the whole book on it (once the first list is in)."""
        async with self._lock:
            self._stream, self._sent_on_stream = stream, False
            if self.watcher.lists:
                await self._send(self.watcher.full())

    def to_dict(self) -> dict[str, Any]:
        """For ``wiregate status``: the pods reported now, and how."""
        return {
            "reported": len(self.watcher.book.pods),
            "lists": self.watcher.lists,
            "messages": self.messages,
            "refused": self.refused,
        }

    def stream_ended(self, close_code: int | None) -> bool:
        """The stream closed with ``close_code``; True if that turned reports off."""
        if close_code == POLICY_VIOLATION and self._sent_on_stream and not self.refused:
            self.refused = True
            return True
        return False

    async def _emit(self, reports: list[PodReport]) -> None:
        async with self._lock:
            await self._send(reports)

    async def _send(self, reports: list[PodReport]) -> None:
        stream = self._stream
        if stream is None or stream.closed or self.refused:
            return  # the next stream gets a full
        try:
            for report in reports:
                await stream.send_json(build_pods(report.full, report.upsert, report.remove))
                self.messages += 1
                self._sent_on_stream = True
        except (aiohttp.ClientError, ConnectionError) as exc:
            self._stream = None
            log.info("pods not sent: the map stream is closing", error=str(exc))
