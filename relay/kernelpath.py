"""The relay's kernel fast path, pure: nftables rules for bound pairs, their diff, counters.

Python keeps admission (tickets, return-routability, quotas, expiry). Once both
sides of an allocation are bound, the adapter (:mod:`relay.aio.kernelpath`)
installs that pair here, in one table the relay owns (:func:`table_name`), and the
kernel forwards its WireGuard transport data with no Python in the path:

* ``raw_pre`` (prerouting, priority raw, before conntrack), for the relay ports:
  control messages (``MAGIC``) are ``notrack`` and go to Python. On a port with
  an installed pair (``kernel_ports``): a source other than the side bound there
  (``bound4``) is dropped, counted ``unbound_source``; transport data of
  WireGuard's exact shape (type 4, three zero reserved bytes, a size
  :func:`relay.filters.transport_sizes` allows, at most ``max_datagram``) passes the sending
  device's byte limit (``limit4``: a named limit per device; over it: dropped,
  counted ``over_bandwidth``), is counted per side (``forwarded4``) and
  accepted; handshake initiation, response and cookie reply of their exact sizes
  are ``notrack`` and go to Python (which checks mac1); anything else is
  dropped, counted ``not_wireguard``.
* ``nat_pre`` DNATs the first transport datagram of a flow to the other side's
  bound address (map ``dnat4``); ``nat_post`` SNATs it to the other side's
  relay port (map ``snat4``, or ``masq4`` when the relay listens on a wildcard
  address); conntrack carries every later datagram and the reverse direction.
* ``raw_out``: the relay's own datagrams from its ports are ``notrack``, so
  Python's sends never clash with a NATed flow's reply tuple.

Only IPv4 pairs whose two sides are ordinary addresses are installed; others stay
on the userspace path. Every name and element is derived from validated
addresses and integers: nothing from the wire is spliced into a script.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relay.controlwire import MAGIC
from relay.filters import destination_refusal, normalize_ip, transport_sizes
from relay.pool import Addr, AllocationView
from relay.tickets import PairKey

__all__ = [
    "DROP_COUNTERS",
    "TABLE",
    "Counters",
    "Installed",
    "KernelLimits",
    "KernelPair",
    "KernelSide",
    "Plan",
    "SideKey",
    "kernel_pairs",
    "parse_counters",
    "plan",
    "render_remove_table",
    "render_table",
    "table_name",
]

TABLE = "wiregate_relay"  # the table's name for a relay id: table_name()
#: The table's named drop counters (the kernel's counterparts of the core's outcomes).
DROP_COUNTERS = ("unbound_source", "not_wireguard", "over_bandwidth")
_UDP_HEADER = 8
_HANDSHAKES = ((1, 148), (2, 92), (3, 64))  # WireGuard type, exact message size
_MAGIC = int.from_bytes(MAGIC, "big")
_MAGIC_BITS = len(MAGIC) * 8
_PAYLOAD = 64  # the UDP payload starts 64 bits into the transport header

Device = tuple[str, str]
SideKey = tuple[str, int, int]  # a bound side: source address, source port, relay port


@dataclass(frozen=True, slots=True)
class KernelSide:
    """One bound side: its address (IPv4 literal, port), its relay port, its device."""

    addr: Addr
    relay_port: int
    device: Device


@dataclass(frozen=True, slots=True)
class KernelPair:
    """A pair the kernel forwards: both sides bound (index 0 is ``pair.first``)."""

    pair: PairKey
    sides: tuple[KernelSide, KernelSide]


@dataclass(frozen=True, slots=True)
class KernelLimits:
    """What every rule of the table needs: ports, the SNAT source, the quota, the size."""

    relay_ports: tuple[int, ...]
    source: str | None  # the relay ports' IPv4 address; None: a wildcard (masquerade)
    bytes_per_second: int
    burst_bytes: int
    max_datagram: int
    table: str = TABLE


@dataclass(frozen=True, slots=True)
class Installed:
    """A pair as installed; ``name`` identifies it (a serial, never reused)."""

    name: str
    pair: KernelPair

    def counter(self, index: int) -> SideKey:
        """The ``forwarded4`` element counting what side ``index`` sent through the kernel."""
        side = self.pair.sides[index]
        return (side.addr[0], side.addr[1], side.relay_port)


@dataclass(frozen=True, slots=True)
class Plan:
    """One transaction: ``script`` removes ``removed`` and installs ``added``."""

    removed: tuple[Installed, ...]
    added: tuple[Installed, ...]
    script: str
    next_serial: int


@dataclass(frozen=True, slots=True)
class Counters:
    """Counter values read back from the table: a named counter, or a side's
    ``forwarded4`` element (:data:`SideKey`) → (packets, bytes)."""

    values: Mapping[str | SideKey, tuple[int, int]] = field(default_factory=dict)

    def packets(self, name: str | SideKey) -> int:
        """Packets counted by ``name`` (0 if absent)."""
        return self.values.get(name, (0, 0))[0]

    def bytes(self, name: str | SideKey) -> int:
        """Bytes counted by ``name`` (0 if absent)."""
        return self.values.get(name, (0, 0))[1]


def _ipv4(host: str) -> str | None:
    """``host`` as a canonical IPv4 literal the kernel may forward to, else None
    (the one destination rule, :func:`relay.filters.destination_refusal`)."""
    try:
        ip = normalize_ip(host)
    except ValueError:
        return None
    if ip.version != 4 or destination_refusal(ip) is not None:
        return None
    return str(ip)


def kernel_pairs(views: Iterable[AllocationView]) -> dict[PairKey, KernelPair]:
    """The allocations the kernel can forward: both sides bound, both ordinary IPv4."""
    pairs: dict[PairKey, KernelPair] = {}
    for view in views:
        nodes = (view.pair.first, view.pair.second)
        sides: list[KernelSide] = []
        for addr, port, node in zip(view.bound, view.ports, nodes, strict=True):
            host = None if addr is None else _ipv4(addr[0])
            if addr is None or host is None or not 0 < addr[1] < 65536:
                break
            sides.append(KernelSide((host, addr[1]), port, (view.pair.tenant, node.device_id)))
        if len(sides) == 2:
            pairs[view.pair] = KernelPair(view.pair, (sides[0], sides[1]))
    return pairs


def table_name(relay_id: str) -> str:
    """The relay's own table: one per relay id, so relays sharing a namespace never meet."""
    clean = re.sub(r"[^A-Za-z0-9_]", "_", relay_id)
    if clean != relay_id:  # "r-1" and "r.1" stay apart
        clean += "_" + hashlib.sha256(relay_id.encode()).hexdigest()[:8]
    return f"{TABLE}_{clean}" if clean else TABLE


