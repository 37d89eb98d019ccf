"""Pod identity in the network maps (pure: no I/O, no clock; ``docs/policy.md``).

:class:`PodTable` holds the pods each node reported (:mod:`wiregate.podwire`), keeping
only pods whose every IP lies inside one of the node's *shown* routes (approved by the
policy and not another device's): a node cannot claim another node's pods. A pod
refused is reported once (until it is reported differently) for the caller to log and
count. A node holds at most :data:`MAX_PODS_PER_NODE` pods. An address that two pods
of a node claim (a deleted pod's address reused before its deletion was reported)
counts for neither until one lets it go: the outcome does not depend on the order
of the reports, so a gateway reading the stored reports anew agrees.

:class:`PodMaps` compiles the policy's pod rules (:class:`identity.policy.PodRule`)
into what each viewer's map says. What pods of node N may open on viewer V
(``pods_from`` of peer N in V's map) depends only on V's *group* and N's pods; what
peer P may open on pods of node V (``pods_to`` of P in V's map) only on P's group and
V's pods. Both are compiled per (group, node), lazily, and their PEER text fragments
cached; :meth:`PodMaps.tail` is a PEER's text addition for one (viewer, peer) pair.

One pod change (:meth:`PodMaps.change`) updates the compiled entries of the node's
linked groups and returns a :class:`~gateway.mapping.netmap.Fanout` with only the
affected entries: the node re-upserted in the maps of the viewers whose ``pods_from``
changed, and, in the node's own map, the peers whose ``pods_to`` changed. A device
change that alters pod rules is found by comparing the tails of the pairs around the
changed device before and after (:func:`tails_around`, :func:`refresh`), a policy
change by comparing the compiled texts per (group, node) (:func:`swap`). The texts
are written by :func:`encode_full` and :func:`encode_delta_body`, as
:mod:`gateway.mapping.netmap` writes them, plus tails.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from gateway.mapping.netmap import AgentUpdate, Fanout, NetworkState, merge
from identity.policy import ALL_PROTOCOLS, ANY, Filter, PodRule, Policy
from wiregate import mapwire
from wiregate.podwire import Pod, PodReport
from wiregate.ports import canonical_ports

__all__ = [
    "MAX_PODS_PER_NODE",
    "PodChange",
    "PodMaps",
    "PodTable",
    "encode_delta_body",
    "encode_full",
    "refresh",
    "swap",
    "tails_around",
]

MAX_PODS_PER_NODE = 1000
TagSet = frozenset[str]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Change = tuple[Pod | None, Pod | None]  # (before, after) of one pod
Entries = dict[str, Filter]  # pod address -> what it may open / be opened on


@dataclass(frozen=True, slots=True)
class PodChange:
    """What a report did: the pods changed (before, after) and the pods newly refused,
    each with why."""

    changes: tuple[Change, ...] = ()
    refused: tuple[tuple[Pod, str], ...] = ()


@dataclass(slots=True)
class _Node:
    pods: dict[str, Pod] = field(default_factory=dict)  # as reported, by "namespace/name"
    claims: dict[str, set[str]] = field(default_factory=dict)  # address -> pods reporting it
    refused: dict[str, Pod] = field(default_factory=dict)  # reported once, by key


class PodTable:
    """The pods each node may claim, by node id."""

    def __init__(self) -> None:
        self._nodes: dict[str, _Node] = {}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __len__(self) -> int:
        return sum(len(n.pods) for n in self._nodes.values())

    def nodes(self) -> list[str]:
        """Ids of the nodes holding pods."""
        return list(self._nodes)

    def pods(self, node_id: str) -> list[Pod]:
        """The pods a node holds (none if unknown), each with the addresses it alone claims."""
        node = self._nodes.get(node_id)
        return [] if node is None else [_effective(node, p) for p in node.pods.values()]

    def apply(self, node_id: str, report: PodReport, routes: Iterable[str]) -> PodChange:
        """Apply a node's report, its pods checked against the node's shown ``routes``."""
        node = self._nodes.setdefault(node_id, _Node())
        nets = _networks(routes)
        changes: list[Change] = []
        refused: list[tuple[Pod, str]] = []
        gone = set(node.pods) - {p.key for p in report.upsert} if report.full else set()
        if report.full or len(node.refused) > MAX_PODS_PER_NODE:  # remembered, bounded
            reported = {p.key for p in report.upsert}
            node.refused = {k: p for k, p in node.refused.items() if k in reported}
        for key in sorted(gone | set(report.remove)):
            changes += _drop(node, key)
            node.refused.pop(key, None)
        for pod in report.upsert:
            reason = _refusal(node, pod, nets)
            if reason is not None:
                changes += _drop(node, pod.key)
                if node.refused.get(pod.key) != pod:
                    node.refused[pod.key] = pod
                    refused.append((pod, reason))
                continue
            node.refused.pop(pod.key, None)
            changes += _put(node, pod)
        if not node.pods and not node.refused:
            del self._nodes[node_id]
        return PodChange(_net(changes), tuple(refused))

    def recheck(self, node_id: str, routes: Iterable[str]) -> None:
        """Check a node's pods again against its shown ``routes`` (they changed): pods
        outside are set aside (refused, not reported again), pods refused earlier and inside
        now are kept, as a gateway reading the reports anew would."""
        node = self._nodes.get(node_id)
        if node is None:
            return
        routes = list(routes)
        nets = _networks(routes)
        earlier = tuple(node.refused.values())
        for key in [k for k, p in node.pods.items() if not _inside(p.ips, nets)]:
            node.refused[key] = node.pods[key]  # kept for a later change of routes
            _drop(node, key)
        if earlier:
            self.apply(node_id, PodReport(False, earlier), routes)

    def drop(self, node_id: str) -> tuple[Change, ...]:
        """Forget every pod of a node (revoked, deleted)."""
        node = self._nodes.pop(node_id, None)
        if node is None:
            return ()
        return tuple((_effective(node, p), None) for p in node.pods.values())


def _net(changes: list[Change]) -> tuple[Change, ...]:
    """One (before, after) per pod from a run of changes, those that changed nothing left out."""
    first: dict[str, Change] = {}
    for old, new in changes:
        key = (old or new).key  # type: ignore[union-attr]  # never both None
        first[key] = (first[key][0], new) if key in first else (old, new)
    return tuple(c for c in first.values() if c[0] != c[1])


def _networks(routes: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(r, strict=False) for r in routes]


def _inside(ips: Iterable[str], nets: list[Network]) -> bool:
    for ip in ips:
        address = ipaddress.ip_address(ip)
        if not any(address in net for net in nets):
            return False
    return True


def _refusal(node: _Node, pod: Pod, nets: list[Network]) -> str | None:
    if not _inside(pod.ips, nets):
        return "address outside the node's approved pod CIDRs"
    if pod.key not in node.pods and len(node.pods) >= MAX_PODS_PER_NODE:
        return f"the node holds {MAX_PODS_PER_NODE} pods already"
    return None


def _effective(node: _Node, pod: Pod) -> Pod:
    """``pod`` with only the addresses no other pod of the node claims."""
    ips = tuple(ip for ip in pod.ips if len(node.claims.get(ip, ())) == 1)
    return pod if ips == pod.ips else replace(pod, ips=ips)


def _drop(node: _Node, key: str) -> list[Change]:
    return _set(node, key, None)


def _put(node: _Node, pod: Pod) -> list[Change]:
    return _set(node, pod.key, pod)


def _set(node: _Node, key: str, pod: Pod | None) -> list[Change]:
    """Hold ``pod`` as ``key`` (None: forget it); the changes of every pod it affects."""
    old = node.pods.get(key)
    if old == pod:
        return []
    addresses = [ip for p in (old, pod) if p is not None for ip in p.ips]
    affected = sorted({key}.union(*(node.claims.get(ip, ()) for ip in addresses)))
    before = {k: _effective(node, node.pods[k]) for k in affected if k in node.pods}
    for ip in () if old is None else old.ips:
        claimants = node.claims[ip]
        claimants.discard(key)
        if not claimants:
            del node.claims[ip]
    node.pods.pop(key, None)
    if pod is not None:
        node.pods[key] = pod
        for ip in pod.ips:
            node.claims.setdefault(ip, set()).add(key)
    after = {k: _effective(node, node.pods[k]) for k in affected if k in node.pods}
    return [(before.get(k), after.get(k)) for k in affected if before.get(k) != after.get(k)]


class PodMaps:
    """The policy's pod rules compiled per (group, node) over a :class:`PodTable`."""

    def __init__(self, policy: Policy, table: PodTable | None = None) -> None:
        self.policy = policy
        self.table = table if table is not None else PodTable()
        self._entries: dict[tuple[bool, TagSet, str], Entries] = {}
        self._texts: dict[tuple[bool, TagSet, str], str] = {}
        self._keys: dict[str, set[tuple[bool, TagSet, str]]] = {}  # node -> cached keys

    @property
    def active(self) -> bool:
        """Whether any map carries pod rules (the policy has some and pods are known)."""
        return bool(self.policy.pods) and bool(self.table.nodes())

    def tail(self, state: NetworkState, viewer_id: str, peer_id: str) -> tuple[str, str]:
        """The ``pods_from`` and ``pods_to`` texts of ``peer_id`` in ``viewer_id``'s map."""
        table = self.table
        if peer_id not in table and viewer_id not in table:
            return "", ""
        outbound = inbound = ""
        if peer_id in table:
            outbound = self._text(state, True, state.group_of(viewer_id), peer_id)
        if viewer_id in table:
            inbound = self._text(state, False, state.group_of(peer_id), viewer_id)
        return outbound, inbound

    def forget(self, node_id: str) -> None:
        """Drop what is compiled for ``node_id`` (its pods, group or routes changed)."""
        for key in self._keys.pop(node_id, ()):
            self._entries.pop(key, None)
            self._texts.pop(key, None)

    def change(self, state: NetworkState, node_id: str, changes: Iterable[Change]) -> Fanout:
        """Apply pod changes of ``node_id`` (already in the table) to the compiled entries;
        the fanout upserts only the entries whose rules changed."""
        changes = list(changes)
        if not changes or node_id not in state or not self.policy.pods:
            return Fanout()
        node_group = state.group_of(node_id)
        olds = [(old, _matches(self.policy, old, node_group)) for old, _ in changes]
        news = [(new, _matches(self.policy, new, node_group)) for _, new in changes]
        linked = state.linked(node_group)
        touched: dict[bool, set[TagSet]] = {True: set(), False: set()}
        for key in list(self._keys.get(node_id, ())):
            if key[1] not in linked:  # a group that went: compiled anew if it comes back
                self._keys[node_id].discard(key)
                self._entries.pop(key, None)
                self._texts.pop(key, None)
        for group in linked:
            for outbound in (True, False):
                if self._update((outbound, group, node_id), olds, news):
                    touched[outbound].add(group)
        return _fanout(state, node_id, touched[True], touched[False])

    def _update(
        self,
        key: tuple[bool, TagSet, str],
        olds: list[tuple[Pod | None, tuple[PodRule, ...]]],
        news: list[tuple[Pod | None, tuple[PodRule, ...]]],
    ) -> bool:
        outbound, group, _ = key
        before = _contributions(olds, outbound, group)
        after = _contributions(news, outbound, group)
        if before == after:
            return False
        entries = self._entries.get(key)
        if entries is not None:
            for pod, _ in olds:
                for ip in () if pod is None else pod.ips:
                    entries.pop(ip, None)
            entries.update(after)
            self._texts.pop(key, None)
        return True

    def _get(self, state: NetworkState, outbound: bool, group: TagSet, node_id: str) -> Entries:
        key = (outbound, group, node_id)
        entries = self._entries.get(key)
        if entries is None:
            node_group = state.group_of(node_id)
            pods = [(p, _matches(self.policy, p, node_group)) for p in self.table.pods(node_id)]
            entries = self._entries[key] = _contributions(pods, outbound, group)
            self._keys.setdefault(node_id, set()).add(key)
        return entries

    def _text(self, state: NetworkState, outbound: bool, group: TagSet, node_id: str) -> str:
        key = (outbound, group, node_id)
        text = self._texts.get(key)
        if text is None:
            entries = self._get(state, outbound, group, node_id)
            name = "pods_from" if outbound else "pods_to"
            text = self._texts[key] = mapwire.pods_field(name, sorted(entries.items()))
        return text


