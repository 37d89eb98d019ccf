"""gateway/memory.py: freed C-heap space pinned by live chunks goes back to the system,
the app's trim task runs on its interval and stops trimming where the C library cannot,
cyclic garbage is collected on the interval, and the source lines logged tracebacks
read are not kept."""

from __future__ import annotations

import asyncio
import gc
import json
import linecache
import platform
import subprocess
import sys
import traceback
import weakref
from pathlib import Path

import pytest
from aiohttp import web

from gateway.memory import release_free_memory, trim_ctx

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_free_heap_pages_pinned_by_live_chunks_are_returned() -> None:
    # The soak's pattern in small: 40 MiB of 1 KiB buffers (from malloc, not pymalloc),
    # every 64th kept alive, the rest freed. The kept ones pin the freed space inside
    # the heap, so glibc keeps it resident; trimming gives it back.
    buffers = [bytes(1024) for _ in range(40 * 1024)]
    kept = buffers[::64]
    del buffers
    pinned = rss_kb()
    assert release_free_memory()
    released = pinned - rss_kb()
    assert released > 20 * 1024, f"released only {released} KiB of ~39 MiB freed"
    assert len(kept) == 640


MAPPED_GROWTH = """
import ctypes, sys
from gateway.memory import map_large_buffers
fields = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = type("MallInfo2", (ctypes.Structure,), {"_fields_": fields})
if sys.argv[1] == "set":
    assert map_large_buffers()
before = libc.mallinfo2().hblkhd
buffers = [bytes(100 * 1024) for _ in range(8)]
print((libc.mallinfo2().hblkhd - before) >> 10)
"""


def mapped_growth_kb(setting: str) -> int:
    """KiB glibc maps on their own for eight live 100 KiB buffers in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", MAPPED_GROWTH, setting], check=True,
                         capture_output=True, text=True)  # fmt: skip
    return int(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_large_buffers_are_mapped_on_their_own() -> None:
    # glibc's default threshold starts at 128 KiB and only rises: 100 KiB buffers that
    # no free chunk holds grow the heap, where what is allocated next pins their space.
    # With the threshold set, a buffer still comes out of the heap's top chunk while that
    # has room (up to M_TOP_PAD, 128 KiB, past the interpreter's own data), so of eight
    # at most two do; the rest are mapped.
    assert mapped_growth_kb("default") == 0
    assert mapped_growth_kb("set") >= 600


async def test_the_trim_task_runs_on_its_interval_and_stops_when_unsupported() -> None:
    calls: list[bool] = []

    def release() -> bool:
        calls.append(True)
        return len(calls) < 3  # a C library without malloc_trim answers False

    ctx = trim_ctx(0.01, release)(web.Application()).__aiter__()
    await ctx.__anext__()
    await asyncio.sleep(0.2)
    assert len(calls) == 3  # none after the first False
    with pytest.raises(StopAsyncIteration):
        await ctx.__anext__()


async def test_the_source_lines_of_logged_tracebacks_are_dropped_on_the_interval() -> None:
    # Formatting a traceback reads each of its files whole into linecache, for good.
    try:
        json.loads("{")
    except ValueError:
        traceback.format_exc()
    assert json.decoder.__file__ in linecache.cache
    ctx = trim_ctx(0.01, lambda: False)(web.Application()).__aiter__()
    await ctx.__anext__()
    await asyncio.sleep(0.1)  # on a C library without malloc_trim as well
    assert linecache.cache == {}
    with pytest.raises(StopAsyncIteration):
        await ctx.__anext__()


async def test_interval_zero_never_trims() -> None:
    calls: list[bool] = []

    def release() -> bool:
        calls.append(True)
        return True

    ctx = trim_ctx(0, release)(web.Application()).__aiter__()
    await ctx.__anext__()
    await asyncio.sleep(0.05)
    with pytest.raises(StopAsyncIteration):
        await ctx.__anext__()
    assert calls == []


class Node:
    """A garbage cycle's member."""

    def __init__(self) -> None:
        self.me = self


async def test_cyclic_garbage_does_not_outlive_an_interval() -> None:
    ctx = trim_ctx(0.02, lambda: True)(web.Application()).__aiter__()
    await ctx.__anext__()
    assert gc.get_freeze_count() > 0  # what the app held as it started: never examined
    gc.disable()  # only the task collects
    try:
        cycles = [weakref.ref(Node()) for _ in range(1000)]
        assert all(c() is not None for c in cycles)
        await asyncio.sleep(0.1)
        assert all(c() is None for c in cycles)
    finally:
        gc.enable()
        with pytest.raises(StopAsyncIteration):
            await ctx.__anext__()
    assert gc.get_freeze_count() == 0  # collectable again once the app stopped
