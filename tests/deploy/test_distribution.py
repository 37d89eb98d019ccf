"""The distribution: sdist and wheel from a clean copy, the hash-checked locks, a real install.

The ``build`` tests copy the checkout's files (``git ls-files``: tracked plus untracked
and not ignored, so uncommitted work counts; nothing else of the working tree) to a
temporary directory, run ``python -m build`` there, check what the wheel and the sdist
carry, build the wheel again from the sdist, and install the wheel into a fresh venv the
way it ships: ``pip install --require-hashes -r requirements/runtime.txt`` then
``pip install --no-deps WHEEL``. They need PyPI (or pip's cache) and take about a minute.

The lock tests are offline: each lock pins every dependency pyproject.toml declares, at
a version it allows, with hashes, and dev.txt agrees with runtime.txt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION: str = PYPROJECT["project"]["version"]
PACKAGES: list[str] = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
RUNTIME_LOCK = REPO / "requirements" / "runtime.txt"
DEV_LOCK = REPO / "requirements" / "dev.txt"
NOT_SHIPPED = ("lab/", "tests/", "benchmarks/", "docs/", "scripts/")


# -- the locks ---------------------------------------------------------------------------


def _pins(lock: Path) -> dict[str, tuple[str, int]]:
    """``name -> (version, number of hashes)`` for every requirement of a pip-compile lock."""
    pins: dict[str, tuple[str, int]] = {}
    text = lock.read_text()
    for match in re.finditer(
        r"^([A-Za-z0-9._-]+)==(\S+)((?: \\\n\s+--hash=sha256:[0-9a-f]{64})*)", text, re.M
    ):
        pins[canonicalize_name(match[1])] = (match[2], match[3].count("--hash=sha256:"))
    requirement_lines = [
        line for line in text.splitlines() if line and not line[0].isspace() and line[0] != "#"
    ]
    assert len(pins) == len(requirement_lines), f"{lock.name}: a line is not NAME==VERSION + hashes"
    return pins


def _check_declared(lock: Path, declared: list[str]) -> None:
    pins = _pins(lock)
    for spec in declared:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock.name} does not pin {req.name}: run sh scripts/lock.sh"
        version, _ = pins[name]
        assert req.specifier.contains(version, prereleases=True), (
            f"{lock.name} pins {req.name}=={version}, pyproject.toml wants {req.specifier}: "
            "run sh scripts/lock.sh"
        )


def test_runtime_lock_pins_every_dependency_with_hashes() -> None:
    _check_declared(RUNTIME_LOCK, PYPROJECT["project"]["dependencies"])
    pins = _pins(RUNTIME_LOCK)
    assert all(hashes for _, hashes in pins.values())
    # compiled dependencies: one wheel per platform and Python at least (x86-64 and aarch64
    # manylinux for CPython 3.11 among them), not only the file this machine would pick
    for name in ("pynacl", "cryptography", "aiohttp", "pydantic-core", "pyyaml", "greenlet"):
        assert pins[name][1] >= 4, f"runtime.txt has {pins[name][1]} hashes for {name}"


def test_dev_lock_pins_the_dev_extras_and_agrees_with_runtime() -> None:
    _check_declared(DEV_LOCK, PYPROJECT["project"]["optional-dependencies"]["dev"])
    _check_declared(DEV_LOCK, PYPROJECT["project"]["dependencies"])
    runtime, dev = _pins(RUNTIME_LOCK), _pins(DEV_LOCK)
    differ = {name: (runtime[name][0], dev[name][0]) for name in runtime if name in dev}
    assert {name: pair for name, pair in differ.items() if pair[0] != pair[1]} == {}
    assert all(hashes for _, hashes in dev.values())


def test_locks_say_how_they_are_made() -> None:
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        header = lock.read_text().split("\n\n", 1)[0]
        assert "sh scripts/lock.sh" in header
        assert "--require-hashes" in header


# -- the build ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    source: Path  # the clean copy the build ran in (the checkout may change meanwhile)
    files: tuple[str, ...]  # what was copied there
    wheel: Path
    sdist: Path

    def shipped(self) -> list[str]:
        """The package files a wheel must carry (the copied ones, minus bytecode)."""
        return sorted(
            name
            for name in self.files
            if name.split("/", 1)[0] in PACKAGES and "__pycache__" not in name
        )


def _run(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _checkout_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    return [name for name in out.decode().split("\0") if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout")
    root = tmp_path_factory.mktemp("dist")
    source = root / "src"
    files = []
    for name in _checkout_files():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(REPO / name, target)
        except FileNotFoundError:  # removed from the working tree since ls-files
            continue
        files.append(name)
    _run(sys.executable, "-m", "build", "--outdir", root / "dist", source)
    (wheel,) = (root / "dist").glob("*.whl")
    (sdist,) = (root / "dist").glob("*.tar.gz")
    return Dist(source=source, files=tuple(files), wheel=wheel, sdist=sdist)


def _wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


@pytest.mark.build
def test_build_makes_a_wheel_and_an_sdist_of_this_version(dist: Dist) -> None:
    assert dist.wheel.name == f"wiregate-{VERSION}-py3-none-any.whl"
    assert dist.sdist.name == f"wiregate-{VERSION}.tar.gz"


@pytest.mark.build
def test_wheel_carries_what_the_gateway_serves_and_nothing_else(dist: Dist) -> None:
    names = _wheel_names(dist.wheel)
    missing = [name for name in dist.shipped() if name not in names]
    assert missing == [], f"the wheel lacks {missing}"
    for required in (
        "gateway/api/bootstrap.sh",
        "gateway/web/static/wiregate.css",
        "gateway/web/templates/base.html",
        "gateway/store/migrations/script.py.mako",
        "gateway/store/migrations/env.py",
        "gateway/store/migrations/versions/0001_initial.py",
    ):
        assert required in names
    top = {name.split("/", 1)[0] for name in names}
    assert top == {*PACKAGES, f"wiregate-{VERSION}.dist-info"}
    assert not [name for name in names if name.startswith(NOT_SHIPPED) or "__pycache__" in name]
    with zipfile.ZipFile(dist.wheel) as zf:
        assert (
            zf.read("gateway/api/bootstrap.sh")
            == (dist.source / "deploy/bootstrap.sh").read_bytes()
        )
        entry_points = zf.read(f"wiregate-{VERSION}.dist-info/entry_points.txt").decode()
    assert "wiregate = wiregate.cli.main:main" in entry_points


@pytest.mark.build
def test_sdist_carries_the_sources_deploy_and_locks(dist: Dist) -> None:
    prefix = f"wiregate-{VERSION}/"
    with tarfile.open(dist.sdist) as tf:
        names = {name.removeprefix(prefix) for name in tf.getnames()}
    for required in (
        "pyproject.toml",
        "README.md",
        "deploy/bootstrap.sh",
        "requirements/runtime.txt",
        "requirements/dev.txt",
        *dist.shipped(),
    ):
        assert required in names, f"the sdist lacks {required}"
    assert not [name for name in names if name.startswith(("lab/", "tests/", "benchmarks/"))]


@pytest.mark.build
def test_sdist_builds_the_same_wheel(dist: Dist, tmp_path: Path) -> None:
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path, dist.sdist)
    (rebuilt,) = tmp_path.glob("*.whl")
    assert rebuilt.name == dist.wheel.name
    assert _wheel_names(rebuilt) == _wheel_names(dist.wheel)


PROBE = """
import json, sys
from importlib.metadata import version
import gateway.app, agent.daemon, relay.aio.stun
import jinja2
from gateway.api.bootstrap import script_path
from gateway.store.migrate import head_revision
templates = jinja2.Environment(loader=jinja2.PackageLoader("gateway.web", "templates"))
print(json.dumps({
    "version": version("wiregate"),
    "gateway": gateway.app.__file__,
    "bootstrap": str(script_path()),
    "head": head_revision(),
    "templates": sorted(templates.list_templates()),
}))
"""


@pytest.fixture(scope="module")
def venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the locked runtime dependencies and the wheel, nothing else."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    _run(sys.executable, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    _run(pip, "install", "-q", "--require-hashes", "-r", dist.source / "requirements/runtime.txt")
    _run(pip, "install", "-q", "--no-deps", dist.wheel)
    yield venv


@pytest.mark.build
def test_installed_wheel_runs(dist: Dist, venv: Path, tmp_path: Path) -> None:
    assert _run(venv / "bin" / "wiregate", "--version", cwd=tmp_path).split() == [
        "wiregate,",
        "version",
        VERSION,
    ]
    # cwd is not the checkout, so everything below comes from the venv
    facts = json.loads(_run(venv / "bin" / "python", "-c", PROBE, cwd=tmp_path))
    site = venv / "lib"
    assert facts["version"] == VERSION
    assert Path(facts["gateway"]).is_relative_to(site)
    bootstrap = Path(facts["bootstrap"])
    assert bootstrap.is_relative_to(site)
    assert bootstrap.read_bytes() == (dist.source / "deploy" / "bootstrap.sh").read_bytes()
    assert facts["templates"] == sorted(
        p.name for p in (dist.source / "gateway/web/templates").iterdir() if p.is_file()
    )
    # the newest migration is known, i.e. the packaged migrations load
    revisions = [
        p.read_text() for p in (dist.source / "gateway/store/migrations/versions").glob("*.py")
    ]
    assert facts["head"] is not None
    assert any(f'revision = "{facts["head"]}"' in text for text in revisions)
    _run(venv / "bin" / "pip", "check")
