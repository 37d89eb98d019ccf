"""Run a coroutine on a thread that lives in a lab network namespace.

``setns(2)`` moves only the calling thread, and threads it starts inherit its
namespace, so the simulated agents' sockets (and the executor threads their
loop starts) are all inside the lab while the rest of the process stays put.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["run_in_netns"]

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _enter(netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(netns: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(main())`` on a new thread inside ``netns``; its result or exception."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            _enter(netns)
            outcome["result"] = asyncio.run(main())
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"soak-{netns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    result: T = outcome["result"]
    return result
