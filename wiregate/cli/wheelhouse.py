"""``wiregate wheelhouse build``: wiregate's wheel and every runtime dependency's wheels.

The result is what the gateway serves to VMs (``wheelhouse_dir``: ``/simple/``,
``/wheels/``) and what ``bootstrap.sh --find-links DIR`` installs from: binary wheels
only, for CPython on manylinux (glibc 2.28 or newer) x86_64 and aarch64, plus
``SHA256SUMS`` and one ``requirements-<platform>.txt`` (every package pinned, with
hashes). With the lock ``requirements/runtime.txt`` in the source tree the dependencies
are downloaded with ``--require-hashes`` from it; without it, from pyproject.toml's
dependencies. The same command runs at image build time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path

import click

__all__ = ["platform_tags", "wheelhouse"]

_SOURCE = Path(__file__).resolve().parents[2]
_PLATFORMS = ("x86_64", "aarch64")
_GLIBC_MINOR = 28  # the newest glibc a wheel may need: RHEL 8, Debian 10, Ubuntu 20.04


def platform_tags(machine: str) -> list[str]:
    """pip ``--platform`` tags a glibc-2.28 ``machine`` runs, preferred first."""
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(_GLIBC_MINOR, 16, -1)]
    tags.append(f"manylinux2014_{machine}")  # manylinux2010 and manylinux1 follow (pip)
    if machine == "x86_64":
        tags += [f"manylinux_2_12_{machine}", f"manylinux_2_5_{machine}"]
    return tags


@click.group()
def wheelhouse() -> None:
    """The wheels VMs install from (served by the gateway with wheelhouse_dir)."""


@wheelhouse.command()
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Directory to write (created; must be empty).")  # fmt: skip
@click.option("--platform", "platforms", multiple=True, type=click.Choice(_PLATFORMS),
              help="Machine (uname -m) to include; repeatable. Default: all.")  # fmt: skip
@click.option("--python-version", "pythons", multiple=True, default=("3.11",), show_default=True,
              help="CPython version (X.Y) to include; repeatable.")  # fmt: skip
@click.option("--source", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="wiregate's source tree. Default: this one, else '.'.")  # fmt: skip
def build(
    out: Path, platforms: tuple[str, ...], pythons: tuple[str, ...], source: Path | None
) -> None:
    """Build the wheelhouse into OUT: wiregate's wheel, its dependencies' wheels, SHA256SUMS
    and requirements-<platform>.txt."""
    from gateway.packages import requirements_name, write_index

    source = source or (_SOURCE if (_SOURCE / "pyproject.toml").is_file() else Path.cwd())
    if not (source / "pyproject.toml").is_file():
        raise click.ClickException(f"{source} has no pyproject.toml: pass --source DIR")
    for version in pythons:
        parts = version.split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or parts[0] != "3":
            raise click.ClickException(f"--python-version {version!r} is not 3.X")
    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} is not empty: build into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    lock = source / "requirements" / "runtime.txt"
    with tempfile.TemporaryDirectory(prefix="wiregate-wheelhouse-") as tmp:
        if lock.is_file():
            wanted = ["--require-hashes", "-r", str(lock)]
            click.echo(f"dependencies: {lock} (hashes required)", err=True)
        else:
            deps = Path(tmp) / "dependencies.txt"
            deps.write_text("\n".join(_dependencies(source)) + "\n")
            wanted = ["-r", str(deps)]
            click.echo(f"dependencies: {source / 'pyproject.toml'} (no lock)", err=True)
        _pip("wheel", "-q", "--no-deps", "-w", str(out), str(source))
        pins: Path | None = None  # after the first download every other one takes its versions
        for machine in platforms or _PLATFORMS:
            for version in pythons:
                click.echo(f"downloading for CPython {version} on {machine}", err=True)
                args = ["download", "-q", "--only-binary=:all:", "-d", str(out)]
                for tag in platform_tags(machine):
                    args += ["--platform", tag]
                abi = "cp" + version.replace(".", "")
                args += ["--python-version", version, "--implementation", "cp", "--abi", abi]
                _pip(*args, *wanted, *(["-c", str(pins)] if pins else []))
                if pins is None and not lock.is_file():  # the lock pins them already
                    pins = Path(tmp) / "pins.txt"
                    pins.write_text(_pins_of(out))
        try:
            house = write_index(out)
        except Exception as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"{out}: {len(house.wheels)} wheels, wiregate {house.version_of('wiregate')}")
    for machine in house.platforms:
        fits = [w for w in house.wheels.values() if w.fits(machine)]
        size = sum((out / w.filename).stat().st_size for w in fits)
        click.echo(f"  {machine}: {len(fits)} wheels, {size / 2**20:.1f} MiB, "
                   f"{requirements_name(machine)}")  # fmt: skip


def _dependencies(source: Path) -> list[str]:
    with (source / "pyproject.toml").open("rb") as fh:
        doc = tomllib.load(fh)
    return [str(d) for d in doc.get("project", {}).get("dependencies", [])]


def _pins_of(out: Path) -> str:
    """``name==version`` of every wheel downloaded so far (not wiregate's own)."""
    from gateway.packages import parse_wheel_name

    pins = set()
    for wheel in out.glob("*.whl"):
        project, version, _tags = parse_wheel_name(wheel.name)
        if project != "wiregate":
            pins.add(f"{project}=={version}")
    return "\n".join(sorted(pins)) + "\n"


def _pip(*args: str) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = _run([sys.executable, "-m", "pip", *args], env)
    if done.returncode != 0:
        raise click.ClickException(f"pip {args[0]} failed:\n{done.stderr.strip()}")


def _run(cmd: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=False)
