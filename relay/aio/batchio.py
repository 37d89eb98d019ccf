"""Batched UDP I/O: many datagrams per system call with Linux ``recvmmsg``/``sendmmsg``.

A :class:`BatchSocket` wraps a bound, non-blocking ``SOCK_DGRAM`` socket
(IPv4 or IPv6). :meth:`BatchSocket.recv_batch` returns what is queued (up to
``max`` datagrams, ``[]`` when nothing is) in one call;
:meth:`BatchSocket.send_batch` sends many datagrams, each to its own address,
in as few calls as the kernel allows. Addresses are ``(host, port)`` as
``socket.recvfrom`` spells them (``"::ffff:192.0.2.1"`` on a dual-stack socket,
``"fe80::1%eth0"`` with a scope), and an IPv4 destination on an IPv6 socket is
sent to its IPv4-mapped form. Hosts are literal addresses; nothing is resolved.

The calls go through :mod:`ctypes` into the C library. The buffers they fill
are shared by every :class:`BatchSocket` of a thread (the datagrams are copied
out before a call returns), so many sockets cost no more memory than one.
Decoded and encoded addresses are cached, so a known peer costs a dictionary
lookup per datagram, not a parse.
"""

from __future__ import annotations

import ctypes
import errno
import operator
import os
import socket
import struct
import threading
from array import array
from collections.abc import Sequence
from itertools import accumulate, islice, repeat
from typing import Literal, cast

__all__ = ["MAX_DATAGRAM", "Address", "BatchSocket"]

Address = tuple[str, int]

#: The largest UDP payload; a receive buffer this large never truncates.
MAX_DATAGRAM = 65535

_MSG_DONTWAIT = 0x40
_MSG_TRUNC = 0x20
_NAME_STRIDE = 32  # room for a sockaddr_in6 (28 bytes), kept aligned
_CACHE_LIMIT = 4096  # addresses remembered per socket before the caches start over
_RETRY_LATER = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR})


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


_HDR = ctypes.sizeof(_MMsgHdr)
_IOV = ctypes.sizeof(_IoVec)
_OFF_NAME = _MsgHdr.msg_name.offset
_OFF_NAMELEN = _MsgHdr.msg_namelen.offset
_OFF_IOV = _MsgHdr.msg_iov.offset
_OFF_IOVLEN = _MsgHdr.msg_iovlen.offset
_OFF_FLAGS = _MsgHdr.msg_flags.offset
_OFF_LEN = _MMsgHdr.msg_len.offset
# What the kernel writes back per message: name length, flags, datagram length.
_RESULT = struct.Struct(
    f"@{_OFF_NAMELEN}xI{_OFF_FLAGS - _OFF_NAMELEN - 4}xi{_OFF_LEN - _OFF_FLAGS - 4}xI"
    f"{_HDR - _OFF_LEN - 4}x"
)
_SLOT = struct.Struct(f"@PI{_OFF_IOV - _OFF_NAMELEN - 4}xPN")  # name, namelen, iov, iovlen
_IOVEC = struct.Struct("@PN")
_SOCKADDR_IN = struct.Struct("=H")  # family, in host order; the rest is in network order
_PORT = struct.Struct("!H")
_IN6_TAIL = struct.Struct("=I")  # sin6_flowinfo and sin6_scope_id are in host order
# The headers seen as arrays of 32-bit words (every field used is 4-byte aligned), and
# the iovecs as arrays of pointer-sized words, to read and write a field of every
# message with one strided slice instead of a loop.
_WORDS = _HDR // 4
_W_NAMELEN, _W_FLAGS, _W_LEN = _OFF_NAMELEN // 4, _OFF_FLAGS // 4, _OFF_LEN // 4
_POINTER: Literal["Q", "I"] = "Q" if ctypes.sizeof(ctypes.c_void_p) == 8 else "I"
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)

_libc = ctypes.CDLL(None, use_errno=True)
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int


