"""Structured logs with structlog: JSON in production, readable on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger"]


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog once per process. ``fmt`` is ``auto``, ``json`` or ``console``."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # not cached: a logger bound before a reconfiguration (tests capturing logs,
        # a CLI run inside a test process) must follow the configuration in force
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(name: str) -> Any:
    """A structlog logger bound to a component name.

    The logger is a lazy proxy: it is safe to create at import time, before
    :func:`configure_logging` runs, and it follows that configuration.
    """
    return structlog.get_logger(component=name)
