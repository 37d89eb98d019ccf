"""The packet filter as named sets (pure): the table, each peer's elements, the element diff.

The table ``inet wiregate`` is created once (:func:`table_script`); its rules
change only with the mode (below). What each peer may open lives in named sets,
so a peer's change is a few ``add element`` / ``delete element`` operations
(:func:`element_script`)::

    chain from_tunnel {
        ct state established,related accept                     # only when stateful (below)
        ip saddr @open4 accept                                  # allowed everything
        ip saddr . meta l4proto @proto4 accept                  # a protocol, every port
        ip saddr . meta l4proto . th dport @port4 accept        # a protocol and a port
        ip saddr . meta l4proto @proto4_ranges accept           # the same from a prefix
        ip saddr . meta l4proto . th dport @port4_ranges accept #   or for a port range
        ip saddr . meta l4proto . th dport @pod_port4_ranges accept  # a pod's port range
        ... the same for ip6 ...
        meta nfproto @any_open accept                           # sources 0.0.0.0/0 or ::/0
        meta nfproto . meta l4proto @any_proto accept
        meta nfproto . meta l4proto . th dport @any_port accept
        ip saddr . ip daddr . meta l4proto @to_proto4 accept    # pods_to: a peer may open
        ip saddr . ip daddr . meta l4proto . th dport @to_port4 accept  # this on a pod
        ... to_proto4_ranges, to_port4_ranges; the same for ip6 ...    # of this node
        counter name "dropped" drop
    }

The first rule needs connection tracking, which the kernel then does for every
packet of the namespace, the underlay's WireGuard UDP included (about 8 % of a
wireguard-go tunnel's CPU per byte on two cores: docs/benchmarks.md). It is left out
while no peer is restricted (``stateful=False``): every source WireGuard delivers
(a configured peer's allowed IPs) is then in a set that accepts everything from
it (``open*``, ``proto*_ranges`` with protocols 0-255, ``any_open``), so each
packet's verdict is the same without it. For the same reason the ``input`` and
``forward`` chains are then not hooked at all: every packet would be accepted, and
an unhooked chain costs nothing per packet (the MSS clamp's chains stay hooked). The
first restricted peer, or the last one going, replaces the table in one transaction
(:class:`~agent.dataplane.firewall.Firewall`).

An element is a pair ``(set name, element text)``, the text in nftables syntax
(protocols as numbers: ``"100.64.0.2 . 6 . 5432"``). Single addresses go to hash
sets, whose updates cost the same whatever their size. Prefixes and port ranges
go to interval sets of concatenations (nftables fetches such a set's elements to
update it, so they hold only what needs an interval). Elements never overlap
within a set: a peer's sources are collapsed and its port ranges merged, and the
agent refuses peers whose allowed IPs overlap another's, except a default route
(an exit node), whose allowances go to the ``any_*`` sets, merged over all peers.

:class:`ElementBook` keeps the elements of the last map by peer, so a map that
differs by one peer costs a lookup per peer and that peer's elements.
:func:`listed_elements` and :func:`skeleton_of` read the kernel's JSON listing
back for a repair.

Pod identity (:attr:`wiregate.model.Peer.pods_from` / ``pods_to``) only adds
allowances to a restricted peer (a peer with no filter may open everything
already, so its pod rules add nothing and are not written; they never change the
mode). ``pods_from`` (pods of node N that may open these here) are elements of a
single address, N's pod's, in the same sets as a peer's own (``port4``,
``proto4``...), except port ranges: those go to ``pod_port4_ranges``, since a pod's
range would overlap N's own prefix-wide one in ``port4_ranges``. A pod address
outside N's own allowed IPs (or only under a default route) is skipped and
reported: WireGuard delivers it from another peer, which would borrow the
allowance. ``pods_to`` (this node's pods that peer P may open) are elements
``P's source . pod address [. protocol [. port]]`` in the ``to_*`` sets, the same
element logic with the destination added (a default-route source is skipped and
reported: it would overlap other peers' elements). A pod's change is its few
elements, in its peer's share of the :class:`ElementBook`.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from agent.dataplane import mss
from agent.dataplane.backend import IPNetwork, network, network_text
from agent.dataplane.desired import DesiredPeer
from wiregate.model import NetMap
from wiregate.ports import parse_port

__all__ = [
    "SETS",
    "TABLE",
    "Change",
    "Element",
    "ElementBook",
    "PeerElements",
    "PeerRule",
    "element_script",
    "listed_elements",
    "peer_elements",
    "peer_rules",
    "skeleton_of",
    "table_script",
]

TABLE = "wiregate"
Element = tuple[str, str]  # (set or map name, element in nftables syntax)

_PROTO = {"tcp": "6", "udp": "17"}
_ICMP = {4: "1", 6: "58"}
_NFPROTO = {4: "ipv4", 6: "ipv6"}
_ALL_PROTOS = "0-255"
_FAMILY = {4: "ip", 6: "ip6"}
_ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}

# name -> declaration body; the filter's sets, then the MSS clamp's maps (mss.MAPS)
SETS: dict[str, str] = {}
for _v in (4, 6):
    _a = _ADDR[_v]
    SETS |= {
        f"open{_v}": f"type {_a}",
        f"proto{_v}": f"type {_a} . inet_proto",
        f"port{_v}": f"type {_a} . inet_proto . inet_service",
        f"proto{_v}_ranges": f"type {_a} . inet_proto; flags interval",
        f"port{_v}_ranges": f"type {_a} . inet_proto . inet_service; flags interval",
    }
    SETS[f"pod_port{_v}_ranges"] = f"type {_a} . inet_proto . inet_service; flags interval"
    SETS |= {
        f"to_proto{_v}": f"type {_a} . {_a} . inet_proto",
        f"to_port{_v}": f"type {_a} . {_a} . inet_proto . inet_service",
        f"to_proto{_v}_ranges": f"type {_a} . {_a} . inet_proto; flags interval",
        f"to_port{_v}_ranges": f"type {_a} . {_a} . inet_proto . inet_service; flags interval",
    }
SETS |= {
    "any_open": "type nf_proto",
    "any_proto": "type nf_proto . inet_proto",
    "any_port": "type nf_proto . inet_proto . inet_service; flags interval",
}


def _filter_rules(stateful: bool) -> list[str]:
    rules = ["ct state established,related accept"] if stateful else []
    for v in (4, 6):
        rules += _match_rules(f"{_FAMILY[v]} saddr", v, f"@pod_port{v}_ranges")
    rules += [
        "meta nfproto @any_open accept",
        "meta nfproto . meta l4proto @any_proto accept",
        "meta nfproto . meta l4proto . th dport @any_port accept",
    ]
    for v in (4, 6):  # pods_to: the source and this node's pod
        rules += _match_rules(f"{_FAMILY[v]} saddr . {_FAMILY[v]} daddr", v, "", "to_")
    return [*rules, 'counter name "dropped" drop']


def _match_rules(key: str, v: int, pod_ranges: str, to: str = "") -> list[str]:
    """The accept rules of one family's sets (``to``: the pods_to sets, which have no
    ``open``: a pod rule always names a protocol)."""
    rules = [] if to else [f"{key} @open{v} accept"]
    rules += [
        f"{key} . meta l4proto @{to}proto{v} accept",
        f"{key} . meta l4proto . th dport @{to}port{v} accept",
        f"{key} . meta l4proto @{to}proto{v}_ranges accept",
        f"{key} . meta l4proto . th dport @{to}port{v}_ranges accept",
    ]
    return rules + ([f"{key} . meta l4proto . th dport {pod_ranges} accept"] if pod_ranges else [])


def table_script(
    interface: str, *, clamp: bool = False, replace: bool = True, stateful: bool = True
) -> str:
    """The script that replaces ``table inet wiregate`` with the empty sets and the rules.

    ``clamp``: also the MSS clamp's maps and chains (:mod:`agent.dataplane.mss`).
    ``replace``: delete the table first (False: there is none, create it).
    ``stateful``: replies pass by connection tracking (needed once a peer is restricted);
    False: no peer is restricted and the filter's chains are not hooked at all.
    """
    sets = dict(SETS) | (mss.MAPS if clamp else {})
    hook = f'iifname "{interface}" jump from_tunnel'
    body = ["\tcounter dropped {\n\t}\n"]
    body += [_block("set" if n in SETS else "map", n, decl.split("; ")) for n, decl in sets.items()]
    # not stateful: no peer is restricted, so from_tunnel accepts whatever WireGuard
    # delivers; its chains are then left off the hooks (no packet pays for them)
    body += [
        _block("chain", "input", [_hook("input"), hook] if stateful else [hook]),
        _block("chain", "forward", [_hook("forward"), hook] if stateful else [hook]),
        _block("chain", "from_tunnel", _filter_rules(stateful)),
    ]
    if clamp:
        body += [_block("chain", n, lines) for n, lines in mss.chains(interface).items()]
    head = f"table inet {TABLE}\ndelete table inet {TABLE}\n" if replace else ""
    return f"{head}table inet {TABLE} {{\n{''.join(body)}}}\n"


def _hook(hook: str) -> str:
    return f"type filter hook {hook} priority filter; policy accept;"


def _block(kind: str, name: str, lines: Iterable[str]) -> str:
    return f"\t{kind} {name} {{\n" + "".join(f"\t\t{line}\n" for line in lines) + "\t}\n"


def element_script(delete: Iterable[Element], add: Iterable[Element]) -> str:
    """One transaction: delete these elements, then add those (sorted, grouped by set)."""
    return _elements("delete", delete) + _elements("add", add)


def _elements(verb: str, elements: Iterable[Element]) -> str:
    by_set: dict[str, list[str]] = {}
    for name, text in elements:
        by_set.setdefault(name, []).append(text)
    return "".join(
        f"{verb} element inet {TABLE} {name} {{ {', '.join(sorted(texts))} }}\n"
        for name, texts in sorted(by_set.items())
    )


# --- what a peer may open ---------------------------------------------------------


PodRules = tuple[tuple[str, tuple[str, ...]], ...]  # (pod address, filter), by address


@dataclass(frozen=True, slots=True)
class PeerRule:
    """One peer's sources and what they may open (None: everything; (): nothing)."""

    name: str
    sources: tuple[str, ...] | frozenset[IPNetwork]  # text, or parsed by the desired builder
    filter: tuple[str, ...] | None
    path_mtu: int | None = None  # the probed path MTU through the tunnel (MSS clamp)
    key: str = ""  # the peer's public key (its identity in an ElementBook; default: name)
    pods_from: PodRules = ()  # its pods that may open more here (Peer.pods_from)
    pods_to: PodRules = ()  # what it may open on this node's pods (Peer.pods_to)


