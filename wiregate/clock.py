"""The clock type shared by every package.

A clock is a function returning seconds as a float: POSIX time (``time.time``)
where timestamps are stored, compared with tokens or shown, monotonic time
(``time.monotonic``) where only intervals matter; each parameter's docstring or
default says which. Clocks are injected (a constructor or function argument,
defaulting to the real one), never patched: tests pass a fake clock they step by
hand instead of replacing ``time.time``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

__all__ = ["Clock"]

Clock: TypeAlias = Callable[[], float]
"""Seconds now, as a float (POSIX or monotonic, as the receiving parameter says)."""
