"""Per-agent network maps and the deltas one change causes (pure: no I/O, no clock).

:class:`NetworkState` holds the devices by id and groups them by tag set. The
policy is evaluated between *groups*, never between devices: when a tag set
first appears its group is linked to every existing group the policy lets it
peer with (a cost in groups, memoized by the policy). The peers of a device are
then the members of its group's linked groups, so a change costs time in
proportion to the peers it affects, not to the fleet.

A device's group is its *signature*: its tags plus ``group:NAME`` per policy
group (:func:`identity.policy.principals`). Peering is symmetric, so the
devices that see device D (its *viewers*) are exactly D's own peers. What a
peer may open on a viewer is not symmetric: when the policy restricts ports
between two groups, the pair's ``filter`` is recorded with the link and spliced
into the viewer's copy of the peer's JSON; pairs without one (the usual case)
take the unfiltered fast path. Advertised routes the policy does not approve
are left out of a device's peer entry and listed in its own self view, and so
are routes overlapping a route another device already carries
(:class:`~gateway.mapping.routeclaims.RouteClaims`: the device placed first keeps it;
the other gets it once it is placed again after the holder let go).

:func:`apply_upsert` and :func:`apply_remove` mutate the state and return a
:class:`Fanout`: per affected agent, the peers to upsert, the peer ids to remove
and its new self view. Applying each agent's update to its previous map gives
exactly :func:`full_map` (property-tested in ``tests/unit/gateway/test_netmap.py``).

:func:`encode_full` and :func:`encode_delta_body` give the wire text
(:mod:`wiregate.mapwire`) from JSON fragments cached per device, so a peer is
serialized once per change however many agents receive it. A peer's fragment is
written straight from its :class:`Device` by :func:`wiregate.mapwire.encode_peer`
(no intermediate :class:`Peer`), so the first full map after a load, when
nothing is cached yet, stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from gateway.mapping.routeclaims import RouteClaims
from identity.policy import Filter, Policy, principals
from wiregate import mapwire
from wiregate.errors import NotFound
from wiregate.model import Device, DnsConfig, NetMap, Peer, SelfView

__all__ = [
    "AgentUpdate",
    "Fanout",
    "NetworkState",
    "apply_remove",
    "apply_upsert",
    "encode_delta_body",
    "encode_full",
    "full_map",
    "merge",
    "signature",
]

TagSet = frozenset[str]


def signature(device: Device) -> TagSet:
    """The policy principals of ``device`` (its group in :class:`NetworkState`)."""
    return principals(device.tags, device.groups)


@dataclass(frozen=True, slots=True)
class AgentUpdate:
    """What changed for one agent: peers (by id) to upsert and to remove, new self view.

    ``filters`` is empty when no upserted peer is filtered, else one entry per
    ``upsert`` (None: unfiltered).
    """

    upsert: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    self_view: SelfView | None = None
    filters: tuple[Filter | None, ...] = ()

    def filter_at(self, index: int) -> Filter | None:
        """The filter of the ``index``-th upserted peer."""
        return self.filters[index] if self.filters else None


@dataclass(frozen=True, slots=True)
class Fanout:
    """The consequence of one change.

    ``updates`` maps each affected agent's device id to its :class:`AgentUpdate`
    (agents with the same update share one object); ``peers`` holds every peer
    named in an ``upsert``; ``revoked`` lists devices that no longer exist.
    """

    updates: Mapping[str, AgentUpdate] = field(default_factory=dict)
    peers: Mapping[str, Peer] = field(default_factory=dict)
    revoked: tuple[str, ...] = ()


class NetworkState:
    """Devices by id, grouped by tag set, with the policy's links between groups."""

    def __init__(
        self,
        policy: Policy | None = None,
        devices: Iterable[Device] = (),
        *,
        dns: DnsConfig | None = None,
        pool: tuple[str, ...] = (),
    ) -> None:
        self.policy = policy if policy is not None else Policy.allow_all()
        self.dns = dns  # the mesh domain and split-DNS zones, in every self view
        self.pool = pool  # the tunnel address pool (a CIDR per family), in every self view
        self._devices: dict[str, Device] = {}
        self._shown: dict[str, Device] = {}  # as peers see it: approved routes only
        self._refused: dict[str, tuple[str, ...]] = {}  # only devices with refused routes
        self._claims = RouteClaims()  # shown routes: no two devices' overlap
        self._blocked: dict[str, tuple[str, ...]] = {}  # routes refused as another's
        self._group_of: dict[str, TagSet] = {}
        self._members: dict[TagSet, set[str]] = {}
        self._links: dict[TagSet, set[TagSet]] = {}
        self._filter: dict[tuple[TagSet, TagSet], Filter] = {}  # (viewer, peer): filtered pairs
        self._filtered: dict[TagSet, set[TagSet]] = {}  # viewer group -> filtered peer groups
        self._peer: dict[str, Peer] = {}
        self._peer_text: dict[str, str] = {}  # str keys and values: nothing for the GC to track
        self._self_text: dict[str, str] = {}
        self._tailed: dict[str, dict[str, str]] = {}  # filter tail -> {peer id: filtered text}
        for device in devices:
            self._place(device)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[Device]:
        return iter(self._devices.values())

    def get(self, device_id: str) -> Device | None:
        """The device with this id, or None."""
        return self._devices.get(device_id)

    def device(self, device_id: str) -> Device:
        """The device with this id, or raise :class:`NotFound`."""
        try:
            return self._devices[device_id]
        except KeyError:
            raise NotFound(f"no device {device_id!r}") from None

    @property
    def groups(self) -> int:
        """How many distinct signatures (tag and group sets) the devices carry."""
        return len(self._members)

    def filter_between(self, viewer_id: str, peer_id: str) -> Filter | None:
        """What ``peer_id`` may open on ``viewer_id`` (None: everything)."""
        return self._filter.get((self._group_of[viewer_id], self._group_of[peer_id]))

    def peer_for(self, viewer_id: str, peer_id: str) -> Peer:
        """The peer as ``viewer_id`` sees it: :meth:`peer` with the pair's filter."""
        peer = self.peer(peer_id)
        rule = self.filter_between(viewer_id, peer_id)
        return peer if rule is None else replace(peer, filter=rule)

    def self_view(self, device_id: str) -> SelfView:
        """The device's own view, with the routes the policy refused, the names' settings
        and the tunnel address pool."""
        view = self._devices[device_id].to_self()
        refused = self._refused.get(device_id)
        if refused is None and self.dns is None and not self.pool:
            return view
        return replace(view, refused_routes=refused or (), dns=self.dns, pool=self.pool)

    def viewers(self, device_id: str) -> set[str]:
        """Ids of the devices that peer with ``device_id`` (its peers, as peering is symmetric)."""
        own = self._group_of[device_id]
        out: set[str] = set()
        for group in self._links[own]:
            out.update(self._members[group])
        out.discard(device_id)
        return out

    def peer(self, device_id: str) -> Peer:
        """The device as its peers see it (cached until the device changes)."""
        peer = self._peer.get(device_id)
        if peer is None:
            peer = self._peer[device_id] = self._shown[device_id].to_peer()
        return peer

    def peer_text(self, device_id: str) -> str:
        """The PEER JSON text of a device, serialized once per change."""
        text = self._peer_text.get(device_id)
        if text is None:
            text = self._peer_text[device_id] = mapwire.encode_peer(self._shown[device_id])
        return text

    def peer_texts(self, device_ids: Iterable[str]) -> list[str]:
        """:meth:`peer_text` of each device, in order (the full-map loop, kept tight)."""
        cached = self._peer_text.get
        miss = self.peer_text
        return [cached(pid) or miss(pid) for pid in device_ids]

    def self_text(self, device_id: str) -> str:
        """The SELF JSON text of a device, serialized once per change."""
        text = self._self_text.get(device_id)
        if text is None:
            text = self._self_text[device_id] = mapwire.encode_self(self.self_view(device_id))
        return text

    def _place(self, device: Device) -> None:
        group = signature(device)
        self._devices[device.id] = device
        self._show(device, group)
        self._group_of[device.id] = group
        members = self._members.get(group)
        if members is None:
            members = self._members[group] = set()
            self._link(group)
        members.add(device.id)

    def group_of(self, device_id: str) -> TagSet:
        """The signature (group) of a device in the state."""
        return self._group_of[device_id]

    def linked(self, group: TagSet) -> set[TagSet]:
        """The groups whose members peer with members of ``group`` (do not mutate)."""
        return self._links[group]

    def members(self, group: TagSet) -> set[str]:
        """The ids of the devices of ``group`` (do not mutate)."""
        return self._members.get(group, set())

    def shown_routes(self, device_id: str) -> tuple[str, ...]:
        """The routes of a device that its peers get (approved, not another's)."""
        return self._shown[device_id].routes

    def route_owners(self, route: str) -> set[str]:
        """Ids of the devices carrying a route that overlaps ``route``."""
        return self._claims.overlapping(route)

    def _show(self, device: Device, group: TagSet) -> None:
        if not device.routes:
            self._shown[device.id] = device
            return
        approved, refused = self.policy.approve_routes(group, device.routes)
        approved, clashing = self._claims.claim(device.id, approved)  # first come keeps it
        if clashing:
            self._blocked[device.id] = clashing
        refused += clashing
        if refused:
            self._shown[device.id] = replace(device, routes=approved)
            self._refused[device.id] = refused
        else:
            self._shown[device.id] = device

    def _link(self, group: TagSet) -> None:
        links = self._links[group] = set()
        for other in self._members:
            if self.policy.may_peer(group, other):
                links.add(other)
                self._links[other].add(group)
                self._record_filter(group, other)
                self._record_filter(other, group)

    def _record_filter(self, viewer: TagSet, peer: TagSet) -> None:
        rule = self.policy.reach(viewer, peer)
        if rule is not None:
            self._filter[(viewer, peer)] = rule
            self._filtered.setdefault(viewer, set()).add(peer)

    def _drop_filters(self, group: TagSet, other: TagSet) -> None:
        for viewer, peer in ((group, other), (other, group)):
            if self._filter.pop((viewer, peer), None) is not None:
                peers = self._filtered[viewer]
                peers.discard(peer)
                if not peers:
                    del self._filtered[viewer]

    def _unplace(self, device_id: str) -> None:
        del self._devices[device_id]
        self._forget(device_id)
        group = self._group_of.pop(device_id)
        members = self._members[group]
        members.discard(device_id)
        if not members:
            del self._members[group]
            for other in self._links.pop(group):
                self._drop_filters(group, other)
                if other != group:
                    self._links[other].discard(group)

    def peer_texts_for(self, viewer_id: str, device_ids: list[str]) -> list[str]:
        """:meth:`peer_texts` as ``viewer_id`` sees them: filtered where the policy says so."""
        own = self._group_of[viewer_id]
        filtered = self._filtered.get(own)
        if not filtered:
            return self.peer_texts(device_ids)
        caches = {g: self._tail_cache(self._filter[(own, g)]) for g in filtered}
        group_of, plain = self._group_of, self._peer_text.get
        out: list[str] = []
        for pid in device_ids:
            cache = caches.get(group_of[pid])
            text = plain(pid) if cache is None else cache[1].get(pid)
            if text is None:
                text = self.peer_text(pid)
                if cache is not None:
                    text = cache[1][pid] = mapwire.with_filter(text, cache[0])
            out.append(text)
        return out

    def _tail_cache(self, rule: Filter) -> tuple[Filter, dict[str, str]]:
        tail = mapwire.filter_tail(rule)
        cache = self._tailed.get(tail)
        if cache is None:
            cache = self._tailed[tail] = {}
        return rule, cache

    def _forget(self, device_id: str) -> None:
        for cache in self._tailed.values():
            cache.pop(device_id, None)
        self._shown.pop(device_id, None)
        self._refused.pop(device_id, None)
        self._claims.release(device_id)
        self._blocked.pop(device_id, None)
        self._peer.pop(device_id, None)
        self._peer_text.pop(device_id, None)
        self._self_text.pop(device_id, None)