def limit_name(device: Device) -> str:
    """The name of a device's byte limit (shared by all its sides)."""
    digest = hashlib.sha256(f"{device[0]}\0{device[1]}".encode()).hexdigest()
    return f"q_{digest[:16]}"


# --- the table -------------------------------------------------------------------------------


def render_table(limits: KernelLimits) -> str:
    """The whole table, empty of pairs; replaces any table of that name (one transaction).

    Every rule is here; a pair is only set and map elements (:func:`plan`).
    """
    t = f"inet {limits.table}"
    ports = ", ".join(str(p) for p in sorted(set(limits.relay_ports)))
    side = "ip saddr . udp sport . udp dport"  # a bound side, as the relay sees it
    flow = "ip saddr . udp sport . ip daddr . udp dport"
    translate = (
        f"snat ip to {flow} map @snat4"
        if limits.source is not None
        else f"masquerade to :{flow} map @masq4"
    )
    # a relay on one address leaves the same ports of other addresses alone
    to = f"ip daddr {limits.source} " if limits.source is not None else ""
    frm = f"ip saddr {limits.source} " if limits.source is not None else ""
    kernel = f"add rule {t} raw_pre meta nfproto ipv4 {to}udp dport @kernel_ports"
    data = _transport_match(limits)
    lines = [
        f"add table {t}",
        f"delete table {t}",
        f"add table {t}",
        f"add set {t} relay_ports {{ type inet_service; elements = {{ {ports} }}; }}",
        f"add set {t} kernel_ports {{ type inet_service; }}",
        f"add set {t} bound4 {{ type ipv4_addr . inet_service . inet_service; }}",
        # counts, per bound side, the transport data it sent through the kernel
        f"add set {t} forwarded4 {{ type ipv4_addr . inet_service . inet_service; counter; }}",
        f"add map {t} limit4 {{ type ipv4_addr . inet_service . inet_service : limit; }}",
        f"add map {t} dnat4 "
        f"{{ type ipv4_addr . inet_service . inet_service : ipv4_addr . inet_service; }}",
        f"add map {t} snat4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service"
        f" : ipv4_addr . inet_service; }}",
        f"add map {t} masq4 "
        f"{{ type ipv4_addr . inet_service . ipv4_addr . inet_service : inet_service; }}",
        *(f"add counter {t} {name}" for name in DROP_COUNTERS),
        f"add chain {t} raw_pre {{ type filter hook prerouting priority raw; policy accept; }}",
        f"add chain {t} raw_out {{ type filter hook output priority raw; policy accept; }}",
        f"add chain {t} nat_pre {{ type nat hook prerouting priority dstnat; policy accept; }}",
        f"add chain {t} nat_post {{ type nat hook postrouting priority srcnat; policy accept; }}",
        f"add rule {t} raw_pre {to}udp dport @relay_ports @th,{_PAYLOAD},{_MAGIC_BITS} "
        f"{_MAGIC:#x} notrack accept",
        f'{kernel} {side} != @bound4 counter name "unbound_source" drop',
        f'{kernel} {data} limit name {side} map @limit4 counter name "over_bandwidth" drop',
        f"{kernel} {data} {side} @forwarded4 accept",
        *(
            f"{kernel} @th,{_PAYLOAD},32 {kind << 24:#010x} "
            f"udp length {_UDP_HEADER + size} notrack accept"
            for kind, size in _HANDSHAKES
            if size <= limits.max_datagram
        ),
        f'{kernel} counter name "not_wireguard" drop',
        f"add rule {t} raw_out {frm}udp sport @relay_ports notrack",
        f"add rule {t} nat_pre meta nfproto ipv4 {to}udp dport @kernel_ports "
        f"dnat ip to {side} map @dnat4",
        f"add rule {t} nat_post meta nfproto ipv4 meta l4proto udp ct status dnat {translate}",
    ]
    return "\n".join(lines) + "\n"