def peer_rules(
    netmap: NetMap,
    keys: Collection[str] | None = None,
    path_mtu: Mapping[str, int] | None = None,
    validated: Mapping[str, DesiredPeer] | None = None,
) -> tuple[PeerRule, ...]:
    """Each peer of ``netmap`` as a :class:`PeerRule`.

    ``keys``: the public keys of the peers actually configured (a peer the agent
    refused gets no rule, so it cannot lend its allowance to addresses another
    peer carries). ``validated``: the configured peers themselves, by public key,
    whose parsed allowed IPs are the sources (instead of ``keys``).
    ``path_mtu``: probed path MTUs by public key.
    """
    return tuple(
        PeerRule(name, sources, flt, mtu, key, pods[0], pods[1])
        for key, name, sources, flt, mtu, pods in _rule_args(netmap, keys, path_mtu, validated)
    )


Sources = tuple[str, ...] | frozenset[IPNetwork]
Pods = tuple[PodRules, PodRules]  # (pods_from, pods_to)
RuleArgs = tuple[str, str, Sources, tuple[str, ...] | None, int | None, Pods]  # key, name, ...


def _rule_args(
    netmap: NetMap,
    keys: Collection[str] | None,
    path_mtu: Mapping[str, int] | None,
    validated: Mapping[str, DesiredPeer] | None,
) -> Iterator[RuleArgs]:
    """:func:`peer_rules` as plain tuples (a map's every apply goes through here)."""
    mtus = path_mtu or {}
    for p in netmap.peers.values():
        key = p.public_key
        if validated is not None:
            ok = validated.get(key)
            if ok is not None:
                yield key, p.name, ok.allowed_ips, p.filter, mtus.get(key), (p.pods_from, p.pods_to)
        elif keys is None or key in keys:
            yield key, p.name, p.allowed_ips, p.filter, mtus.get(key), (p.pods_from, p.pods_to)


