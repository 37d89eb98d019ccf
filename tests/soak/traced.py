"""``python -m tests.soak.traced ARGS…``: ``wiregate ARGS…`` with memory introspection.

Writes into ``$WIREGATE_TRACEMALLOC_DIR``:

* on SIGUSR2, one JSON line appended to ``stats.jsonl``: VmRSS, the interpreter's
  allocated blocks, the number of objects the garbage collector tracks (and has
  frozen, and collected so far per generation), the 25 most numerous types among
  them, glibc's ``mallinfo2`` (heap in use, free inside the heap, mmapped) and the
  resident size of the brk heap, of anonymous mappings and of files (smaps) —
  cheap, so untraced runs sample it too, and it tells Python objects from
  allocator fragmentation;
* with ``WIREGATE_TRACEMALLOC_FRAMES`` > 0, tracemalloc runs with that many frames
  per allocation and each SIGUSR1 writes ``snapshot-N.pickle`` (N from 0; the file
  appears whole, by rename).

tests/soak/memory.py starts the gateway replicas this way. Debugging only:
tracing slows the process and costs memory of its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import signal
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["SNAPSHOT_PATTERN", "STATS_FILE", "main", "memory_stats"]

SNAPSHOT_PATTERN = "snapshot-{}.pickle"
STATS_FILE = "stats.jsonl"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost",
    )]  # fmt: skip


def _mallinfo() -> dict[str, int]:
    """glibc's heap figures in KiB (empty elsewhere): ``arena`` (the brk heap),
    ``in_use``, ``free`` (inside the heaps), ``mmapped``."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallinfo2"):
        return {}
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {"arena_kb": info.arena >> 10, "in_use_kb": info.uordblks >> 10,
            "free_kb": info.fordblks >> 10, "mmapped_kb": info.hblkhd >> 10}  # fmt: skip


def _mappings() -> dict[str, int]:
    """Resident KiB by kind of mapping (/proc/self/smaps): ``heap_rss_kb`` (the brk
    heap), ``anon_rss_kb`` (anonymous mappings: pymalloc's arenas, thread arenas and
    stacks, mmapped buffers), ``file_rss_kb`` (code and data of the program and its
    libraries)."""
    totals = {"heap_rss_kb": 0, "anon_rss_kb": 0, "file_rss_kb": 0}
    kind = "anon_rss_kb"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            name = fields[5] if len(fields) > 5 else ""
            kind = ("heap_rss_kb" if name == "[heap]" else
                    "file_rss_kb" if name.startswith("/") else "anon_rss_kb")  # fmt: skip
        elif fields[0] == "Rss:":
            totals[kind] += int(fields[1])
    return totals


def _types(top: int = 25) -> dict[str, int]:
    """How many objects of each type the garbage collector tracks, the ``top`` most."""
    return dict(Counter(type(o).__qualname__ for o in gc.get_objects()).most_common(top))


def memory_stats() -> dict[str, Any]:
    """This process's memory figures now (see the module docstring)."""
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    stats: dict[str, Any] = {
        "time": time.time(),
        "rss_kb": rss,
        "allocated_blocks": sys.getallocatedblocks(),
        "gc_objects": len(gc.get_objects()),
        "gc_frozen": gc.get_freeze_count(),
        "gc_collected": [g["collected"] for g in gc.get_stats()],  # per generation, so far
    }
    if tracemalloc.is_tracing():
        stats["traced_kb"] = tracemalloc.get_traced_memory()[0] >> 10
    return stats | _mallinfo() | _mappings() | {"types": _types()}


def _install(directory: Path) -> None:
    taken = 0

    def dump(_signum: int, _frame: FrameType | None) -> None:
        nonlocal taken
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        path = directory / SNAPSHOT_PATTERN.format(taken)
        partial = path.with_suffix(".partial")
        snapshot.dump(str(partial))
        partial.rename(path)
        taken += 1

    def stats(_signum: int, _frame: FrameType | None) -> None:
        with (directory / STATS_FILE).open("a") as out:
            out.write(json.dumps(memory_stats()) + "\n")

    if tracemalloc.is_tracing():
        signal.signal(signal.SIGUSR1, dump)
    signal.signal(signal.SIGUSR2, stats)


def main() -> int:
    directory = Path(os.environ["WIREGATE_TRACEMALLOC_DIR"])
    directory.mkdir(parents=True, exist_ok=True)
    frames = int(os.environ.get("WIREGATE_TRACEMALLOC_FRAMES", "0"))
    if frames > 0:
        tracemalloc.start(frames)
    _install(directory)
    from wiregate.cli.main import main as wiregate

    wiregate(args=sys.argv[1:], prog_name="wiregate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
