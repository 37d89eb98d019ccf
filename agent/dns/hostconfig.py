"""The host's resolver: send the mesh domain (and split zones) to the agent, and put it back.

Two ways, chosen by ``dns_resolver`` (``docs/names.md``):

``resolved``     systemd-resolved runs: the WireGuard link gets the agent's address as
                 its DNS server and ``~DOMAIN`` (and ``~ZONE``) as routing-only domains,
                 and is never the default route for other names (``resolvectl dns``,
                 ``domain``, ``default-route``); restored with ``resolvectl revert``.
                 Only those names reach the agent.
``resolv.conf``  a plain /etc/resolv.conf: the file is rewritten to list the agent first
                 and the original nameservers after it (a fallback should the agent
                 die unannounced), with the original kept in the agent's state
                 directory and written back on restore. Every name reaches the agent,
                 which forwards what is not the mesh's to the original nameservers.
``off``          nothing is changed; the server still answers on its addresses.

``auto`` picks ``resolved`` when it runs, else ``resolv.conf`` when the file is a
plain file (a symlink belongs to another manager: nothing is changed, and the
reason is logged), and only when the agent owns the host's resolver: it runs in
the host's network namespace (pid 1's), or the file is mounted for its namespace
alone (``ip netns exec`` with /etc/netns/NAME/resolv.conf). An agent in another
namespace never points the host's processes at an address they cannot reach.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from wiregate.errors import LocalError
from wiregate.files import write_private

__all__ = [
    "MARKER",
    "HostResolver",
    "NoResolver",
    "ResolvConf",
    "Resolved",
    "choose_resolver",
    "parse_nameservers",
    "render_resolv_conf",
]

MARKER = "# wiregate: managed"
RESOLVED_SOCKET = Path("/run/systemd/resolve/io.systemd.Resolve")
NETNS_DIR = Path("/run/netns")  # ip netns's named namespaces
MAX_NAMESERVERS = 3  # glibc reads no more


class HostResolver(Protocol):
    """Points the host's resolver at the agent for some domains, and takes it back."""

    kind: str

    def apply(self, servers: Sequence[str], domains: Sequence[str]) -> None: ...

    def restore(self) -> None: ...

    def upstreams(self) -> list[str]:
        """Where the agent forwards names that are not the mesh's."""
        ...


def parse_nameservers(text: str) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf text, in order (zone ids dropped)."""
    out: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            out.append(words[1].split("%", 1)[0])
    return out


def render_resolv_conf(original: str, servers: Sequence[str], domain: str) -> str:
    """A resolv.conf listing ``servers`` first, then the original nameservers, with
    the original's other lines (search, options) kept."""
    ours = list(dict.fromkeys(servers))
    theirs = [s for s in parse_nameservers(original) if s not in ours]
    kept = [ln for ln in original.splitlines() if ln.split()[:1] not in (["nameserver"],)]
    kept = [ln for ln in kept if not ln.startswith("# wiregate")]
    head = [f"{MARKER}: names under {domain} are answered by the wiregate agent;",
            "# wiregate: the original comes back when the agent stops."]  # fmt: skip
    listed = [f"nameserver {s}" for s in (ours + theirs)[: max(MAX_NAMESERVERS, len(ours))]]
    return "\n".join([*head, *listed, *kept]) + "\n"


@dataclass
class NoResolver:
    """Changes nothing; names other than the mesh's go to ``path``'s nameservers."""

    path: Path = Path("/etc/resolv.conf")
    reason: str = "dns_resolver is off"
    kind: str = "off"

    def apply(self, servers: Sequence[str], domains: Sequence[str]) -> None:
        return None

    def restore(self) -> None:
        return None

    def upstreams(self) -> list[str]:
        return _nameservers_of(self.path)


@dataclass
class Resolved:
    """systemd-resolved: per-link DNS server and routing-only domains on ``interface``."""

    interface: str
    path: Path = Path("/etc/resolv.conf")
    kind: str = "resolved"

    def apply(self, servers: Sequence[str], domains: Sequence[str]) -> None:
        self._resolvectl("dns", self.interface, *servers)
        self._resolvectl("domain", self.interface, *(f"~{d}" for d in domains))
        self._resolvectl("default-route", self.interface, "false")

    def restore(self) -> None:
        self._resolvectl("revert", self.interface)

    def upstreams(self) -> list[str]:
        return _nameservers_of(self.path)

    @staticmethod
    def _resolvectl(*args: str) -> None:
        try:
            subprocess.run(["resolvectl", *args], check=True, capture_output=True, text=True,
                           timeout=10)  # fmt: skip
        except subprocess.CalledProcessError as exc:
            why = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or [str(exc)]
            raise LocalError(f"resolvectl {args[0]} failed: {why[0]}") from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LocalError(f"resolvectl {args[0]} failed: {exc}") from None