def full_map(state: NetworkState, device_id: str, version: int) -> NetMap:
    """The whole map of ``device_id`` at ``version``; :class:`NotFound` if unknown."""
    state.device(device_id)
    peers = {pid: state.peer_for(device_id, pid) for pid in sorted(state.viewers(device_id))}
    return NetMap(version=version, self_view=state.self_view(device_id), peers=peers)


def apply_upsert(state: NetworkState, device: Device) -> Fanout:
    """Add or replace ``device`` in ``state``; return what each affected agent must learn."""
    fanout = _upsert(state, device)
    return _reclaim(state, fanout) if state._blocked else fanout


def _reclaim(state: NetworkState, fanout: Fanout) -> Fanout:
    """Place again the devices refused a route that no other device carries any more."""
    for device_id in sorted(state._blocked):
        blocked = state._blocked.get(device_id, ())
        if any(not state.route_owners(r) - {device_id} for r in blocked):
            fanout = _merge(fanout, _upsert(state, state.device(device_id), force=True))
    return fanout


def merge(first: Fanout, then: Fanout) -> Fanout:
    """One fanout telling each agent what ``first`` and then ``then`` told it."""
    return _merge(first, then)


def _merge(first: Fanout, then: Fanout) -> Fanout:
    """One fanout telling each agent what ``first`` and then ``then`` told it."""
    updates = dict(first.updates)
    for agent, update in then.updates.items():
        earlier = updates.get(agent)
        updates[agent] = update if earlier is None else _merge_update(earlier, update)
    return Fanout(updates, {**first.peers, **then.peers}, first.revoked + then.revoked)


