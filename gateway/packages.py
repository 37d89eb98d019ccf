"""The wheelhouse: wiregate's wheel and every runtime dependency's, as a PEP 503 index.

A wheelhouse is a directory of wheels plus ``SHA256SUMS`` (``sha256sum`` format: the
hex digest, two spaces, the file name), written when it is built (``wiregate wheelhouse
build``). The index is the source of truth: only the files it lists are served, and
their hashes are the ones written at build time, never recomputed from what is on disk
when the gateway starts. A wheel changed after the build is therefore refused by pip's
hash check on the VM (``--require-hashes``), not silently re-blessed.

What is here is pure apart from :func:`load_wheelhouse` (reads the index) and
:func:`write_index` (hashes the wheels of a directory and writes the index and the
requirements files): name normalization (PEP 503), wheel file names, the simple index
pages and the per-platform requirements text a VM installs with ``--require-hashes``.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from wiregate.errors import ConfigError

__all__ = [
    "INDEX_NAME",
    "PLATFORMS",
    "Wheel",
    "Wheelhouse",
    "load_wheelhouse",
    "normalize",
    "parse_index",
    "parse_wheel_name",
    "requirements_name",
    "sha256_file",
    "write_index",
]

INDEX_NAME = "SHA256SUMS"
#: The machines a wheelhouse is built for, as ``uname -m`` names them.
PLATFORMS = ("x86_64", "aarch64")

_NORMALIZE = re.compile(r"[-_.]+")
# name-version(-build)?-python-abi-platform.whl (PEP 427); no path separators, no dot first
_WHEEL_NAME = re.compile(
    r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._]*[A-Za-z0-9])?)"
    r"-(?P<version>[A-Za-z0-9_.!+]+)"
    r"(?:-(?P<build>\d[A-Za-z0-9_.]*))?"
    r"-(?P<python>[A-Za-z0-9_.]+)-(?P<abi>[A-Za-z0-9_.]+)-(?P<platform>[A-Za-z0-9_.]+)\.whl$"
)
_HEX = re.compile(r"^[0-9a-f]{64}$")
_REQUIREMENTS = re.compile(r"^requirements-(?P<platform>[a-z0-9_]+)\.txt$")


def normalize(name: str) -> str:
    """A project name as PEP 503 compares it: lowercase, runs of ``-_.`` to one ``-``."""
    return _NORMALIZE.sub("-", name).lower()


def requirements_name(platform: str) -> str:
    """The file name of a platform's requirements: ``requirements-x86_64.txt``."""
    return f"requirements-{platform}.txt"


@dataclass(frozen=True)
class Wheel:
    """One wheel of the index: its file name, parsed, and its sha256."""

    filename: str
    project: str  # normalized (PEP 503)
    version: str
    platform_tags: tuple[str, ...]
    sha256: str

    def fits(self, platform: str) -> bool:
        """Installable on ``platform`` (``x86_64``…): pure Python, or built for that machine."""
        return any(tag == "any" or tag.endswith("_" + platform) for tag in self.platform_tags)


def parse_wheel_name(filename: str) -> tuple[str, str, tuple[str, ...]]:
    """``aiohttp-3.9.5-cp311-cp311-manylinux2014_x86_64.whl`` to (project, version, platform
    tags); ValueError for anything that is not a plain wheel file name."""
    match = _WHEEL_NAME.match(filename)
    if match is None or ".." in filename:
        raise ValueError(f"{filename!r} is not a wheel file name")
    return (
        normalize(match["name"]),
        match["version"].replace("_", "-"),
        tuple(match["platform"].split(".")),
    )


def parse_index(text: str, *, source: str = INDEX_NAME) -> tuple[Wheel, ...]:
    """The wheels an index (``SHA256SUMS`` text) lists, sorted by file name."""
    wheels: dict[str, Wheel] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, sep, filename = line.partition("  ")
        filename = filename.removeprefix("*")  # sha256sum's binary-mode marker
        if not sep or not _HEX.match(digest):
            raise ConfigError(f"{source} line {number}: expected '<sha256>  <file>'")
        try:
            project, version, tags = parse_wheel_name(filename)
        except ValueError as exc:
            raise ConfigError(f"{source} line {number}: {exc}") from None
        if filename in wheels:
            raise ConfigError(f"{source} line {number}: {filename} is listed twice")
        wheels[filename] = Wheel(filename, project, version, tags, digest)
    return tuple(wheels[name] for name in sorted(wheels))


def format_index(hashes: Mapping[str, str]) -> str:
    """``SHA256SUMS`` text for ``{file name: sha256}`` (``sha256sum -c`` reads it)."""
    return "".join(f"{hashes[name]}  {name}\n" for name in sorted(hashes))