@dataclass(frozen=True, slots=True)
class PeerElements:
    """A peer's elements; its allowances for a default route (merged over all peers)."""

    elements: frozenset[Element]
    anywhere: frozenset[tuple[int, str, int, int]]  # (version, proto, low, high)
    any_mss: tuple[tuple[int, int], ...]  # (version, MSS) for a default route
    problems: tuple[str, ...]
    restricted: bool


Ports = dict[str, list[tuple[int, int]] | None]  # protocol number -> port ranges (None: all)


def peer_elements(rule: PeerRule) -> PeerElements:
    """The elements ``rule`` puts in the table (pure; bad entries skipped and reported)."""
    base = _peer_elements(rule.name, rule.sources, rule.filter, rule.path_mtu)
    return _with_pods(base, rule.name, rule.sources, (rule.pods_from, rule.pods_to))


@lru_cache(maxsize=1 << 14)
def _peer_elements(
    name: str,
    sources: tuple[str, ...] | frozenset[IPNetwork],
    filter: tuple[str, ...] | None,
    path_mtu: int | None,
) -> PeerElements:
    problems: list[str] = []
    nets = _networks(name, sources, problems)
    ports = None if filter is None else _ports(name, filter, problems)
    elements: set[Element] = set()
    anywhere: set[tuple[int, str, int, int]] = set()
    any_mss: list[tuple[int, int]] = []
    for net in nets:
        if net.prefixlen == 0:
            anywhere |= _anywhere(net.version, ports)
            if path_mtu is not None:
                any_mss.append((net.version, mss.mss_for(path_mtu, net.version)))
            continue
        elements |= _net_elements(net, ports)
        if path_mtu is not None:
            elements.add(mss.element(_text(net), net.version, net.prefixlen == net.max_prefixlen,
                                     mss.mss_for(path_mtu, net.version)))  # fmt: skip
    return PeerElements(
        frozenset(elements),
        frozenset(anywhere),
        tuple(any_mss),
        tuple(problems),
        filter is not None,
    )


