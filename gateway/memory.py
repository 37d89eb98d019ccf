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

:func:`trim_ctx` sets both up from the API app's ``cleanup_ctx``; on a C library
without ``mallopt``/``malloc_trim`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
from collections.abc import AsyncIterator, Callable
from functools import cache

from aiohttp import web

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
    """A ``cleanup_ctx`` entry mapping large buffers on their own and calling ``release``
    every ``interval`` s (0: neither); it stops by itself when the C library cannot trim."""

    async def run() -> None:
        while True:
            await asyncio.sleep(interval)
            if not release():
                return

    async def ctx(_app: web.Application) -> AsyncIterator[None]:
        if interval > 0:
            map_large_buffers()
        task = asyncio.create_task(run(), name="malloc-trim") if interval > 0 else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return ctx