def render_remove_table(limits: KernelLimits) -> str:
    """Remove the table if it exists (one transaction; no error when it does not)."""
    t = f"inet {limits.table}"
    return f"add table {t}\ndelete table {t}\n"


def _transport_match(limits: KernelLimits) -> str:
    """WireGuard transport data: type 4, reserved zero, a size
    :func:`relay.filters.transport_sizes` allows (as UDP lengths, in runs)."""
    lengths = sorted(_UDP_HEADER + n for n in transport_sizes(limits.max_datagram))
    runs: list[list[int]] = []
    for n in lengths:
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    elements = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"@th,{_PAYLOAD},32 0x04000000 udp length {{ {elements} }}"


def _elements(inst: Installed, limits: KernelLimits) -> list[tuple[str, str, str]]:
    """(map or set, key, value or "") of an installed pair, both directions."""
    out: list[tuple[str, str, str]] = []
    sides = inst.pair.sides
    for me, other in (sides, sides[::-1]):
        key = f"{me.addr[0]} . {me.addr[1]} . {me.relay_port}"
        dst = f"{other.addr[0]} . {other.addr[1]}"
        flow = f"{me.addr[0]} . {me.addr[1]} . {dst}"
        out += [
            ("kernel_ports", str(me.relay_port), ""),
            ("bound4", key, ""),
            ("forwarded4", key, ""),
            ("limit4", key, f'"{limit_name(me.device)}"'),
            ("dnat4", key, dst),
        ]
        if limits.source is not None:
            out.append(("snat4", flow, f"{limits.source} . {other.relay_port}"))
        else:
            out.append(("masq4", flow, str(other.relay_port)))
    return out