def _with_pods(base: PeerElements, name: str, sources: Sources, pods: Pods) -> PeerElements:
    """``base`` and the elements of the peer's pod rules (none unless it is restricted)."""
    if not base.restricted or pods == ((), ()):
        return base
    elements, problems = set(base.elements), list(base.problems)
    for to, rules in enumerate(pods):
        for address, flt in rules:
            got, problem = _pod_elements(name, sources, address, flt, bool(to))
            elements |= got
            problems += problem
    return PeerElements(
        frozenset(elements), base.anywhere, base.any_mss, tuple(problems), base.restricted
    )


@lru_cache(maxsize=1 << 16)
def _pod_elements(
    name: str, sources: Sources, address: str, flt: tuple[str, ...], to: bool
) -> tuple[frozenset[Element], tuple[str, ...]]:
    """The elements and problems of one pod rule of peer ``name``.

    ``to`` False (``pods_from``): what the pod at ``address`` of that peer may open
    here, single-address elements; True (``pods_to``): what the peer may open on this
    node's pod at ``address``, elements ``source . pod``.
    """
    problems: list[str] = []
    pod = _pod_network(address)
    nets = _networks(name, sources, problems)
    if pod is None or not (to or any(n.prefixlen and _within(pod, n) for n in nets)):
        problem = f"filter: peer {name}: pod {address!r} is not among its addresses; skipped"
        return frozenset(), (problem,)
    ports = _ports(name, flt, problems)
    if not to:
        return frozenset(_pod_range(e) for e in _net_elements(pod, ports)), tuple(problems)
    elements: set[Element] = set()
    for net in nets:
        if net.version != pod.version:
            continue
        if not net.prefixlen:
            problems.append(f"filter: peer {name}: pod {address}: default route not opened")
            continue
        elements |= _net_elements(net, ports, _text(pod))
    return frozenset(elements), tuple(problems)