def _merge_update(first: AgentUpdate, then: AgentUpdate) -> AgentUpdate:
    upsert = tuple(dict.fromkeys(first.upsert + then.upsert))
    remove = tuple(r for r in dict.fromkeys(first.remove + then.remove) if r not in upsert)
    filters: tuple[Filter | None, ...] = ()
    if first.filters or then.filters:
        later = {pid: then.filter_at(i) for i, pid in enumerate(then.upsert)}
        earlier = {pid: first.filter_at(i) for i, pid in enumerate(first.upsert)}
        filters = tuple(later[p] if p in later else earlier[p] for p in upsert)
    self_view = then.self_view or first.self_view
    return AgentUpdate(upsert=upsert, remove=remove, self_view=self_view, filters=filters)


def _upsert(state: NetworkState, device: Device, *, force: bool = False) -> Fanout:
    old = state.get(device.id)
    if old == device and not force:
        return Fanout()
    old_group = state._group_of.get(device.id)
    before, old_peer, old_self = set(), None, None
    if old is not None:
        before, old_peer = state.viewers(device.id), state.peer(device.id)
        old_self = state.self_view(device.id)
        state._unplace(device.id)
    state._place(device)
    group = state._group_of[device.id]
    same_group = old_group == group
    after = before if same_group else state.viewers(device.id)
    peer = state.peer(device.id)
    updates: dict[str, AgentUpdate] = {}
    gone = AgentUpdate(remove=(device.id,))
    updates.update(dict.fromkeys(before - after, gone))
    if old_peer is None or old_peer != peer:
        told = after
    else:
        told = after - before
        if not same_group:
            told |= _refiltered(state, before & after, old_group, group, viewers_side=True)
    _tell(state, updates, told, device.id, group)
    peers = {device.id: peer} if told else {}
    if old_group is not None and old_self is not None:
        own = _own_update(state, device.id, old_self, old_group, before, after)
        if own is not None:
            updates[device.id] = own
            peers.update((pid, state.peer(pid)) for pid in own.upsert)
    return Fanout(updates=updates, peers=peers)


