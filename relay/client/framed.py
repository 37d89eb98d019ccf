"""A TLS (or plain) stream of :mod:`relay.streamwire` frames over asyncio: both ends' half.

:class:`FramedStream` decodes what arrives into frames and never blocks a sender:
the frames sent in one turn of the event loop go out in one write, and while the
transport is over its high-water mark they wait in a bounded queue whose oldest
frame is dropped when full. The relay's listener (:mod:`relay.aio.tcp`) and the
agent's link (:mod:`agent.paths.tcplink`) both build on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable
from typing import cast

from relay.streamwire import Frame, Refusal, StreamDecoder, StreamError, build_frame

__all__ = ["QUEUE_FRAMES", "SOCKET_BUFFER", "DrainedUdp", "FramedStream", "tune_stream_socket"]

SOCKET_BUFFER = 4 * 1024 * 1024
QUEUE_FRAMES = 1024  # frames waiting for the transport, per connection (drop-oldest)
_HIGH_WATER = 256 * 1024  # bytes in the TLS transport's buffer before frames queue here


def tune_stream_socket(transport: asyncio.BaseTransport) -> None:
    """No Nagle and large buffers on a stream transport's socket (best effort)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


class FramedStream(asyncio.Protocol):
    """A TLS stream of :mod:`relay.streamwire` frames; subclasses handle what arrives.

    ``send`` never blocks: the frames sent in one turn of the event loop go out in
    one write; while the transport is over its high-water mark they wait in a
    bounded queue whose oldest frame is dropped when full (counted in :attr:`dropped`).
    """

    def __init__(self, *, preamble: bool, queue_frames: int = QUEUE_FRAMES) -> None:
        self.transport: asyncio.Transport | None = None
        self.decoder = StreamDecoder(preamble=preamble)
        self._queue: deque[bytes] = deque(maxlen=queue_frames)
        self._paused = False
        self._batch: list[bytes] = []
        self.dropped = 0
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        tune_stream_socket(transport)
        self.transport.set_write_buffer_limits(high=_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except StreamError as exc:
            self.bad_stream(exc)
            return
        for frame in frames:
            self.frame_received(frame)

    def bad_stream(self, exc: StreamError) -> None:
        """What arrived is not a valid stream: refuse it (one line) and close."""
        self.refuse(exc.message)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        while self._queue and not self._paused and self.transport is not None:
            self.transport.write(self._queue.popleft())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._queue.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- for subclasses and users -------------------------------------------------------

    def frame_received(self, frame: Frame) -> None:
        """One whole frame arrived."""
        raise NotImplementedError

    def send(self, frame: Frame) -> None:
        """Write ``frame`` now, or queue it (dropping the oldest queued one when full).
        A datagram no frame can carry (over :data:`~relay.streamwire.MAX_PAYLOAD`) is
        dropped (counted in :attr:`dropped`)."""
        try:
            data = build_frame(frame)
        except ValueError:
            self.dropped += 1
            return
        self.send_raw(data)

    def send_raw(self, data: bytes) -> None:
        """Write bytes already framed (or the preamble), as :meth:`send`."""
        if self.transport is None or self.transport.is_closing():
            return
        if self._paused:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(data)
            return
        self._batch.append(data)  # frames of one loop iteration go out in one TLS write
        if len(self._batch) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if batch and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(batch))

    def refuse(self, reason: str) -> None:
        """Send one refusal line and close."""
        if self.transport is not None and not self.transport.is_closing():
            self._queue.clear()
            self._batch.clear()
            self.transport.write(build_frame(Refusal(reason)))
            self.transport.close()

    def close(self) -> None:
        """Close the stream (queued frames are flushed first by the transport)."""
        if self.transport is not None:
            self.transport.close()


OnDatagram = Callable[[bytes, tuple[str, int]], None]
_DRAIN = 64  # datagrams read per readiness event before the loop runs others


class DrainedUdp:
    """A non-blocking UDP socket read until empty on each readiness event (up to 64
    datagrams), rather than one datagram per event loop turn as asyncio's datagram
    transports do: a burst is then framed and written in one turn. ``sendto`` never
    blocks: a datagram the kernel cannot take now is dropped, as UDP may."""

    def __init__(self, sock: socket.socket, on_datagram: OnDatagram) -> None:
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        self.sock, self._on_datagram = sock, on_datagram
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._ready)
        name = sock.getsockname()
        self.address = (str(name[0]), int(name[1]))

    @classmethod
    def bind(cls, host: str, on_datagram: OnDatagram) -> DrainedUdp:
        """A socket bound to ``host`` (an ephemeral port); OSError if it cannot be."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, 0))
            return cls(sock, on_datagram)
        except BaseException:
            sock.close()
            raise

    def _ready(self) -> None:
        for _ in range(_DRAIN):
            try:
                data, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. an ICMP error reported on the socket: read on
                continue
            self._on_datagram(data, (str(addr[0]), int(addr[1])))

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):  # full buffer, unreachable: a lost datagram
            self.sock.sendto(data, addr)

    def close(self) -> None:
        """Stop reading and close the socket; safe to call twice."""
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