def _render_add(inst: Installed, limits: KernelLimits) -> list[str]:
    t = f"inet {limits.table}"
    return [
        f"add element {t} {where} {{ {key}{f' : {value}' if value else ''} }}"
        for where, key, value in _elements(inst, limits)
    ]


def _render_remove(inst: Installed, limits: KernelLimits) -> list[str]:
    t = f"inet {limits.table}"
    return [f"delete element {t} {where} {{ {key} }}" for where, key, _ in _elements(inst, limits)]


def _devices(installed: Iterable[Installed]) -> set[Device]:
    return {side.device for inst in installed for side in inst.pair.sides}


def plan(
    installed: Mapping[PairKey, Installed],
    desired: Mapping[PairKey, KernelPair],
    limits: KernelLimits,
    serial: int,
) -> Plan:
    """The transaction taking the table from ``installed`` to ``desired``.

    A pair whose bound addresses changed (a rebind) is removed and installed again
    under a new name; ``serial`` numbers new names and the plan says the next one.
    """
    removed = tuple(inst for key, inst in installed.items() if desired.get(key) != inst.pair)
    added: list[Installed] = []
    for key, pair in desired.items():
        current = installed.get(key)
        if current is None or current.pair != pair:
            added.append(Installed(f"a{serial}", pair))
            serial += 1
    kept = [inst for key, inst in installed.items() if desired.get(key) == inst.pair]
    before, after = _devices(installed.values()), _devices([*kept, *added])
    t = f"inet {limits.table}"
    lines: list[str] = []
    for inst in removed:
        lines += _render_remove(inst, limits)
    for device in sorted(after - before):
        lines.append(
            f"add limit {t} {limit_name(device)} {{ rate over {limits.bytes_per_second} "
            f"bytes/second burst {limits.burst_bytes} bytes }}"
        )
    for inst in added:
        lines += _render_add(inst, limits)
    lines += [f"delete limit {t} {limit_name(d)}" for d in sorted(before - after)]
    script = "\n".join(lines) + "\n" if lines else ""
    return Plan(removed, tuple(added), script, serial)


def parse_counters(*docs: Mapping[str, Any]) -> Counters:
    """Named counters (``list counter ...``) and the ``forwarded4`` elements' counters
    (``list set ... forwarded4``) of nftables' JSON listings; anything else is skipped."""
    values: dict[str | SideKey, tuple[int, int]] = {}
    for doc in docs:
        items = doc.get("nftables", [])
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            counter, found = item.get("counter"), item.get("set")
            if isinstance(counter, dict) and isinstance(counter.get("name"), str):
                _store(values, counter["name"], counter)
            elif isinstance(found, dict) and isinstance(found.get("elem"), list):
                for elem in found["elem"]:
                    key, stats = _side_element(elem)
                    if key is not None:
                        _store(values, key, stats)
    return Counters(values)


def _store(values: dict[str | SideKey, tuple[int, int]], key: str | SideKey, stats: Any) -> None:
    packets, size = stats.get("packets"), stats.get("bytes")
    if isinstance(packets, int) and isinstance(size, int):
        values[key] = (packets, size)


def _side_element(elem: Any) -> tuple[SideKey | None, dict[str, Any]]:
    """``{"elem": {"val": {"concat": [addr, port, port]}, "counter": {...}}}`` → key, counter."""
    inner = elem.get("elem") if isinstance(elem, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("counter"), dict):
        return None, {}
    val = inner.get("val")
    parts = val.get("concat") if isinstance(val, dict) else None
    if (
        isinstance(parts, list)
        and len(parts) == 3
        and isinstance(parts[0], str)
        and all(isinstance(p, int) for p in parts[1:])
    ):
        return (parts[0], parts[1], parts[2]), inner["counter"]
    return None, {}