def _matches(policy: Policy, pod: Pod | None, node_group: TagSet) -> tuple[PodRule, ...]:
    if pod is None or not pod.ips:
        return ()
    labels = dict(pod.labels)
    return tuple(
        rule
        for rule in policy.pods
        if rule.pods.matches(pod.namespace, pod.service_account, labels, node_group)
    )


def _contributions(
    pods: Iterable[tuple[Pod | None, tuple[PodRule, ...]]], outbound: bool, group: TagSet
) -> Entries:
    out: Entries = {}
    for pod, rules in pods:
        if pod is None:
            continue
        opens = _opens(rules, outbound, group)
        if opens:
            out.update(dict.fromkeys(pod.ips, opens))
    return out


def _opens(rules: tuple[PodRule, ...], outbound: bool, group: TagSet) -> Filter:
    found = [r for r in rules if r.outbound is outbound and _names(r.devices, group)]
    if not found:
        return ()
    if any(r.ports is None for r in found):
        return ALL_PROTOCOLS
    if len(found) == 1:
        return found[0].opens()
    return canonical_ports(spec for r in found for spec in r.ports or ())


def _names(entries: frozenset[str], group: TagSet) -> bool:
    return ANY in entries or not entries.isdisjoint(group)


def _fanout(
    state: NetworkState, node_id: str, outbound: set[TagSet], inbound: set[TagSet]
) -> Fanout:
    updates: dict[str, AgentUpdate] = {}
    shared: dict[Filter | None, AgentUpdate] = {}
    for group in outbound:
        for viewer in state.members(group):
            if viewer != node_id:
                rule = state.filter_between(viewer, node_id)
                update = shared.get(rule)
                if update is None:
                    filters = () if rule is None else (rule,)
                    update = shared[rule] = AgentUpdate(upsert=(node_id,), filters=filters)
                updates[viewer] = update
    peers = sorted({p for g in inbound for p in state.members(g)} - {node_id})
    if peers:
        updates[node_id] = _upserts(state, node_id, peers)
    named = set(peers) | ({node_id} if shared else set())
    return Fanout(updates=updates, peers={p: state.peer(p) for p in named})


