"""What the data plane believes is live between read-backs, and when to read back (pure).

Reading 1 000 peers and 2 000 routes back costs tens of milliseconds, so the
data plane reads back only when its belief may be wrong: before the first
apply (the read done by ``setup``), after a failed write, and every
``resync_interval`` seconds, which also repairs changes made behind the
agent's back. In between, the belief is the last read-back with every write
since then applied to it (:func:`~agent.dataplane.backend.apply_update`,
:func:`~agent.dataplane.routes.after_link_update`).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.dataplane.backend import DeviceUpdate, LiveDevice, apply_update
from agent.dataplane.routes import LinkUpdate, LiveLink, after_link_update
from wiregate.clock import Clock

__all__ = ["LiveBelief", "Snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The live device and link as read back at ``read_at``, plus every write since."""

    device: LiveDevice
    link: LiveLink
    read_at: float
    fresh: bool = True  # nothing written since the read-back: diff every peer

    def after(self, update: DeviceUpdate, link: LinkUpdate, public_key: str | None) -> Snapshot:
        """This snapshot once ``update`` and ``link`` have been written successfully."""
        device = self.device if update.is_empty else apply_update(self.device, update, public_key)
        return Snapshot(device, after_link_update(self.link, link), self.read_at, fresh=False)


class LiveBelief:
    """Holds the current :class:`Snapshot`; says when it is too old or unknown."""

    def __init__(self, *, clock: Clock, resync_interval: float) -> None:
        if resync_interval <= 0:
            raise ValueError("resync_interval must be positive")
        self.clock = clock
        self.resync_interval = resync_interval
        self.snapshot: Snapshot | None = None

    def current(self) -> Snapshot | None:
        """The snapshot if it may still be trusted, else None (read back first)."""
        snap = self.snapshot
        if snap is None or self.clock() - snap.read_at >= self.resync_interval:
            return None
        return snap

    def now(self) -> float:
        """The injected clock's time (stamp a read-back with it before reading)."""
        return self.clock()

    def forget(self) -> None:
        """Distrust everything (a write failed, or the interface went away)."""
        self.snapshot = None
