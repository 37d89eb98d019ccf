"""How the CLI reports failure: plain text on stderr, or JSON under ``--json``.

A command run with ``--json`` that fails prints one JSON document on stdout,
``{"error": {"code": CODE, "message": MESSAGE, "hint": HINT?}}``, and exits
non-zero (1; 2 for a usage error), so a script reads one stream and one shape.
Without ``--json``: ``error: MESSAGE`` and ``hint: HINT`` on stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from wiregate.errors import WiregateError

__all__ = ["JsonErrorGroup", "error_doc", "fail", "json_requested"]


def error_doc(code: str, message: str, hint: str | None = None) -> dict[str, Any]:
    """The ``--json`` error document."""
    error = {"code": code, "message": message}
    if hint:
        error["hint"] = hint
    return {"error": error}


def json_requested() -> bool:
    """Whether the command running now was given ``--json``."""
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.params.get("as_json"):
            return True
        ctx = ctx.parent
    return False


def fail(exc: WiregateError, status: int = 1) -> NoReturn:
    """Report ``exc`` (JSON under ``--json``, else text on stderr) and exit ``status``."""
    if json_requested():
        click.echo(json.dumps(error_doc(exc.code, exc.message, exc.hint), indent=2))
    else:
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
    sys.exit(status)


def _usage_code(exc: click.ClickException) -> str:
    if isinstance(exc, click.MissingParameter):
        return "usage"
    if isinstance(exc, click.BadParameter):
        return "bad_parameter"
    return "usage" if isinstance(exc, click.UsageError) else "error"


def _wants_json(args: Sequence[str]) -> bool:
    return "--json" in args[: args.index("--")] if "--" in args else "--json" in args


class JsonErrorGroup(click.Group):
    """A group whose usage and click errors come out as JSON when ``--json`` was given
    (even when the command line did not parse)."""

    def main(self, args: Sequence[str] | None = None, *a: Any, **kw: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not _wants_json(argv) or kw.get("standalone_mode") is False:
            return super().main(argv, *a, **kw)
        kw["standalone_mode"] = False
        try:
            code = super().main(argv, *a, **kw)
        except click.ClickException as exc:
            message = exc.format_message()
            click.echo(json.dumps(error_doc(_usage_code(exc), message), indent=2))
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo(json.dumps(error_doc("aborted", "aborted"), indent=2))
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