def _pod_network(address: str) -> IPNetwork | None:
    try:
        return network(address)
    except ValueError:
        return None


def _within(pod: IPNetwork, net: IPNetwork) -> bool:
    return pod.version == net.version and pod.subnet_of(net)  # type: ignore[arg-type]


def _pod_range(element: Element) -> Element:
    name, text = element
    return (
        (f"pod_{name}", text) if name.startswith("port") and name.endswith("_ranges") else element
    )


def _networks(
    name: str, sources: Iterable[str | IPNetwork], problems: list[str]
) -> list[IPNetwork]:
    found: dict[int, list[IPNetwork]] = {4: [], 6: []}
    for source in sources:
        try:
            net = network(source) if isinstance(source, str) else source
        except ValueError:
            problems.append(f"filter: peer {name}: bad source {source!r} skipped")
            continue
        found[net.version].append(net)
    return [n for nets in found.values() for n in (nets if len(nets) < 2 else _collapsed(nets))]


def _collapsed(nets: list[IPNetwork]) -> list[IPNetwork]:
    """Nested or adjacent prefixes of one family as disjoint prefixes."""
    return list(ipaddress.collapse_addresses(nets))  # type: ignore[type-var]


def _ports(name: str, filter: Iterable[str], problems: list[str]) -> Ports:
    ports: Ports = {}
    for text in filter:
        try:
            spec = parse_port(text)
        except ValueError as exc:  # more restrictive: the entry allows nothing
            problems.append(f"filter: peer {name}: {exc}; skipped")
            continue
        proto = _PROTO.get(spec.proto, "icmp")
        if spec.low is None or spec.high is None:
            ports[proto] = None
        elif ports.get(proto, []) is not None:
            ports.setdefault(proto, []).append((spec.low, spec.high))  # type: ignore[union-attr]
    return {p: None if r is None else _merged(r) for p, r in ports.items()}


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out


def _text(net: IPNetwork) -> str:
    text = network_text(net)
    return text.partition("/")[0] if net.prefixlen == net.max_prefixlen else text


def _net_elements(net: IPNetwork, ports: Ports | None, dest: str = "") -> set[Element]:
    """The elements of sources ``net`` (and destination ``dest``: the ``to_*`` sets)."""
    v, src, exact = net.version, _text(net), net.prefixlen == net.max_prefixlen
    suffix = "" if exact else "_ranges"
    to = "to_" if dest else ""
    src = f"{src} . {dest}" if dest else src
    if ports is None:
        if exact:
            return {(f"{to}open{v}", src)}
        return {(f"{to}proto{v}_ranges", f"{src} . {_ALL_PROTOS}")}
    out: set[Element] = set()
    for proto, ranges in ports.items():
        number = _ICMP[v] if proto == "icmp" else proto
        if ranges is None:
            out.add((f"{to}proto{v}{suffix}", f"{src} . {number}"))
            continue
        for low, high in ranges:
            if exact and low == high:
                out.add((f"{to}port{v}", f"{src} . {number} . {low}"))
            else:
                out.add((f"{to}port{v}_ranges", f"{src} . {number} . {_span(low, high)}"))
    return out


