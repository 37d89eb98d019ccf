"""Giving the C allocator's free memory back to the system.

Under churn the gateway allocates and frees many short-lived buffers (map texts,
WebSocket frames, HTTP bodies, database rows) between longer-lived ones. glibc
keeps the freed space inside its heap, where the long-lived chunks pin it: the
Python objects the gateway holds stay level, but the heap's free space, and with
it the process's RSS, creeps up (about 2 MiB a minute in the 300-agent soak,
tests/soak/memory.py). Two settings keep it level:

* buffers of :data:`MMAP_THRESHOLD` bytes or more (full maps, large bodies) that
  the heap's top chunk has no room for are mapped on their own and unmapped when
  freed, instead of glibc's default, which
  moves that threshold up to the largest buffer freed so far and then carves such
  buffers out of the heap, where what is allocated next pins their space;
* ``malloc_trim(0)`` every :data:`TRIM_INTERVAL_S` seconds returns every free page
  of the heap to the system (``madvise``), so RSS follows what is in use.

On the same interval the garbage collector runs in full. Every closed map stream
leaves a reference cycle behind, some 35 objects and 7 KiB (aiohttp's
``RequestHandler``, ``Request``, ``WebSocketResponse`` with its reader and writer,
the transport and the socket), which only a collection of the oldest generation
frees; left to its thresholds the collector runs one only once the objects that
survived into that generation since the last number a quarter of those there
already (some 45,000 in the soak), so the cycles of hundreds of streams piled up in
between and the next live objects pinned their space (the tracked objects went up
and down by 5,000-10,000, RSS only up). Collected every 30 s they are some 1,500
objects. So that a full collection is cheap, what the gateway holds when it starts
serving (its modules, settings, store, policy and loaded devices: 140,000 of 180,000
objects) is moved out of the collector's generations (``gc.freeze``) until the app
stops.

On the same interval the interpreter's cache of source lines (:mod:`linecache`) is
emptied: each logged exception (``format_exc_info``) reads every file of its
traceback into it whole, and nothing ever drops them, so a burst of errors (a
database pool timing out under load: aiohttp, SQLAlchemy, asyncpg and our own
modules, 87 tracebacks) pinned 1.2 MiB per replica for good in the soak.

:func:`trim_ctx` sets all this up from the API app's ``cleanup_ctx``; on a C library
without ``mallopt``/``malloc_trim`` (musl, macOS) it only collects and empties the
line cache.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import linecache
from collections.abc import AsyncIterator, Callable
from functools import cache

from aiohttp import web

from wiregate.tasks import cancel_and_wait

__all__ = ["MMAP_THRESHOLD", "TRIM_INTERVAL_S", "map_large_buffers", "release_free_memory",
           "trim_ctx"]  # fmt: skip

TRIM_INTERVAL_S = 30.0
MMAP_THRESHOLD = 64 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter (glibc malloc.h)


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)  # this process's own symbols, the C library's among them
    except OSError:
        return None


def _function(name: str, *argtypes: type) -> Callable[..., int] | None:
    function = getattr(_libc(), name, None)
    if function is None:
        return None
    function.argtypes, function.restype = list(argtypes), ctypes.c_int
    return function  # type: ignore[no-any-return]


def _malloc_trim() -> Callable[[int], int] | None:
    return _function("malloc_trim", ctypes.c_size_t)


def map_large_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Map buffers of ``threshold`` bytes or more on their own, always (a fixed
    ``M_MMAP_THRESHOLD``); whether the C library took it."""
    mallopt = _function("mallopt", ctypes.c_int, ctypes.c_int)
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, threshold) == 1


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system; whether the C library can."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def trim_ctx(
    interval: float = TRIM_INTERVAL_S, release: Callable[[], bool] = release_free_memory
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry (see the module docstring): it maps large buffers on their
    own, freezes what the app holds so far and, every ``interval`` s, collects garbage,
    empties :mod:`linecache` and calls ``release`` (no more once it answered False: the
    C library cannot trim). ``interval`` 0: none of it."""

    async def run() -> None:
        trimming = True
        while True:
            await asyncio.sleep(interval)
            gc.collect()
            linecache.clearcache()
            trimming = trimming and release()

    async def ctx(_app: web.Application) -> AsyncIterator[None]:
        if interval <= 0:
            yield
            return
        map_large_buffers()
        # the young generations' garbage first (a full collection would cost a test
        # process that starts hundreds of apps a tenth of a second each)
        gc.collect(1)
        gc.freeze()  # what the app holds as it starts: out of every later collection
        task = asyncio.create_task(run(), name="malloc-trim")
        try:
            yield
        finally:
            await cancel_and_wait(task)
            gc.unfreeze()

    return ctx
