"""The link layer around the WireGuard interface: addresses, routes, policy rule, MTU.

Routes to every peer's allowed IPs go to the interface in a dedicated table;
one rule per family (``not fwmark FWMARK lookup TABLE``, at ``rule_priority``)
sends everything that is not WireGuard's own encapsulated traffic through that
table, so encapsulated packets never loop back into the tunnel.

:func:`diff_links` is pure. :class:`LinkManager` reads and applies with pyroute2,
except routes: with a thousand peers, pyroute2 spends ~0.6 ms building each
message, so routes are dumped and written with a tiny rtnetlink codec in batches
(one ``sendmsg`` for hundreds of routes).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from gateway.agent.backend import IPNetwork, network_from_packed
from gateway.agent.desired import DesiredLink, IPInterface
from gateway.errors import DataPlaneError

__all__ = ["LinkManager", "LinkUpdate", "LiveLink", "diff_links"]

FIB_RULE_INVERT = 0x2
IFF_UP = 0x1
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


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


# --- rtnetlink route codec (routes only) -------------------------------------

_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_RTM_NEWROUTE, _RTM_DELROUTE, _RTM_GETROUTE = 24, 25, 26
_F_REQUEST, _F_ACK, _F_DUMP, _F_EXCL, _F_CREATE = 0x1, 0x4, 0x300, 0x200, 0x400
_RTA_DST, _RTA_OIF, _RTA_TABLE = 1, 4, 15
_RT_TABLE_COMPAT, _RT_TABLE_MAIN = 252, 254
_RTPROT_STATIC, _RTN_UNICAST = 4, 1
_SCOPE_LINK, _SCOPE_UNIVERSE, _SCOPE_NOWHERE = 253, 0, 255
_HDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")
_BATCH = 256
_SOL_NETLINK, _NETLINK_GET_STRICT_CHK = 270, 12


def _rta(kind: int, payload: bytes) -> bytes:
    data = _RTA.pack(4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def build_route(op: int, net: IPNetwork, oif: int, table: int, seq: int) -> bytes:
    """One RTM_NEWROUTE / RTM_DELROUTE message (with ACK) for ``net`` via ``oif`` in ``table``."""
    family = _FAMILY[net.version]
    if op == _RTM_NEWROUTE:
        flags = _F_REQUEST | _F_ACK | _F_CREATE | _F_EXCL
        scope = _SCOPE_LINK if net.version == 4 else _SCOPE_UNIVERSE
    else:
        flags, scope = _F_REQUEST | _F_ACK, _SCOPE_NOWHERE
    rtm = _RTMSG.pack(
        family, net.prefixlen, 0, 0, _RT_TABLE_COMPAT, _RTPROT_STATIC, scope, _RTN_UNICAST, 0
    )
    attrs = _rta(_RTA_TABLE, struct.pack("=I", table)) + _rta(_RTA_OIF, struct.pack("=I", oif))
    if net.prefixlen:
        attrs += _rta(_RTA_DST, net.network_address.packed)
    body = rtm + attrs
    return _HDR.pack(_HDR.size + len(body), op, flags, seq, 0) + body


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, payload) for each netlink message in ``data``."""
    offset = 0
    while offset + _HDR.size <= len(data):
        length, kind, _flags, seq, _pid = _HDR.unpack_from(data, offset)
        if length < _HDR.size:
            raise DataPlaneError("malformed netlink message")
        yield kind, seq, data[offset + _HDR.size : offset + length]
        offset += (length + 3) & ~3