class _Arena:
    """One thread's buffers: message headers, iovecs, addresses and datagram bytes."""

    def __init__(self) -> None:
        self.slots = 0
        self.bufsize = 0
        self.send_bytes = 0
        self._grow(64, MAX_DATAGRAM)
        self._grow_send(64 * 2048)

    def ensure(self, slots: int, bufsize: int) -> None:
        if slots > self.slots or bufsize > self.bufsize:
            self._grow(max(slots, self.slots), max(bufsize, self.bufsize))

    def ensure_send(self, size: int) -> None:
        if size > self.send_bytes:
            self._grow_send(max(size, 2 * self.send_bytes))

    def _grow(self, slots: int, bufsize: int) -> None:
        self.slots, self.bufsize = slots, bufsize
        self.hdrs = bytearray(slots * _HDR)
        self.iovs = bytearray(slots * _IOV)
        self.names = bytearray(slots * _NAME_STRIDE)
        self.data = bytearray(slots * bufsize)
        self.hdrs_addr = _address_of(self.hdrs)
        self.iovs_addr = _address_of(self.iovs)
        self.names_addr = _address_of(self.names)
        self.data_addr = _address_of(self.data)
        self.hdrs_view = memoryview(self.hdrs)
        self.names_view = memoryview(self.names)
        self.data_view = memoryview(self.data)
        self.hdr_words = self.hdrs_view.cast("I")
        self.iov_len = bufsize
        self._layout_recv(slots, bufsize)
        self._layout_send(slots)

    def _layout_recv(self, slots: int, bufsize: int) -> None:
        """Slot i reads into ``data[i * bufsize:]`` and its own name; the headers are
        restored from ``recv_template`` before each call (the kernel writes into them)."""
        for i in range(slots):
            _IOVEC.pack_into(self.iovs, i * _IOV, self.data_addr + i * bufsize, bufsize)
        self.recv_template = bytearray(slots * _HDR)
        for i in range(slots):
            _SLOT.pack_into(
                self.recv_template,
                i * _HDR + _OFF_NAME,
                self.names_addr + i * _NAME_STRIDE,
                _NAME_STRIDE,
                self.iovs_addr + i * _IOV,
                1,
            )

    def _layout_send(self, slots: int) -> None:
        """Slot i sends with its own iovec and name; lengths and addresses vary per call."""
        self.send_hdrs = bytearray(self.recv_template)
        self.send_iovs = bytearray(slots * _IOV)
        self.send_hdrs_addr = _address_of(self.send_hdrs)
        self.send_iovs_addr = _address_of(self.send_iovs)
        for i in range(slots):
            struct.pack_into(
                "@P", self.send_hdrs, i * _HDR + _OFF_IOV, self.send_iovs_addr + i * _IOV
            )
        self.send_hdr_words = memoryview(self.send_hdrs).cast("I")
        self.send_iov_words = memoryview(self.send_iovs).cast(_POINTER)
        self.send_names = bytearray(slots * _NAME_STRIDE)
        self.send_names_addr = _address_of(self.send_names)
        for i in range(slots):
            struct.pack_into(
                "@P", self.send_hdrs, i * _HDR + _OFF_NAME, self.send_names_addr + i * _NAME_STRIDE
            )

    def _grow_send(self, size: int) -> None:
        self.send_bytes = size
        self.send_data = bytearray(size)
        self.send_data_addr = _address_of(self.send_data)