def _refiltered(
    state: NetworkState,
    kept: set[str],
    old: TagSet | None,
    new: TagSet,
    *,
    viewers_side: bool,
) -> set[str]:
    """Devices of ``kept`` whose filter with the changed device differs between groups."""
    if old is None:
        return set()
    rule = state.policy.reach
    group_of = state._group_of
    if viewers_side:  # what the changed device may open on each kept viewer
        return {v for v in kept if rule(group_of[v], old) != rule(group_of[v], new)}
    return {v for v in kept if rule(old, group_of[v]) != rule(new, group_of[v])}


def _tell(
    state: NetworkState, updates: dict[str, AgentUpdate], told: set[str], pid: str, group: TagSet
) -> None:
    """Upsert ``pid`` to each of ``told``, with the filter of each viewer's group."""
    plain = AgentUpdate(upsert=(pid,))
    if not any(group in state._filtered.get(g, ()) for g in state._links[group]):
        updates.update(dict.fromkeys(told, plain))
        return
    by_filter: dict[Filter, AgentUpdate] = {}
    for viewer in told:
        rule = state._filter.get((state._group_of[viewer], group))
        if rule is None:
            updates[viewer] = plain
        else:
            update = by_filter.get(rule)
            if update is None:
                update = by_filter[rule] = AgentUpdate(upsert=(pid,), filters=(rule,))
            updates[viewer] = update