@dataclass
class ResolvConf:
    """A plain resolv.conf at ``path``, its original kept at ``backup``."""

    path: Path
    backup: Path
    kind: str = "resolv.conf"

    def apply(self, servers: Sequence[str], domains: Sequence[str]) -> None:
        current = _read(self.path)
        if not current.startswith(MARKER):
            write_private(self.backup, current.encode())  # the original, before any change
        elif not self.backup.exists():  # ours, from a run that left no original: rebuild it
            write_private(self.backup, _unmanaged(current, servers).encode())
        original = self.backup.read_text()
        _write_in_place_or_replace(
            self.path, render_resolv_conf(original, servers, domains[0] if domains else "")
        )

    def restore(self) -> None:
        if not self.backup.exists():
            return
        if _read(self.path).startswith(MARKER):  # someone else's since: theirs stays
            _write_in_place_or_replace(self.path, self.backup.read_text())
        self.backup.unlink(missing_ok=True)

    def upstreams(self) -> list[str]:
        source = self.backup if self.backup.exists() else self.path
        return _nameservers_of(source)


def choose_resolver(
    mode: str, *, interface: str, path: Path, backup: Path
) -> NoResolver | Resolved | ResolvConf:
    """The :class:`HostResolver` for ``dns_resolver = mode`` on this host."""
    if mode == "off":
        return NoResolver(path)
    if mode == "resolved":
        return Resolved(interface, path)
    if mode == "resolv.conf":
        return ResolvConf(path, backup)
    if not owns_host_resolver(path):
        return NoResolver(path, "the agent is not in the host's network namespace and "
                                f"{path} is not its own")  # fmt: skip
    if RESOLVED_SOCKET.exists() and shutil.which("resolvectl"):
        return Resolved(interface, path)
    if path.is_symlink() or not path.is_file():
        return NoResolver(path, f"{path} is not a plain file (another program manages it)")
    return ResolvConf(path, backup)


def owns_host_resolver(path: Path) -> bool:
    """Whether ``path`` is this network namespace's own resolver file.

    In a namespace named by ``ip netns`` (/run/netns/NAME): only when ``path`` is
    /etc/netns/NAME's file, which ``ip netns exec`` mounts there. Otherwise: when
    the namespace is pid 1's, or ``path`` is not the file pid 1 sees (a container's
    own). When none of this can be read, no.
    """
    try:
        here = os.stat("/proc/self/ns/net")
        name = _named_netns(here)
        if name is not None:
            return _same_file(path, Path("/etc/netns") / name / path.name)
        if os.stat("/proc/1/ns/net").st_ino == here.st_ino:
            return True
        return not _same_file(path, Path(f"/proc/1/root{path}"))
    except OSError:
        return False


def _named_netns(here: os.stat_result) -> str | None:
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return None
    for name in names:
        try:
            st = os.stat(NETNS_DIR / name)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino):
            return name
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        one, two = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    return (one.st_dev, one.st_ino) == (two.st_dev, two.st_ino)


def _mount_point(path: Path) -> bool:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    return any(len(f) > 4 and f[4] == str(path) for f in (ln.split() for ln in lines))


def _unmanaged(text: str, servers: Sequence[str]) -> str:
    """A managed resolv.conf without what the agent added (its lines and ``servers``)."""
    ours = {f"nameserver {s}" for s in servers}
    lines = text.splitlines()
    return "".join(f"{ln}\n" for ln in lines if not ln.startswith("# wiregate") and ln not in ours)


def _nameservers_of(path: Path) -> list[str]:
    return parse_nameservers(_read(path))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise LocalError(f"cannot read {path}: {exc.strerror}") from None


def _write_in_place_or_replace(path: Path, text: str) -> None:
    """Replace ``path`` atomically (0644), or rewrite it in place where it is a mount
    point (a container's or ``ip netns exec``'s bind mount cannot be renamed over)."""
    if _mount_point(path):
        _rewrite(path, text)
        return
    tmp = path.with_name(f".{path.name}.wiregate.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o644)
            out.write(text)
        os.replace(tmp, path)
        return
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.EXDEV):
            raise LocalError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _rewrite(path, text)


def _rewrite(path: Path, text: str) -> None:
    try:
        with path.open("r+") as out:
            out.write(text)
            out.truncate()
    except OSError as exc:
        raise LocalError(f"cannot write {path}: {exc.strerror}") from None
