"""``wiregate policy check FILE``: validate a policy file, run its tests, summarize it."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from wiregate.errors import WiregateError

__all__ = ["policy"]


@click.group()
def policy() -> None:
    """Work with the gateway's policy file (groups, tag rules, ACLs, routes, tests)."""


@policy.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
def check(file: Path) -> None:
    """Validate FILE (YAML or JSON) and run its tests; print every failure, or a summary."""
    from identity.policy_file import load_policy_file

    try:
        document = load_policy_file(file, check_tests=False)
    except WiregateError as exc:
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
        sys.exit(1)
    failures = document.failures()
    for failure in failures:
        click.echo(f"error: policy test failed: {failure}", err=True)
    if failures:
        click.echo(f"{file}: {len(failures)} of the policy's test expectations failed", err=True)
        sys.exit(1)
    click.echo(f"{file}: ok")
    click.echo(document.summary())