def _attrs(data: bytes) -> dict[int, bytes]:
    result: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = _RTA.unpack_from(data, offset)
        if length < 4:
            break
        result[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return result


def parse_route(payload: bytes) -> tuple[IPNetwork, int, int]:
    """(destination, table, oif) of an RTM_NEWROUTE payload."""
    family, dst_len = payload[0], payload[1]
    attrs = _attrs(payload[_RTMSG.size :])
    table = struct.unpack("=I", attrs[_RTA_TABLE])[0] if _RTA_TABLE in attrs else payload[4]
    oif = struct.unpack("=I", attrs[_RTA_OIF])[0] if _RTA_OIF in attrs else 0
    dst = attrs.get(_RTA_DST) or b"\0" * (4 if family == socket.AF_INET else 16)
    return network_from_packed(dst, dst_len), table, oif


class _RouteSocket:
    """A raw NETLINK_ROUTE socket for route dumps and batched route writes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.setsockopt(_SOL_NETLINK, _NETLINK_GET_STRICT_CHK, 1)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def dump(self, table: int, oif: int | None) -> list[tuple[IPNetwork, int]]:
        """(destination, oif) of the routes in ``table`` (through ``oif`` if given)."""
        routes: list[tuple[IPNetwork, int]] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            self.seq += 1
            attrs = _rta(_RTA_TABLE, struct.pack("=I", table))
            if oif is not None:
                attrs += _rta(_RTA_OIF, struct.pack("=I", oif))
            body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0) + attrs
            hdr = _HDR.pack(_HDR.size + len(body), _RTM_GETROUTE, _F_REQUEST | _F_DUMP, self.seq, 0)
            self.sock.send(hdr + body)
            for net, rt_table, rt_oif in self._read_dump():
                if rt_table == table and oif in (None, rt_oif):
                    routes.append((net, rt_oif))
        return routes

    def _read_dump(self) -> Iterator[tuple[IPNetwork, int, int]]:
        while True:
            data = self.sock.recv(1 << 20)
            for kind, _seq, payload in _messages(data):
                if kind == _NLMSG_DONE:
                    return
                if kind == _NLMSG_ERROR:
                    _raise_error(payload, "route dump")
                if kind == _RTM_NEWROUTE:
                    yield parse_route(payload)

    def write(self, op: int, nets: Iterable[IPNetwork], oif: int, table: int) -> int:
        """Add or delete ``nets``; return the number of messages sent."""
        ordered = sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
        for start in range(0, len(ordered), _BATCH):
            chunk = ordered[start : start + _BATCH]
            first = self.seq + 1
            self.seq += len(chunk)
            data = b"".join(build_route(op, n, oif, table, first + i) for i, n in enumerate(chunk))
            self.sock.send(data)
            self._read_acks(first, len(chunk), op)
        return len(ordered)

    def _read_acks(self, first: int, count: int, op: int) -> None:
        pending = set(range(first, first + count))
        tolerated = 17 if op == _RTM_NEWROUTE else 3  # EEXIST / ESRCH: already as wanted
        while pending:
            for kind, seq, payload in _messages(self.sock.recv(1 << 20)):
                if kind != _NLMSG_ERROR:
                    continue
                pending.discard(seq)
                code = -struct.unpack_from("=i", payload)[0]
                if code not in (0, tolerated):
                    raise DataPlaneError(f"route update refused: {_strerror(code)}")


def _strerror(code: int) -> str:
    return f"errno {code} ({os.strerror(code)})"


def _raise_error(payload: bytes, what: str) -> None:
    code = -struct.unpack_from("=i", payload)[0]
    if code:
        raise DataPlaneError(f"{what} failed: {_strerror(code)}")


# --- LinkManager -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """Our policy rule: ``not fwmark FWMARK lookup TABLE`` at ``priority``."""

    table: int
    priority: int
    fwmark: int


class LinkManager:
    """Reads and applies the link layer of one interface in the current network namespace."""

    def __init__(self, ipr: Any | None = None) -> None:
        self.ipr: Any = ipr if ipr is not None else IPRoute()
        self.routes = _RouteSocket()

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
        for net, oif in self.routes.dump(_RT_TABLE_MAIN, None):
            if net.prefixlen == 0 and oif and net.version == 4:
                return oif, 4
        for net, oif in self.routes.dump(_RT_TABLE_MAIN, None):
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
        writes += self.routes.write(_RTM_DELROUTE, update.remove_routes, index, rule.table)
        writes += self.routes.write(_RTM_NEWROUTE, update.add_routes, index, rule.table)
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
            writes += self.routes.write(_RTM_DELROUTE, routes, index, rule.table)
        return writes