def _span(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def _anywhere(version: int, ports: Ports | None) -> set[tuple[int, str, int, int]]:
    if ports is None:
        return {(version, "", 0, 0)}  # everything
    out: set[tuple[int, str, int, int]] = set()
    for proto, ranges in ports.items():
        number = _ICMP[version] if proto == "icmp" else proto
        for low, high in ranges or [(0, 0)]:  # (0, 0): every port
            out.add((version, number, low, high))
    return out


def _anywhere_elements(items: Iterable[tuple[int, str, int, int]]) -> set[Element]:
    """The ``any_*`` elements of every default-route allowance, merged (pure)."""
    opened = {v for v, proto, _, _ in items if not proto}
    protos = {(v, p) for v, p, low, _ in items if p and low == 0 and v not in opened}
    ranges: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for v, p, low, high in items:
        if p and low and v not in opened and (v, p) not in protos:
            ranges.setdefault((v, p), []).append((low, high))
    out = {("any_open", _NFPROTO[v]) for v in opened}
    out |= {("any_proto", f"{_NFPROTO[v]} . {p}") for v, p in protos}
    for (v, p), spans in ranges.items():
        out |= {("any_port", f"{_NFPROTO[v]} . {p} . {_span(lo, hi)}") for lo, hi in _merged(spans)}
    return out


def _any_mss_elements(items: Iterable[tuple[int, int]]) -> set[Element]:
    lowest: dict[int, int] = {}
    for version, value in items:
        lowest[version] = min(value, lowest.get(version, value))
    return {mss.any_element(_NFPROTO[v], value) for v, value in lowest.items()}


# --- the elements of a whole map, kept by peer ---------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """Elements to delete and to add to go from the previous map to this one."""

    delete: frozenset[Element]
    add: frozenset[Element]


class ElementBook:
    """The elements of the last map, by peer, with a count of the peers holding each."""

    def __init__(self) -> None:
        self._by_peer: dict[str, PeerElements] = {}
        self._count: dict[Element, int] = {}
        self._special: dict[str, PeerElements] = {}  # peers with problems or a default route
        self._podded: dict[str, tuple[PeerElements, Pods, PeerElements]] = {}  # base, pods, all
        self._restricted = 0  # peers with a filter
        self._shared: set[Element] = set()  # the merged any_* elements
        self.problems: tuple[str, ...] = ()

    @property
    def restricted(self) -> bool:
        """Whether some peer of the last map has a filter."""
        return self._restricted > 0

    def elements(self) -> frozenset[Element]:
        """Every element the table should hold."""
        return frozenset(self._count) | self._shared

    def update(self, rules: Iterable[PeerRule]) -> Change:
        """Take ``rules`` as the new map; return what changed (cost: a lookup per peer)."""
        return self._update(
            (r.key or r.name, r.name, r.sources, r.filter, r.path_mtu, (r.pods_from, r.pods_to))
            for r in rules
        )

    def update_map(
        self,
        netmap: NetMap,
        *,
        keys: Collection[str] | None = None,
        path_mtu: Mapping[str, int] | None = None,
        validated: Mapping[str, DesiredPeer] | None = None,
    ) -> Change:
        """:meth:`update` with :func:`peer_rules` of these arguments."""
        return self._update(_rule_args(netmap, keys, path_mtu, validated))

    def _update(self, rules: Iterable[RuleArgs]) -> Change:
        now: dict[str, PeerElements] = {}
        added: set[Element] = set()
        removed: set[Element] = set()
        before = self._by_peer
        dirty = False
        podded, self._podded = self._podded, {}
        for key, name, sources, flt, mtu, pods in rules:
            got = _peer_elements(name, sources, flt, mtu)
            if pods != ((), ()) and got.restricted:
                got = self._pod_share(podded.get(key), key, got, name, sources, pods)
            now[key] = got
            old = before.pop(key, None)
            if old is not got:
                dirty = True
                self._swap(key, old, got, added, removed)
        for key, old in before.items():
            dirty = True
            self._swap(key, old, None, added, removed)
        self._by_peer = now
        if dirty:
            self._refresh(added, removed)
        return Change(frozenset(removed - added), frozenset(added - removed))

    def _pod_share(
        self,
        last: tuple[PeerElements, Pods, PeerElements] | None,
        key: str,
        base: PeerElements,
        name: str,
        sources: Sources,
        pods: Pods,
    ) -> PeerElements:
        """The peer's elements with its pods' (the last ones if nothing changed)."""
        if last is not None and last[0] is base and last[1] == pods:
            got = last[2]
        else:
            got = _with_pods(base, name, sources, pods)
        self._podded[key] = (base, pods, got)
        return got

    def _swap(
        self,
        key: str,
        old: PeerElements | None,
        new: PeerElements | None,
        added: set[Element],
        removed: set[Element],
    ) -> None:
        if old is not None:
            self._restricted -= old.restricted
            self._special.pop(key, None)
            for element in old.elements:
                left = self._count[element] - 1
                if left:
                    self._count[element] = left
                else:
                    del self._count[element]
                    removed.add(element)
        if new is not None:
            self._restricted += new.restricted
            if new.problems or new.anywhere or new.any_mss:
                self._special[key] = new
            for element in new.elements:
                held = self._count.get(element, 0)
                self._count[element] = held + 1
                if not held:
                    added.add(element)

    def _refresh(self, added: set[Element], removed: set[Element]) -> None:
        peers = self._special.values()
        anywhere = [a for p in peers for a in p.anywhere]
        shared = _anywhere_elements(anywhere) | _any_mss_elements(
            m for p in peers for m in p.any_mss
        )
        added |= shared - self._shared
        removed |= self._shared - shared
        self._shared = shared
        self.problems = tuple(x for p in peers for x in p.problems)


# --- the kernel's listing, read back ---------------------------------------------------


def listed_elements(doc: Mapping[str, Any]) -> frozenset[Element]:
    """The elements of every set and map of the table in ``list table``'s JSON."""
    out: set[Element] = set()
    for item in _table_items(doc):
        body = item.get("set") or item.get("map")
        if not isinstance(body, dict):
            continue
        kinds = body.get("type")
        kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
        for elem in body.get("elem") or []:
            out.add((str(body.get("name")), _elem_text(elem, kinds)))
    return frozenset(out)


def skeleton_of(doc: Mapping[str, Any]) -> tuple[str, ...]:
    """The table's shape in ``list table``'s JSON: sets, chains and rules, no elements."""
    shape = []
    for item in _table_items(doc):
        kind, body = next(iter(item.items()))
        if isinstance(body, dict):
            drop = {"handle", "elem", "packets", "bytes"}
            body = {k: v for k, v in body.items() if k not in drop}
        shape.append(json.dumps({kind: body}, sort_keys=True))
    return tuple(shape)


def _table_items(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    items = doc.get("nftables")
    return [
        i
        for i in (items if isinstance(items, list) else [])
        if isinstance(i, dict) and "metainfo" not in i and "table" not in i
    ]


def _elem_text(elem: Any, kinds: list[str]) -> str:
    if isinstance(elem, dict) and "elem" in elem:  # an element with its own attributes
        elem = elem["elem"].get("val")
    if isinstance(elem, list) and len(elem) == 2:  # a map element: [key, value]
        return f"{_key_text(elem[0], kinds)} : {_field(elem[1], 'integer')}"
    return _key_text(elem, kinds)


def _key_text(key: Any, kinds: list[str]) -> str:
    if isinstance(key, dict) and "concat" in key:
        fields = key["concat"]
        return " . ".join(
            _field(f, kinds[i] if i < len(kinds) else "") for i, f in enumerate(fields)
        )
    return _field(key, kinds[0] if kinds else "")


def _field(value: Any, kind: str) -> str:
    if isinstance(value, dict) and "prefix" in value:
        return f"{value['prefix']['addr']}/{value['prefix']['len']}"
    if isinstance(value, dict) and "range" in value:
        low, high = value["range"]
        return f"{_field(low, kind)}-{_field(high, kind)}"
    if isinstance(value, str) and kind == "inet_proto":
        return _proto_number(value)
    if isinstance(value, str) and kind == "inet_service":
        return _service_number(value)
    return str(value)


@lru_cache(maxsize=256)
def _proto_number(name: str) -> str:
    try:
        return str(socket.getprotobyname(name))
    except OSError:
        return name


@lru_cache(maxsize=256)
def _service_number(name: str) -> str:
    try:
        return str(socket.getservbyname(name))
    except OSError:
        return name
