"""The agent's inbound packet filter: what each peer may open on this device (nftables).

Only packets arriving from the tunnel are judged: replies to this device's own
connections pass, each peer's new connections pass to what its filter allows
(its sources are its allowed IPs: WireGuard only accepts those from that peer;
``filter``, see :mod:`wiregate.ports`; None: everything), everything else from
the tunnel is dropped and counted (the ``dropped`` counter).
Pod identity adds to a restricted peer's allowance: what its pods may open here
(``pods_from``, by pod address) and what it may open on this node's pods
(``pods_to``), as elements of that peer only, so a pod's churn is a few element
operations and never a reload.

The table ``inet wiregate`` (:mod:`agent.dataplane.filterset`: named sets, fixed
rules; the MSS clamp of :mod:`agent.dataplane.mss`) is created once; after that
a map's change is applied as the element operations it needs, one transaction
through libnftables in this process (:mod:`wiregate.nft`). A repair (the data
plane's periodic read-back, or after a refused write) reads the table back:
a table whose sets or rules differ from what was created is created again, and
elements that drifted are deleted or added one by one. The table is stateful
(replies pass by connection tracking) only while some peer is restricted: the
first restricted peer, or the last one going, replaces it in one transaction
(without it, nothing would be dropped: see :mod:`agent.dataplane.filterset`).
A connection open when the table becomes stateful is tracked from the next
packet this device sends on it; a packet from the peer before that is judged as
a new connection's.

A missing nftables leaves the agent running and reported ("packet filter not
enforced") when some peer is restricted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from agent.dataplane.desired import DesiredPeer
from agent.dataplane.filterset import (
    TABLE,
    Element,
    ElementBook,
    PeerRule,
    element_script,
    listed_elements,
    peer_rules,
    skeleton_of,
    table_script,
)
from wiregate.errors import DataPlaneError
from wiregate.logging import get_logger
from wiregate.model import NetMap
from wiregate.nft import Nft, NftError, nft_available

__all__ = ["TABLE", "Firewall", "NftLike", "NftMissing", "PeerRule", "Unavailable", "peer_rules"]

NOT_ENFORCED = "packet filter not enforced"
_LIST = f"list table inet {TABLE}"
_DELETE = f"table inet {TABLE}\ndelete table inet {TABLE}\n"

log = get_logger("agent.firewall")


class NftMissing(DataPlaneError):
    """nftables (libnftables or the ``nft`` binary) is not installed."""


class NftLike(Protocol):
    """What the firewall uses of :class:`wiregate.nft.Nft`."""

    def run(self, script: str) -> None: ...

    def query_json(self, command: str) -> dict[str, Any]: ...


class Unavailable:
    """An :class:`NftLike` for a host without nftables: every call raises NftMissing."""

    def __init__(self, message: str, hint: str) -> None:
        self.message, self.hint = message, hint

    def run(self, script: str) -> None:
        raise NftMissing(self.message, hint=self.hint)

    def query_json(self, command: str) -> dict[str, Any]:
        raise NftMissing(self.message, hint=self.hint)


def _default_nft() -> NftLike:
    if not nft_available():
        return Unavailable("nftables not found", "install nftables")
    return Nft()


class Firewall:
    """Keeps ``table inet wiregate`` holding the elements of the last map."""

    def __init__(self, interface: str, nft: NftLike | None = None, *, clamp: bool = True) -> None:
        self.interface = interface
        self._nft = nft
        self.clamp = clamp  # MSS clamping of TCP SYNs through the tunnel
        self.path_mtu: dict[str, int] = {}  # probed path MTU by peer public key (MSS clamp)
        self.enforced = False
        self._book = ElementBook()
        self._skeleton: tuple[str, ...] | None = None  # the table's shape as created here
        self._stateful = False  # the table created here tracks connections (a peer restricted)
        self._in_sync = False  # the kernel holds the book's elements

    @property
    def nft(self) -> NftLike:
        """The nftables handle (created on first use)."""
        if self._nft is None:
            self._nft = _default_nft()
        return self._nft

    def prepare(self) -> None:
        """Open the nftables handle ahead of the first map (the agent's start, not its
        first reconcile, pays for libnftables' context). A failure is left for
        :meth:`apply` to report."""
        nft = self.nft
        if isinstance(nft, Nft):
            with contextlib.suppress(NftError):
                nft.open()

    def apply(
        self,
        netmap: NetMap,
        *,
        keys: Collection[str] | None = None,
        validated: Mapping[str, DesiredPeer] | None = None,
        repair: bool = False,
    ) -> tuple[str, ...]:
        """Bring the table to ``netmap`` (its peers with ``keys``); return problems.

        ``validated``: the peers configured, by public key (see :func:`peer_rules`).
        Never raises for a missing or failing nftables: that is a problem to report.
        """
        book = self._book
        change = book.update_map(netmap, keys=keys, path_mtu=self.path_mtu, validated=validated)
        problems = book.problems
        if self._in_sync and not repair and self._stateful == book.restricted:
            if not change.add and not change.delete:
                return problems
            if self._write(element_script(change.delete, change.add)):
                return problems  # else: the kernel was not as believed; repair now
        return problems + self._sync()

    def _write(self, script: str) -> bool:
        try:
            self.nft.run(script)
        except DataPlaneError as exc:
            log.info("packet filter update refused; repairing", error=exc.message)
            self._in_sync = False
            return False
        return True

    def _sync(self) -> tuple[str, ...]:
        """Make the kernel's table hold exactly the book's elements; return problems."""
        try:
            self._repair_or_rebuild()
        except NftMissing as exc:
            self._in_sync = self.enforced = False
            self._skeleton = None
            if not self._book.restricted:
                return ()
            return (f"{NOT_ENFORCED}: {exc.message} ({exc.hint})",)
        except DataPlaneError as exc:
            self._in_sync = self.enforced = False
            self._skeleton = None
            log.warning("packet filter not applied", error=exc.message)
            return (f"{NOT_ENFORCED}: {exc.message}",)
        self._in_sync = self.enforced = True
        return ()

    def _repair_or_rebuild(self) -> None:
        wanted = self._book.elements()
        listed = self._listing()
        if listed is None:
            self._create(wanted)
        elif (
            self._skeleton is None
            or self._stateful != self._book.restricted
            or skeleton_of(listed) != self._skeleton
        ):
            self._replace(wanted)  # not created here, changed since, or the mode: at once
        else:
            held = listed_elements(listed)
            script = element_script(held - wanted, wanted - held)
            if script:
                stale, missing = len(held - wanted), len(wanted - held)
                log.info("packet filter drifted; repaired", stale=stale, missing=missing)
                self.nft.run(script)

    def _listing(self) -> dict[str, Any] | None:
        try:
            return self.nft.query_json(_LIST)
        except NftError:  # no such table (NftMissing is not an NftError: it goes up)
            return None

    def _create(self, wanted: frozenset[Element]) -> None:
        """No table: create it empty, note its shape, then fill it (before, nothing filtered)."""
        self.nft.run(self._table(replace=False))
        self._note_shape()
        if wanted:
            self.nft.run(element_script((), wanted))

    def _replace(self, wanted: frozenset[Element]) -> None:
        """Replace the table and its elements in one transaction."""
        self.nft.run(self._table(replace=True) + element_script((), wanted))
        self._note_shape()

    def _table(self, *, replace: bool) -> str:
        """The table for the book: stateful when some peer is restricted."""
        restricted = self._book.restricted
        return table_script(self.interface, clamp=self.clamp, replace=replace, stateful=restricted)

    def _note_shape(self) -> None:
        self._skeleton = skeleton_of(self.nft.query_json(_LIST))
        self._stateful = self._book.restricted

    def teardown(self) -> None:
        """Delete the table (nothing to do if it, or nftables, is not there)."""
        self.enforced = self._in_sync = False
        self._skeleton = None
        self._book = ElementBook()
        try:
            self.nft.run(_DELETE)
        except NftMissing:
            return
        except DataPlaneError as exc:
            log.warning("packet filter not removed", error=exc.message)