class Wheelhouse:
    """The wheels of one index, by project and by platform, and the pages made from them."""

    def __init__(self, directory: Path, wheels: Iterable[Wheel]) -> None:
        self.directory = directory
        self.wheels = {w.filename: w for w in wheels}
        projects: dict[str, list[Wheel]] = {}
        for wheel in self.wheels.values():
            projects.setdefault(wheel.project, []).append(wheel)
        self.projects = {name: tuple(found) for name, found in sorted(projects.items())}
        # fail when loaded, not when a VM asks: every platform's pins must be unambiguous
        self._requirements = {p: self._pins(p) for p in self._built_for()}

    def _built_for(self) -> tuple[str, ...]:
        """The platforms with wheels of their own; every platform when all are pure Python."""
        native = [w for w in self.wheels.values() if w.platform_tags != ("any",)]
        if not self.wheels:
            return ()
        return tuple(p for p in PLATFORMS if not native or any(w.fits(p) for w in native))

    def _pins(self, platform: str) -> str:
        by_project: dict[str, dict[str, list[str]]] = {}
        for wheel in self.wheels.values():
            if wheel.fits(platform):
                versions = by_project.setdefault(wheel.project, {})
                versions.setdefault(wheel.version, []).append(wheel.sha256)
        wiregate = self.version_of("wiregate")
        lines = [
            f"# wiregate {wiregate} for {platform}: every package pinned, with the sha256 of"
            if wiregate
            else f"# Every package for {platform}, pinned, with the sha256 of",
            "# each of its wheels (as the gateway's wheelhouse index lists them).",
            "# Install: pip install --require-hashes --index-url GATEWAY/simple/ -r THIS_FILE",
        ]
        for project, versions in sorted(by_project.items()):
            if len(versions) > 1:
                raise ConfigError(
                    f"the wheelhouse {self.directory} holds {project} "
                    f"{' and '.join(sorted(versions))} for {platform}",
                    hint="build each wheelhouse into an empty directory",
                )
            [(version, digests)] = versions.items()
            hashes = " \\\n".join(f"    --hash=sha256:{d}" for d in sorted(set(digests)))
            lines.append(f"{project}=={version} \\\n{hashes}")
        return "\n".join(lines) + "\n"

    @property
    def platforms(self) -> tuple[str, ...]:
        """The platforms this wheelhouse has a requirements list for."""
        return tuple(self._requirements)

    def version_of(self, project: str) -> str | None:
        found = self.projects.get(normalize(project), ())
        return found[0].version if found else None

    def requirements(self, platform: str) -> str | None:
        """The pinned, hashed requirements of ``platform``, or None when it has none."""
        return self._requirements.get(platform)

    def root_page(self) -> str:
        """``/simple/``: one anchor per project."""
        anchors = [
            f'<a href="{html.escape(name)}/">{html.escape(name)}</a><br>' for name in self.projects
        ]
        return _page("Simple index", anchors)

    def project_page(self, project: str) -> str | None:
        """``/simple/{project}/``: one anchor per wheel, ``#sha256=`` fragments; None when
        the project is not in the wheelhouse (``project`` must be normalized)."""
        wheels = self.projects.get(project)
        if wheels is None:
            return None
        anchors = [
            f'<a href="../../wheels/{html.escape(w.filename)}#sha256={w.sha256}">'
            f"{html.escape(w.filename)}</a><br>"
            for w in sorted(wheels, key=lambda w: w.filename)
        ]
        return _page(f"Links for {html.escape(project)}", anchors)

    def path_of(self, filename: str) -> Path | None:
        """The file of a listed wheel; None for anything the index does not list."""
        if filename not in self.wheels:
            return None
        return self.directory / filename


def _page(title: str, anchors: list[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n"
        '<meta name="pypi:repository-version" content="1.0">\n'
        f"<title>{title}</title>\n</head>\n<body>\n<h1>{title}</h1>\n"
        + "\n".join(anchors)
        + "\n</body>\n</html>\n"
    )


def load_wheelhouse(directory: Path) -> Wheelhouse:
    """The wheelhouse in ``directory``, from its index; ConfigError when it has none or the
    index is malformed."""
    index = directory / INDEX_NAME
    try:
        text = index.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read the wheelhouse index {index}: {exc.strerror}",
            hint="build the wheelhouse with `wiregate wheelhouse build --out DIR`",
        ) from exc
    return Wheelhouse(directory, parse_index(text, source=str(index)))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_index(directory: Path) -> Wheelhouse:
    """Hash every wheel in ``directory``; write ``SHA256SUMS`` and one
    ``requirements-<platform>.txt`` per platform it has wheels for."""
    hashes = {p.name: sha256_file(p) for p in sorted(directory.glob("*.whl"))}
    house = Wheelhouse(directory, parse_index(format_index(hashes)))
    for stale in directory.glob("requirements-*.txt"):
        if _REQUIREMENTS.match(stale.name):
            stale.unlink()
    for platform in house.platforms:
        text = house.requirements(platform)
        assert text is not None
        (directory / requirements_name(platform)).write_text(text, encoding="utf-8")
    (directory / INDEX_NAME).write_text(format_index(hashes), encoding="utf-8")
    return house
