"""Host traffic in the data plane: the plan of :mod:`agent.dataplane.hosttraffic` applied.

:class:`HostTraffic` is what :class:`~agent.dataplane.facade.DataPlane` keeps:
the policy, the handshakes last read from WireGuard, the current plan, the
fallback counter, and the packet filter it last wrote. It never touches the
kernel itself except through the injected nftables runner.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Protocol

from agent.dataplane.backend import LivePeer
from agent.dataplane.desired import DesiredConfig, DesiredLink
from agent.dataplane.hosttraffic import (
    HostPlan,
    HostPolicy,
    HostTracker,
    host_ruleset,
    plan_host_traffic,
)
from wiregate.clock import Clock
from wiregate.errors import WiregateError
from wiregate.logging import get_logger
from wiregate.model import NetMap

__all__ = ["HostTraffic", "NftRunner"]

log = get_logger("agent.hosttraffic")


class NftRunner(Protocol):
    """What :class:`HostTraffic` uses of :class:`wiregate.nft.Nft`."""

    def run(self, script: str) -> None: ...


class HostTraffic:
    """The host-traffic state of one data plane."""

    def __init__(
        self,
        policy: HostPolicy,
        *,
        interface: str,
        fwmark: int,
        nft: NftRunner | None = None,
        wall: Clock = time.time,
    ) -> None:
        self.policy = policy
        self.interface = interface
        self.fwmark = fwmark
        self.plan = HostPlan()
        self.tracker = HostTracker()
        self.problem: str | None = None  # the packet filter could not be written
        self._nft = nft
        self._wall = wall
        self._handshakes: dict[str, float | None] = {}  # key -> last sign of life
        self._rx: dict[str, int] = {}  # key -> rx bytes at the last look
        self._ruleset: str | None = None  # the script last written
        self._inputs: tuple[NetMap, DesiredConfig] | None = None

    def set_policy(self, policy: HostPolicy) -> None:
        """Use ``policy`` (e.g. a newly resolved gateway address) from the next plan on."""
        self.policy = policy

    def saw_peers(self, peers: Iterable[LivePeer]) -> None:
        """Record each live peer's last sign of life: its latest handshake, or now if it
        sent something since the last look (rx grew: a passive keepalive answering a
        nudge, or any traffic), so a live idle peer stays fresh between rekeys."""
        now = self._wall()
        for peer in peers:
            key, last = peer.public_key, peer.last_handshake or 0.0
            if peer.rx > self._rx.get(key, peer.rx):
                last = max(last, now)
            self._rx[key] = peer.rx
            if last:
                self._handshakes[key] = max(last, self._handshakes.get(key) or 0.0)

    def link(self, netmap: NetMap, config: DesiredConfig) -> DesiredLink:
        """``config``'s link with the host routes the plan withholds taken out."""
        self._inputs = (netmap, config)
        self.plan = self._plan(netmap, config)
        self.tracker.observe(self.plan)
        routes = self.plan.routes(config.link.routes)
        return config.link if routes is config.link.routes else replace(config.link, routes=routes)

    def replan_needed(self) -> bool:
        """True when the handshakes (or the clock) would change the last plan's states."""
        if self._inputs is None or (not self.policy.enabled and not self.plan.destinations):
            return False
        return self._plan(*self._inputs).destinations != self.plan.destinations

    def _plan(self, netmap: NetMap, config: DesiredConfig) -> HostPlan:
        allowed = {k: p.allowed_ips for k, p in config.device.peers.items()}
        peers: Iterable[Any] = netmap.peers.values()
        return plan_host_traffic(peers, allowed, self._handshakes, self.policy, self._wall())

    def write_filter(self) -> None:
        """Write the ``inet wiregate-host`` table if the plan's sets changed (a failure
        is kept in :attr:`problem`; the last table stays)."""
        script = host_ruleset(self.interface, self.fwmark, self.plan)
        if script == self._ruleset:
            return
        if self._ruleset is None and not self.plan.destinations:
            self._ruleset = script
            self._quietly(script)  # a table an earlier run left (mode changed): gone
            return
        try:
            self._runner().run(script)
        except WiregateError as exc:
            self.problem = f"host traffic filter not written: {exc.message}"
            log.warning("host traffic filter not written", error=exc.message)
            return
        self._ruleset, self.problem = script, None

    def remove_filter(self) -> None:
        """Delete the table (teardown), also one an earlier run of the agent wrote."""
        if self._ruleset is not None or self.policy.enabled:
            self._quietly(host_ruleset(self.interface, self.fwmark, HostPlan()))
        self._ruleset = None

    def _quietly(self, script: str) -> None:
        """Run ``script``; a failure (no nftables, no table) is only logged."""
        try:
            self._runner().run(script)
        except WiregateError as exc:
            log.info("host traffic filter not removed", error=exc.message)

    def _runner(self) -> NftRunner:
        if self._nft is None:
            from wiregate.nft import Nft

            self._nft = Nft()
        return self._nft

    def to_dict(self) -> dict[str, Any]:
        """The ``host_traffic`` part of ``wiregate status``."""
        return {
            "mode": self.policy.mode,
            "exempt": sorted(str(n) for n in self.policy.exempt),
            "fallbacks": self.tracker.fallbacks,
            "counts": self.plan.counts(),
            "problem": self.problem,
            "destinations": [
                {"address": str(d.address), "peer": d.peer, "state": d.state}
                for d in self.plan.destinations
            ],
        }
