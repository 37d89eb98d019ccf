"""The link layer around the WireGuard interface: addresses, routes, policy rule, MTU.

Routes to the interface go in a dedicated table: the tunnel address pool as one
prefix per family, and each peer's allowed IPs outside the pool (without a pool
in the map, every allowed IP; see :mod:`agent.dataplane.desired`). One rule per
family (``not fwmark FWMARK lookup TABLE``, at ``rule_priority``) sends
everything that is not WireGuard's own encapsulated traffic through that table,
so encapsulated packets never loop back into the tunnel. Routes are added
before others are deleted (the pool's prefix before the host routes it covers,
and back), so no packet meant for the tunnel falls through to the main table
in between.

:func:`diff_links` and :func:`after_link_update` are pure. :class:`LinkManager`
reads and applies with pyroute2, except routes, which go through the batched
rtnetlink codec of :mod:`agent.dataplane.rtnl`.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.dataplane.backend import IPNetwork
from agent.dataplane.desired import DesiredLink, IPInterface
from agent.dataplane.rtnl import DELROUTE, NEWROUTE, RT_TABLE_MAIN, RouteSocket
from wiregate.errors import DataPlaneError

__all__ = [
    "LinkLayer",
    "LinkManager",
    "LinkUpdate",
    "LiveLink",
    "RuleSpec",
    "after_link_update",
    "diff_links",
]

FIB_RULE_INVERT = 0x2
IFF_UP = 0x1
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_SCOPE_LINK = 253


@dataclass(frozen=True, slots=True)
class LiveLink:
    """The interface's link-layer state as read from the kernel."""

    index: int
    addresses: frozenset[IPInterface]
    routes: frozenset[IPNetwork]
    rule_families: frozenset[int]  # 4 and/or 6: where our policy rule is present
    mtu: int
    up: bool


@dataclass(frozen=True, slots=True)
class LinkUpdate:
    """Link-layer changes; empty means nothing to write."""

    add_addresses: frozenset[IPInterface] = frozenset()
    remove_addresses: frozenset[IPInterface] = frozenset()
    add_routes: frozenset[IPNetwork] = frozenset()
    remove_routes: frozenset[IPNetwork] = frozenset()
    add_rules: frozenset[int] = frozenset()
    mtu: int | None = None
    up: bool = False

    @property
    def is_empty(self) -> bool:
        """True when applying this update would change nothing."""
        sets = (self.add_addresses, self.remove_addresses, self.add_routes, self.remove_routes)
        return not any(sets) and not self.add_rules and self.mtu is None and not self.up


def diff_links(desired: DesiredLink, live: LiveLink) -> LinkUpdate:
    """What to change so that ``live`` matches ``desired`` (an MTU of 0 leaves the MTU alone)."""
    mtu_ok = desired.mtu in (0, live.mtu)
    return LinkUpdate(
        add_addresses=desired.addresses - live.addresses,
        remove_addresses=live.addresses - desired.addresses,
        add_routes=desired.routes - live.routes,
        remove_routes=live.routes - desired.routes,
        add_rules=frozenset({4, 6}) - live.rule_families,
        mtu=None if mtu_ok else desired.mtu,
        up=not live.up,
    )


def after_link_update(live: LiveLink, update: LinkUpdate) -> LiveLink:
    """What ``live`` looks like once ``update`` has been applied (pure)."""
    if update.is_empty:
        return live
    return LiveLink(
        index=live.index,
        addresses=(live.addresses - update.remove_addresses) | update.add_addresses,
        routes=(live.routes - update.remove_routes) | update.add_routes,
        rule_families=live.rule_families | update.add_rules,
        mtu=live.mtu if update.mtu is None else update.mtu,
        up=live.up or update.up,
    )


# --- LinkManager -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """Our policy rule: ``not fwmark FWMARK lookup TABLE`` at ``priority``."""

    table: int
    priority: int
    fwmark: int


class LinkLayer(Protocol):
    """What the data plane needs from the link layer (:class:`LinkManager`, or a fake)."""

    ipr: Any

    def index(self, interface: str) -> int | None:
        """The ifindex of ``interface``, or None."""
        ...

    def default_route(self) -> tuple[int, int] | None:
        """(oif, IP version) of the main table's default route, if any."""
        ...

    def read(self, interface: str, rule: RuleSpec) -> LiveLink:
        """The live link-layer state of ``interface``."""
        ...

    def apply(self, update: LinkUpdate, index: int, rule: RuleSpec) -> int:
        """Apply ``update``; return the number of writes issued."""
        ...

    def remove(self, interface: str, rule: RuleSpec) -> int:
        """Remove our rules and the interface's routes; return writes issued."""
        ...

    def close(self) -> None:
        """Release resources."""
        ...


