"""The policy in force on a gateway replica, and how it changes without a restart.

Every policy change goes through the store (:mod:`gateway.store.policies`): the
document is stored at the next map version, audited, and recorded in the change
feed, so every replica applies it at the same version — the broker then sends each
agent whose map changed a delta. Three things change it:

* the policy file (``policy_file``): polled every :data:`FILE_POLL_S` seconds for a
  new modification time, size or inode (an edit, a ``mv`` over it, a Kubernetes
  ConfigMap update), and read again on SIGHUP;
* ``PUT /api/v1/policy`` (``wiregate admin policy set FILE``);
* ``DELETE /api/v1/policy`` (``wiregate admin policy reset``): back to the file.

A new document is validated first — it parses, every field is valid, its ``tests``
pass — and refused otherwise with one line; the old one stays in force.

Precedence: a document set through the API stays in force until it is reset; while
it is, a changed policy file is logged (``policy_file_ignored``) and not applied.
Otherwise the newest of the files' documents is in force: a replica writes its
file's document at start when it differs from the stored one, and when the file
changes (replicas are meant to read the same file, e.g. one ConfigMap).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter

from gateway.mapping.broker import Broker
from gateway.store import Store
from gateway.store.audit import system_actor
from gateway.store.policies import PolicySource, PolicyText, PolicyWrite, StoredPolicy
from identity.policy import Policy
from identity.policy_file import (
    PolicyFile,
    format_of,
    parse_policy_text,
    policy_hash,
)
from wiregate.errors import BadInput, ConfigError
from wiregate.logging import get_logger

__all__ = ["ALLOW_ALL", "FILE_POLL_S", "RELOADS", "LivePolicy", "read_policy_file"]

FILE_POLL_S = 2.0
#: The document in force when no policy file is configured and none was set.
_EVERYONE = '{"rules": [{"src": ["*"], "dst": ["*"]}]}\n'
ALLOW_ALL = PolicyText(_EVERYONE, "json", policy_hash(_EVERYONE))
RELOADS = Counter(
    "wiregate_policy_reloads",
    "Policy changes offered to this replica, by cause and result",
    ["cause", "result"],
)
_CACHE = 8  # parsed documents kept by hash
_log = get_logger("gateway.policy")
OnDocument = Callable[[PolicyFile], None]


def read_policy_file(path: Path) -> tuple[PolicyText, PolicyFile]:
    """The file's text and its validated document (tests run); :class:`ConfigError` if
    it cannot be read or is refused."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"policy file {path} does not parse: {exc}") from None
    fmt = format_of(path)
    document = parse_policy_text(text, fmt, f"policy file {path}")
    return PolicyText(text, fmt, policy_hash(text)), document


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class LivePolicy:
    """This replica's policy document (for enrollment grants and key lifetimes) and its
    reloads; the broker's maps follow the store's changes (see the module docstring)."""

    def __init__(
        self, store: Store, path: Path | None, *, on_document: OnDocument | None = None
    ) -> None:
        self._store, self._path = store, path
        self._on_document = on_document
        self._broker: Broker | None = None
        self._parsed: dict[str, PolicyFile] = {}
        self._wake = asyncio.Event()
        self._seen = _fingerprint(path) if path is not None else None
        self.document = PolicyFile(policy=Policy.allow_all(), legacy=True)
        self.stored: StoredPolicy | None = None

    @property
    def path(self) -> Path | None:
        """The policy file this replica reads (None: none configured)."""
        return self._path

    # -- start ---------------------------------------------------------------------

    async def start(self) -> PolicyFile:
        """Decide the document in force at start: the policy file is validated (an
        invalid one refuses the start, :class:`ConfigError`) and stored unless the
        store holds it already or holds an API-set document; then the stored one."""
        if self._path is not None:
            text, document = read_policy_file(self._path)
            self._remember(text.hash, document)
            done = await self._store.set_policy(
                text, PolicySource.FILE, actor=system_actor("policy-file"), keep_api=True
            )
            self._ignored(done, text.hash)
        stored = await self._store.policy()
        if stored is not None:
            self._set(stored, self._parse(stored, check_tests=False))
        elif self._path is not None:
            self._set(None, document)
        return self.document

    def attach(self, broker: Broker) -> None:
        """The broker that changes made here are handed to after their commit."""
        self._broker = broker

    # -- the change feed -----------------------------------------------------------

    async def policy_at(self, version: int) -> Policy:
        """The policy that map ``version`` put in force (the follower's hook), now this
        replica's document too. A stored document this replica cannot read (another
        version of the gateway wrote it) is logged and the current one kept."""
        stored = await self._store.policy(version)
        if stored is None:
            return self.document.policy
        try:
            document = self._parse(stored, check_tests=False)
        except ConfigError as exc:
            _log.error("policy_unreadable", version=version, hash=stored.hash, error=exc.message)
            return self.document.policy
        if self.stored is None or stored.version >= self.stored.version:
            self._set(stored, document)
        return document.policy

    # -- changes -------------------------------------------------------------------

    async def set_document(self, text: str, fmt: str, actor: str) -> PolicyWrite:
        """Validate ``text`` and put it in force (the admin API); :class:`BadInput` in one
        line when it is refused, nothing changed."""
        try:
            document = parse_policy_text(text, fmt)
        except ConfigError as exc:
            RELOADS.labels("api", "refused").inc()
            raise BadInput(f"policy refused: {exc.message}", hint=exc.hint) from None
        new = PolicyText(text, fmt, policy_hash(text))
        return await self._write(new, document, PolicySource.API, actor, "api")

    async def reset(self, actor: str) -> PolicyWrite:
        """Drop an API-set document: this replica's policy file (or, without one, every
        device peering with every other) is put in force."""
        if self._path is None:
            document = parse_policy_text(ALLOW_ALL.text, ALLOW_ALL.format)
            return await self._write(ALLOW_ALL, document, PolicySource.DEFAULT, actor, "reset")
        try:
            text, document = read_policy_file(self._path)
        except ConfigError as exc:
            RELOADS.labels("reset", "refused").inc()
            raise BadInput(f"policy file refused: {exc.message}", hint=exc.hint) from None
        return await self._write(text, document, PolicySource.FILE, actor, "reset")

    def request_reload(self) -> None:
        """Read the policy file again soon, changed or not (SIGHUP)."""
        self._wake.set()

    async def reload_file(self, cause: str) -> PolicyWrite | None:
        """Read the policy file and put it in force if valid, changed, and no API-set
        document is in force; a refused file is logged in one line (None returned)."""
        if self._path is None:
            _log.info("policy_reload_skipped", cause=cause, reason="no policy_file configured")
            return None
        try:
            text, document = read_policy_file(self._path)
        except ConfigError as exc:
            RELOADS.labels(cause, "refused").inc()
            _log.error("policy_reload_refused", cause=cause, error=exc.message, hint=exc.hint,
                       kept=self.stored.hash if self.stored else None)  # fmt: skip
            return None
        actor = system_actor("sighup" if cause == "sighup" else "policy-file")
        done = await self._write(text, document, PolicySource.FILE, actor, cause, keep_api=True)
        self._ignored(done, text.hash)
        return done

    async def watch(self, interval: float | None = None) -> None:
        """Until cancelled: reload when the file's fingerprint changes (looked at every
        ``interval`` s, default :data:`FILE_POLL_S`), or on request."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval or FILE_POLL_S)
            hup = self._wake.is_set()
            self._wake.clear()
            seen = _fingerprint(self._path) if self._path is not None else None
            if not hup and seen == self._seen:
                continue
            try:
                await self.reload_file("sighup" if hup else "file")
            except Exception as exc:  # the database is away: try again at the next poll
                _log.warning("policy_reload_failed", error=str(exc) or repr(exc))
                continue
            self._seen = seen

    # -- internals -----------------------------------------------------------------

    async def _write(
        self, new: PolicyText, document: PolicyFile, source: PolicySource, actor: str,
        cause: str, *, keep_api: bool = False,
    ) -> PolicyWrite:  # fmt: skip
        self._remember(new.hash, document)
        done = await self._store.set_policy(new, source, actor=actor, keep_api=keep_api)
        stored = done.stored
        RELOADS.labels(cause, "applied" if stored is not None else "unchanged").inc()
        if stored is None:
            return done
        old_hash = done.previous.hash if done.previous else None
        _log.info("policy_changed", cause=cause, actor=actor, version=stored.version,
                  old_hash=old_hash, new_hash=new.hash)  # fmt: skip
        self._set(stored, document)
        if self._broker is not None:
            self._broker.set_policy(document.policy, stored.version)
        return done

    def _ignored(self, done: PolicyWrite, file_hash: str) -> None:
        previous = done.previous
        if done.stored is None and previous is not None and previous.hash != file_hash:
            _log.warning("policy_file_ignored", path=str(self._path), api_hash=previous.hash,
                         file_hash=file_hash, reason="a policy set through the API is in force",
                         hint="'wiregate admin policy reset' puts the file in force")  # fmt: skip

    def _parse(self, stored: StoredPolicy, *, check_tests: bool) -> PolicyFile:
        document = self._parsed.get(stored.hash)
        if document is None:
            where = f"the stored policy of version {stored.version}"
            document = parse_policy_text(stored.document, stored.format, where,
                                         check_tests=check_tests)  # fmt: skip
            self._remember(stored.hash, document)
        return document

    def _remember(self, digest: str, document: PolicyFile) -> None:
        if len(self._parsed) >= _CACHE:
            self._parsed.clear()
        self._parsed[digest] = document

    def _set(self, stored: StoredPolicy | None, document: PolicyFile) -> None:
        self.stored, self.document = stored, document
        if self._on_document is not None:
            self._on_document(document)