def _own_update(
    state: NetworkState,
    device_id: str,
    old_self: SelfView,
    old_group: TagSet,
    before: set[str],
    after: set[str],
) -> AgentUpdate | None:
    new_self = state.self_view(device_id)
    self_view = new_self if new_self != old_self else None
    group = state._group_of[device_id]
    added = after - before
    if old_group != group:
        added |= _refiltered(state, before & after, old_group, group, viewers_side=False)
    upsert, remove = tuple(sorted(added)), tuple(sorted(before - after))
    if self_view is None and not upsert and not remove:
        return None
    filters: tuple[Filter | None, ...] = ()
    if group in state._filtered:
        filters = tuple(state.filter_between(device_id, pid) for pid in upsert)
    return AgentUpdate(upsert=upsert, remove=remove, self_view=self_view, filters=filters)


def apply_remove(state: NetworkState, device_id: str) -> Fanout:
    """Remove ``device_id`` from ``state``: its viewers drop it, the device is revoked."""
    if device_id not in state:
        return Fanout()
    viewers = state.viewers(device_id)
    state._unplace(device_id)
    fanout = Fanout(
        updates=dict.fromkeys(viewers, AgentUpdate(remove=(device_id,))),
        revoked=(device_id,),
    )
    return _reclaim(state, fanout) if state._blocked else fanout


def encode_full(state: NetworkState, device_id: str, version: int) -> str:
    """The ``full`` message of ``device_id`` as JSON text, built from cached fragments."""
    texts = state.peer_texts_for(device_id, sorted(state.viewers(device_id)))
    return mapwire.encode_full(version, state.self_text(device_id), texts)


def encode_delta_body(state: NetworkState, update: AgentUpdate) -> str:
    """The tail of a ``delta`` message (upsert and remove), shared by agents with one update."""
    texts = [state.peer_text(pid) for pid in update.upsert]
    for i, rule in enumerate(update.filters):
        if rule is not None:
            texts[i] = mapwire.with_filter(texts[i], rule)
    return mapwire.encode_delta_body(texts, update.remove)
