"""What the process and device verbs share: ``--config``, the log options, settings.

Flags win over ``WIREGATE_…`` environment variables, which win over the TOML
file given with ``--config`` (or ``WIREGATE_CONFIG``), which wins over defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from wiregate.cli.output import fail
from wiregate.errors import WiregateError
from wiregate.logging import configure_logging
from wiregate.settings import load_settings

__all__ = ["config_option", "exit_with", "settings_or_exit", "with_logs"]


config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="WIREGATE_CONFIG",
    help="TOML configuration file.",
)
_log_options = [
    click.option("--log-level", default=None, help="debug, info, warning, error."),
    click.option("--log-format", default=None, help="auto, json or console."),
]


def with_logs(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_log_options):
        fn = option(fn)
    return fn


def exit_with(exc: WiregateError, status: int = 1) -> NoReturn:
    """``error: …`` and, when there is one, ``hint: …`` on stderr (under ``--json``: the
    JSON error document on stdout, :mod:`wiregate.cli.output`); exit with ``status``."""
    fail(exc, status)


def settings_or_exit(cls: type[Any], config_file: Path | None, **flags: Any) -> Any:
    try:
        settings = load_settings(cls, config_file, **flags)
    except WiregateError as exc:
        exit_with(exc)
    configure_logging(settings.log_level, settings.log_format)
    return settings