class LinkManager:
    """Reads and applies the link layer of one interface in the current network namespace."""

    def __init__(self, ipr: Any | None = None) -> None:
        self.ipr: Any = ipr if ipr is not None else IPRoute()
        self.routes = RouteSocket()

    def close(self) -> None:
        """Release the netlink sockets."""
        self.routes.close()
        self.ipr.close()

    def index(self, interface: str) -> int | None:
        """The ifindex of ``interface``, or None."""
        found = self.ipr.link_lookup(ifname=interface)
        return int(found[0]) if found else None

    def default_route(self) -> tuple[int, int] | None:
        """(oif, IP version) of the main table's default route, IPv4 first; None if none."""
        for net, oif in self.routes.dump(RT_TABLE_MAIN, None):
            if net.prefixlen == 0 and oif and net.version == 4:
                return oif, 4
        for net, oif in self.routes.dump(RT_TABLE_MAIN, None):
            if net.prefixlen == 0 and oif:
                return oif, 6
        return None

    def read(self, interface: str, rule: RuleSpec) -> LiveLink:
        """The live link-layer state of ``interface``."""
        index = self.index(interface)
        if index is None:
            raise DataPlaneError(f"interface {interface} does not exist")
        link = self.ipr.link("get", index=index)[0]
        return LiveLink(
            index=index,
            addresses=self._addresses(index),
            routes=frozenset(n for n, _ in self.routes.dump(rule.table, index)),
            rule_families=frozenset(f for f in (4, 6) if self._rule_present(f, rule)),
            mtu=int(link.get_attr("IFLA_MTU")),
            up=bool(link["flags"] & IFF_UP),
        )

    def _addresses(self, index: int) -> frozenset[IPInterface]:
        result: set[IPInterface] = set()
        for msg in self.ipr.addr("dump", index=index):
            if msg["scope"] == _SCOPE_LINK or msg.get("index") != index:
                continue  # kernel-made link-local addresses are not ours to manage
            address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            result.add(ipaddress.ip_interface(f"{address}/{msg['prefixlen']}"))
        return frozenset(result)

    def _rules(self, family: int, rule: RuleSpec) -> list[Any]:
        found = []
        for msg in self.ipr.rule("dump", family=_FAMILY[family]):
            table = msg.get_attr("FRA_TABLE") or msg["table"]
            same = (
                msg.get_attr("FRA_PRIORITY") == rule.priority
                and table == rule.table
                and msg.get_attr("FRA_FWMARK") == rule.fwmark
                and msg["flags"] & FIB_RULE_INVERT
            )
            if same:
                found.append(msg)
        return found

    def _rule_present(self, family: int, rule: RuleSpec) -> bool:
        return bool(self._rules(family, rule))

    def apply(self, update: LinkUpdate, index: int, rule: RuleSpec) -> int:
        """Apply ``update``; return the number of netlink writes issued."""
        writes = 0
        if update.mtu is not None:
            self.ipr.link("set", index=index, mtu=update.mtu)
            writes += 1
        for address in sorted(update.remove_addresses, key=str):
            self._addr("del", index, address)
            writes += 1
        for address in sorted(update.add_addresses, key=str):
            self._addr("add", index, address)
            writes += 1
        if update.up:
            self.ipr.link("set", index=index, state="up")
            writes += 1
        writes += self.routes.write(NEWROUTE, update.add_routes, index, rule.table)
        writes += self.routes.write(DELROUTE, update.remove_routes, index, rule.table)
        for family in sorted(update.add_rules):
            self._rule("add", family, rule)
            writes += 1
        return writes

    def _addr(self, op: str, index: int, address: IPInterface) -> None:
        try:
            self.ipr.addr(
                op, index=index, address=str(address.ip), prefixlen=address.network.prefixlen
            )
        except NetlinkError as exc:
            if exc.code not in (17, 99):  # EEXIST / EADDRNOTAVAIL: already as wanted
                raise DataPlaneError(f"address {op} {address} failed: {exc}") from None

    def _rule(self, op: str, family: int, rule: RuleSpec) -> None:
        try:
            self.ipr.rule(
                op,
                family=_FAMILY[family],
                priority=rule.priority,
                table=rule.table,
                fwmark=rule.fwmark,
                flags=FIB_RULE_INVERT,
            )
        except NetlinkError as exc:
            if exc.code not in (17, 2):  # EEXIST / ENOENT
                raise DataPlaneError(f"policy rule {op} failed: {exc}") from None

    def remove(self, interface: str, rule: RuleSpec) -> int:
        """Remove our rules and the interface's routes in the table; return writes issued."""
        writes = 0
        for family in (4, 6):
            for _ in self._rules(family, rule):
                self._rule("del", family, rule)
                writes += 1
        index = self.index(interface)
        if index is not None:
            routes = [n for n, _ in self.routes.dump(rule.table, index)]
            writes += self.routes.write(DELROUTE, routes, index, rule.table)
        return writes