def _address_of(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


_local = threading.local()


def _arena() -> _Arena:
    arena: _Arena | None = getattr(_local, "arena", None)
    if arena is None:
        arena = _local.arena = _Arena()
    return arena


class BatchSocket:
    """A UDP socket read and written many datagrams per system call.

    ``sock`` stays owned by the caller (closing it is the caller's job); it must
    be a bound ``SOCK_DGRAM`` socket of family ``AF_INET`` or ``AF_INET6``.
    ``bufsize`` is the largest datagram received whole; a longer one is dropped
    and counted in :attr:`truncated`.
    """

    def __init__(self, sock: socket.socket, *, bufsize: int = MAX_DATAGRAM) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError("BatchSocket needs an AF_INET or AF_INET6 socket")
        if sock.type != socket.SOCK_DGRAM:
            raise ValueError("BatchSocket needs a SOCK_DGRAM socket")
        if not 1 <= bufsize <= MAX_DATAGRAM:
            raise ValueError(f"bufsize must be 1..{MAX_DATAGRAM}")
        self._sock, self._bufsize = sock, bufsize
        self._v6 = sock.family == socket.AF_INET6
        self._decoded: dict[bytes, Address] = {}
        self._encoded: dict[Address, tuple[bytes, int]] = {}
        self.truncated = 0  # datagrams longer than bufsize, dropped

    def fileno(self) -> int:
        """The wrapped socket's descriptor (for ``loop.add_reader``)."""
        return self._sock.fileno()

    # --- receive ---------------------------------------------------------------------------

    def recv_batch(self, max: int = 64) -> list[tuple[bytes, Address]]:
        """Up to ``max`` queued datagrams with their sources; ``[]`` when none is queued.

        Never blocks. Raises :class:`OSError` for errors other than "try again".
        """
        if max < 1:
            raise ValueError("max must be at least 1")
        arena = _arena()
        arena.ensure(max, self._bufsize)
        arena.hdrs_view[: max * _HDR] = arena.recv_template[: max * _HDR]
        self._fix_iov_lengths(arena, max)
        count = _recvmmsg(self._sock.fileno(), arena.hdrs_addr, max, _MSG_DONTWAIT, None)
        if count < 0:
            code = ctypes.get_errno()
            if code in _RETRY_LATER:
                return []
            raise OSError(code, os.strerror(code))
        return self._collect(arena, count)

    def _fix_iov_lengths(self, arena: _Arena, count: int) -> None:
        """Each slot reads at most ``bufsize`` bytes (the arena may hold longer slots)."""
        if arena.iov_len == self._bufsize:
            return
        for i in range(arena.slots):
            _IOVEC.pack_into(
                arena.iovs, i * _IOV, arena.data_addr + i * arena.bufsize, self._bufsize
            )
        arena.iov_len = self._bufsize

    def _collect(self, arena: _Arena, count: int) -> list[tuple[bytes, Address]]:
        """The ``count`` datagrams received, with loops in C (no per-datagram bytecode)."""
        words, end = arena.hdr_words, count * _WORDS
        if any(map(operator.and_, words[_W_FLAGS:end:_WORDS].tolist(), repeat(_MSG_TRUNC))):
            return self._collect_each(arena, count)
        lengths = words[_W_LEN:end:_WORDS].tolist()
        starts = range(0, count * arena.bufsize, arena.bufsize)
        spans = map(slice, starts, map(operator.add, starts, lengths))
        datas = list(map(bytes, map(arena.data_view.__getitem__, spans)))
        names = bytes(arena.names_view[: count * _NAME_STRIDE])
        firsts = range(0, count * _NAME_STRIDE, _NAME_STRIDE)
        namelens = words[_W_NAMELEN:end:_WORDS].tolist()
        keys = list(map(names.__getitem__, map(slice, firsts, map(operator.add, firsts, namelens))))
        found = list(map(self._decoded.get, keys))
        if None in found:
            found = [self._decode(k) if a is None else a for a, k in zip(found, keys, strict=True)]
        return list(zip(datas, cast(list[Address], found), strict=True))

    def _collect_each(self, arena: _Arena, count: int) -> list[tuple[bytes, Address]]:
        """One datagram at a time, leaving out (and counting) those cut to ``bufsize``."""
        out: list[tuple[bytes, Address]] = []
        names, data, stride = arena.names_view, arena.data_view, arena.bufsize
        for i, (namelen, flags, length) in enumerate(
            _RESULT.iter_unpack(arena.hdrs_view[: count * _HDR])
        ):
            if flags & _MSG_TRUNC:
                self.truncated += 1
                continue
            start = i * _NAME_STRIDE
            key = bytes(names[start : start + namelen])
            addr = self._decoded.get(key)
            if addr is None:
                addr = self._decode(key)
            out.append((bytes(data[i * stride : i * stride + length]), addr))
        return out

    def _decode(self, raw: bytes) -> Address:
        if len(self._decoded) >= _CACHE_LIMIT:
            self._decoded.clear()
        addr = self._decoded[raw] = decode_sockaddr(raw)
        return addr

    # --- send ------------------------------------------------------------------------------

    def send_batch(self, items: Sequence[tuple[bytes, Address]]) -> int:
        """Send each ``(data, (host, port))``; how many the kernel took.

        A datagram the kernel refuses (unreachable, filtered) is skipped and the
        rest still go; when the socket's buffer is full the rest are dropped, as
        UDP may. A host that is not a literal address of the socket's family
        raises :class:`ValueError` before anything is sent.
        """
        if not items:
            return 0
        addrs = list(map(_SECOND, items))
        names = list(map(self._encoded.get, addrs))
        if None in names:
            names = [self._encode(a) if n is None else n for n, a in zip(names, addrs, strict=True)]
        arena = _arena()
        arena.ensure(len(items), 1)
        sent = 0
        for start in range(0, len(items), arena.slots):
            chunk = items[start : start + arena.slots]
            sent += self._send_chunk(arena, chunk, names[start : start + arena.slots])
        return sent

    def _send_chunk(
        self,
        arena: _Arena,
        items: Sequence[tuple[bytes, Address]],
        names: Sequence[tuple[bytes, int] | None],
    ) -> int:
        """Copy a chunk into the arena and send it; every field is written with loops in C."""
        count = len(items)
        datas = list(map(_FIRST, items))
        sizes = array(_POINTER, map(len, datas))
        blob = b"".join(datas)
        arena.ensure_send(len(blob))
        ctypes.memmove(arena.send_data_addr, blob, len(blob))
        raw_names = b"".join(map(_FIRST, names))  # type: ignore[arg-type]
        ctypes.memmove(arena.send_names_addr, raw_names, len(raw_names))
        iov = arena.send_iov_words
        iov[1 : 2 * count : 2] = sizes
        iov[0 : 2 * count : 2] = array(
            _POINTER, islice(accumulate(sizes, initial=arena.send_data_addr), count)
        )
        namelens = array("I", map(_SECOND, names))  # type: ignore[arg-type]
        arena.send_hdr_words[_W_NAMELEN : count * _WORDS : _WORDS] = namelens
        return self._sendmmsg(arena, count)

    def _sendmmsg(self, arena: _Arena, count: int) -> int:
        sent, done, fd = 0, 0, self._sock.fileno()
        while done < count:
            n = _sendmmsg(fd, arena.send_hdrs_addr + done * _HDR, count - done, _MSG_DONTWAIT)
            if n > 0:
                sent, done = sent + n, done + n
                continue
            code = ctypes.get_errno()
            if n == 0 or code in _RETRY_LATER:
                break
            done += 1  # this datagram was refused (unreachable, filtered): skip it
        return sent

    def _encode(self, addr: Address) -> tuple[bytes, int]:
        encoded = self._encoded.get(addr)
        if encoded is None:
            if len(self._encoded) >= _CACHE_LIMIT:
                self._encoded.clear()
            encoded = self._encoded[addr] = encode_sockaddr(addr, v6=self._v6)
        return encoded


def decode_sockaddr(raw: bytes) -> Address:
    """A ``sockaddr_in``/``sockaddr_in6`` as ``(host, port)``, spelled as ``recvfrom`` does."""
    (family,) = _SOCKADDR_IN.unpack_from(raw)
    (port,) = _PORT.unpack_from(raw, 2)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 28:
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        (scope,) = _IN6_TAIL.unpack_from(raw, 24)
        return (f"{host}%{_scope_name(scope)}" if scope else host), port
    raise ValueError(f"unexpected socket address family {family}")


def encode_sockaddr(addr: Address, *, v6: bool) -> tuple[bytes, int]:
    """``(host, port)`` as a socket address padded to the name stride, and its length."""
    host, port = addr
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    text, _, scope = host.partition("%")
    try:
        packed4 = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        packed4 = None
    if packed4 is not None and not v6:
        raw = _SOCKADDR_IN.pack(socket.AF_INET) + _PORT.pack(port) + packed4
        return raw.ljust(_NAME_STRIDE, b"\0"), 16
    if not v6:
        raise ValueError(f"{host!r} is not an IPv4 address (the socket is IPv4)")
    if packed4 is not None:
        packed6 = b"\0" * 10 + b"\xff\xff" + packed4
    else:
        try:
            packed6 = socket.inet_pton(socket.AF_INET6, text)
        except OSError:
            raise ValueError(f"{host!r} is not an IP address") from None
    raw = (
        _SOCKADDR_IN.pack(socket.AF_INET6)
        + _PORT.pack(port)
        + _IN6_TAIL.pack(0)
        + packed6
        + _IN6_TAIL.pack(_scope_index(scope))
    )
    return raw.ljust(_NAME_STRIDE, b"\0"), 28


def _scope_name(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return str(index)


def _scope_index(scope: str) -> int:
    if not scope:
        return 0
    if scope.isdigit():
        return int(scope)
    try:
        return socket.if_nametoindex(scope)
    except OSError:
        raise ValueError(f"unknown interface {scope!r} in a scoped address") from None