def _upserts(state: NetworkState, viewer_id: str, peers: list[str]) -> AgentUpdate:
    filters = tuple(state.filter_between(viewer_id, p) for p in peers)
    if all(f is None for f in filters):
        filters = ()
    return AgentUpdate(upsert=tuple(peers), filters=filters)


def tails_around(
    state: NetworkState, maps: PodMaps, device_ids: Iterable[str]
) -> dict[tuple[str, str], tuple[str, str]]:
    """The pod tails of every (viewer, peer) pair involving ``device_ids`` that could
    carry one (a side is a node with pods)."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    nodes = [n for n in maps.table.nodes() if n in state]
    for device_id in device_ids:
        if device_id not in state:
            continue
        if device_id in maps.table:
            others: Iterable[str] = state.viewers(device_id)
        else:
            linked = state.linked(state.group_of(device_id))
            others = [n for n in nodes if n != device_id and state.group_of(n) in linked]
        for other in others:
            for pair in ((device_id, other), (other, device_id)):
                tail = maps.tail(state, *pair)
                if tail != ("", ""):
                    out[pair] = tail
    return out


def refresh(
    state: NetworkState,
    before: Mapping[tuple[str, str], tuple[str, str]],
    after: Mapping[tuple[str, str], tuple[str, str]],
) -> Fanout:
    """Upsert each peer whose tail in a viewer's map differs between ``before`` and
    ``after`` (both by :func:`tails_around`), where the pair still peers."""
    by_viewer: dict[str, list[str]] = {}
    for pair in sorted(set(before) | set(after)):
        viewer, peer = pair
        if before.get(pair) == after.get(pair) or viewer not in state or peer not in state:
            continue
        if peer in state.viewers(viewer):
            by_viewer.setdefault(viewer, []).append(peer)
    updates = {v: _upserts(state, v, peers) for v, peers in by_viewer.items()}
    named = {p for peers in by_viewer.values() for p in peers}
    return Fanout(updates=updates, peers={p: state.peer(p) for p in named})


def swap(old: NetworkState, old_maps: PodMaps, new: NetworkState, new_maps: PodMaps) -> Fanout:
    """The pod entries a policy change alters: compared per (group, node), not per pair.

    ``new_maps`` shares ``old_maps``'s table, checked here against the new approved
    routes; pairs peering only now are upserted by the policy's own fanout."""
    nodes = [n for n in new_maps.table.nodes() if n in new and n in old]
    pairs = [(n, g, outbound) for n in nodes for g in new.linked(new.group_of(n))
             for outbound in (True, False)]  # fmt: skip
    before = [old_maps._text(old, outbound, g, n) for n, g, outbound in pairs]
    for node in nodes:
        new_maps.table.recheck(node, new.shown_routes(node))
    touched: dict[str, tuple[set[TagSet], set[TagSet]]] = {}
    for (node, group, outbound), text in zip(pairs, before, strict=True):
        if new_maps._text(new, outbound, group, node) != text:
            touched.setdefault(node, (set(), set()))[0 if outbound else 1].add(group)
    fanout = Fanout()
    for node, (outbound_groups, inbound_groups) in touched.items():
        fanout = merge(fanout, _fanout(new, node, outbound_groups, inbound_groups))
    return fanout


def encode_full(state: NetworkState, maps: PodMaps, device_id: str, version: int) -> str:
    """The ``full`` message of ``device_id``, its peers carrying their pod rules."""
    ids = sorted(state.viewers(device_id))
    texts = state.peer_texts_for(device_id, ids)
    if maps.active:
        for i, pid in enumerate(ids):
            texts[i] = mapwire.with_pods(texts[i], *maps.tail(state, device_id, pid))
    return mapwire.encode_full(version, state.self_text(device_id), texts)


def encode_delta_body(
    state: NetworkState, update: AgentUpdate, tails: Sequence[tuple[str, str]]
) -> str:
    """The ``delta`` tail of one agent's ``update``, each upsert with its pod ``tails``."""
    texts = [state.peer_text(pid) for pid in update.upsert]
    for i, tail in enumerate(tails):
        rule = update.filter_at(i)
        text = texts[i] if rule is None else mapwire.with_filter(texts[i], rule)
        texts[i] = mapwire.with_pods(text, *tail)
    return mapwire.encode_delta_body(texts, update.remove)
