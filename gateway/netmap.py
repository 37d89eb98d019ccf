"""Per-agent network maps and the deltas one change causes (pure: no I/O, no clock).

:class:`NetworkState` holds the devices by id and groups them by tag set. The
policy is evaluated between *groups*, never between devices: when a tag set
first appears its group is linked to every existing group the policy lets it
peer with (a cost in groups, memoized by the policy). The peers of a device are
then the members of its group's linked groups, so a change costs time in
proportion to the peers it affects, not to the fleet.

Peering is symmetric, so the devices that see device D (its *viewers*) are
exactly D's own peers.

:func:`apply_upsert` and :func:`apply_remove` mutate the state and return a
:class:`Fanout`: per affected agent, the peers to upsert, the peer ids to remove
and its new self view. Applying each agent's update to its previous map gives
exactly :func:`full_map` (property-tested in ``tests/unit/test_netmap.py``).

The ``encode_*`` functions build the wire text of ``gateway.model`` from JSON
fragments cached per device, so a peer is serialized once per change however
many agents receive it. A peer's fragment is written straight from its
:class:`Device` by :func:`encode_peer` (no intermediate :class:`Peer`), so the
first full map after a load, when nothing is cached yet, stays cheap.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import NotFound
from gateway.model import Device, NetMap, Peer, SelfView
from identity.policy import Policy

__all__ = [
    "AgentUpdate",
    "Fanout",
    "NetworkState",
    "apply_remove",
    "apply_upsert",
    "delta_wire",
    "dumps",
    "encode_delta",
    "encode_delta_body",
    "encode_full",
    "encode_peer",
    "full_map",
]

TagSet = frozenset[str]


@dataclass(frozen=True, slots=True)
class AgentUpdate:
    """What changed for one agent: peers (by id) to upsert and to remove, new self view."""

    upsert: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    self_view: SelfView | None = None


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

    def __init__(self, policy: Policy | None = None, devices: Iterable[Device] = ()) -> None:
        self.policy = policy if policy is not None else Policy.allow_all()
        self._devices: dict[str, Device] = {}
        self._group_of: dict[str, TagSet] = {}
        self._members: dict[TagSet, set[str]] = {}
        self._links: dict[TagSet, set[TagSet]] = {}
        self._peer: dict[str, Peer] = {}
        self._peer_text: dict[str, str] = {}  # str keys and values: nothing for the GC to track
        self._self_text: dict[str, str] = {}
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
        """How many distinct tag sets the devices carry."""
        return len(self._members)

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
            peer = self._peer[device_id] = self._devices[device_id].to_peer()
        return peer

    def peer_text(self, device_id: str) -> str:
        """The PEER JSON text of a device, serialized once per change."""
        text = self._peer_text.get(device_id)
        if text is None:
            text = self._peer_text[device_id] = encode_peer(self._devices[device_id])
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
            view = self._devices[device_id].to_self()
            text = self._self_text[device_id] = dumps(view.to_wire())
        return text

    def _place(self, device: Device) -> None:
        group = frozenset(device.tags)
        self._devices[device.id] = device
        self._group_of[device.id] = group
        members = self._members.get(group)
        if members is None:
            members = self._members[group] = set()
            self._link(group)
        members.add(device.id)

    def _link(self, group: TagSet) -> None:
        links = self._links[group] = set()
        for other in self._members:
            if self.policy.may_peer(group, other):
                links.add(other)
                self._links[other].add(group)

    def _unplace(self, device_id: str) -> None:
        del self._devices[device_id]
        self._forget(device_id)
        group = self._group_of.pop(device_id)
        members = self._members[group]
        members.discard(device_id)
        if not members:
            del self._members[group]
            for other in self._links.pop(group):
                if other != group:
                    self._links[other].discard(group)

    def _forget(self, device_id: str) -> None:
        self._peer.pop(device_id, None)
        self._peer_text.pop(device_id, None)
        self._self_text.pop(device_id, None)


def full_map(state: NetworkState, device_id: str, version: int) -> NetMap:
    """The whole map of ``device_id`` at ``version``; :class:`NotFound` if unknown."""
    device = state.device(device_id)
    peers = {pid: state.peer(pid) for pid in sorted(state.viewers(device_id))}
    return NetMap(version=version, self_view=device.to_self(), peers=peers)


def apply_upsert(state: NetworkState, device: Device) -> Fanout:
    """Add or replace ``device`` in ``state``; return what each affected agent must learn."""
    old = state.get(device.id)
    if old == device:
        return Fanout()
    before = state.viewers(device.id) if old is not None else set()
    same_group = old is not None and frozenset(old.tags) == frozenset(device.tags)
    if old is not None:
        state._unplace(device.id)
    state._place(device)
    after = before if same_group else state.viewers(device.id)
    peer = state.peer(device.id)
    updates: dict[str, AgentUpdate] = {}
    gone = AgentUpdate(remove=(device.id,))
    updates.update(dict.fromkeys(before - after, gone))
    changed = AgentUpdate(upsert=(device.id,))
    told = after if old is None or old.to_peer() != peer else after - before
    updates.update(dict.fromkeys(told, changed))
    peers = {device.id: peer} if told else {}
    if old is not None:
        own = _own_update(old, device, before, after)
        if own is not None:
            updates[device.id] = own
            peers.update((pid, state.peer(pid)) for pid in own.upsert)
    return Fanout(updates=updates, peers=peers)


def _own_update(old: Device, new: Device, before: set[str], after: set[str]) -> AgentUpdate | None:
    new_self = new.to_self()
    self_view = new_self if new_self != old.to_self() else None
    upsert, remove = tuple(sorted(after - before)), tuple(sorted(before - after))
    if self_view is None and not upsert and not remove:
        return None
    return AgentUpdate(upsert=upsert, remove=remove, self_view=self_view)


def apply_remove(state: NetworkState, device_id: str) -> Fanout:
    """Remove ``device_id`` from ``state``: its viewers drop it, the device is revoked."""
    if device_id not in state:
        return Fanout()
    viewers = state.viewers(device_id)
    state._unplace(device_id)
    return Fanout(
        updates=dict.fromkeys(viewers, AgentUpdate(remove=(device_id,))),
        revoked=(device_id,),
    )


def delta_wire(fanout: Fanout, agent_id: str, base: int, version: int) -> dict[str, Any]:
    """The ``delta`` message (as a dict) telling ``agent_id`` its part of ``fanout``."""
    update = fanout.updates[agent_id]
    return {
        "type": "delta",
        "base": base,
        "version": version,
        "self": None if update.self_view is None else update.self_view.to_wire(),
        "upsert": [fanout.peers[pid].to_wire() for pid in update.upsert],
        "remove": list(update.remove),
    }


_ENCODER = json.JSONEncoder(separators=(",", ":"))


def dumps(obj: Any) -> str:
    """Compact JSON text, as sent on the stream."""
    return _ENCODER.encode(obj)


_string: Callable[[str], str] = json.encoder.encode_basestring_ascii  # what _ENCODER uses


def _strings(items: Iterable[str]) -> str:
    return ",".join(map(_string, items))


def encode_peer(device: Device) -> str:
    """The PEER JSON text of ``device``, equal to ``dumps(device.to_peer().to_wire())``.

    Written directly from the device's fields, one escape per string, without
    building the :class:`Peer` and its dict (tested byte for byte against them).
    """
    try:
        keepalive = device.keepalive
        if keepalive is None:
            alive = "null"
        elif type(keepalive) is int:
            alive = int.__repr__(keepalive)
        else:
            alive = dumps(keepalive)
        addresses = f"{_string(f'{device.ipv4}/32')},{_string(f'{device.ipv6}/128')}"
        allowed = f"{addresses},{_strings(device.routes)}" if device.routes else addresses
        return (
            f'{{"id":{_string(device.id)},"name":{_string(device.name)},'
            f'"public_key":{_string(device.public_key)},'
            f'"addresses":[{addresses}],"allowed_ips":[{allowed}],'
            f'"endpoints":[{_strings(device.endpoints)}],"keepalive":{alive},'
            f'"tags":[{_strings(device.tags)}]}}'
        )
    except TypeError:  # a field that is not a str after all: let the encoder decide
        return dumps(device.to_peer().to_wire())


def encode_full(state: NetworkState, device_id: str, version: int) -> str:
    """The ``full`` message of ``device_id`` as JSON text, built from cached fragments."""
    peers = ",".join(state.peer_texts(sorted(state.viewers(device_id))))
    head = f'{{"type":"full","version":{version},"self":{state.self_text(device_id)}'
    return f'{head},"peers":[{peers}]}}'


def encode_delta_body(state: NetworkState, update: AgentUpdate) -> str:
    """The tail of a ``delta`` message (upsert and remove), shared by agents with one update."""
    upsert = ",".join(state.peer_text(pid) for pid in update.upsert)
    return f'"upsert":[{upsert}],"remove":{dumps(list(update.remove))}}}'


def encode_delta(base: int, version: int, self_text: str | None, body: str) -> str:
    """A whole ``delta`` message: a per-agent head joined to a shared body."""
    own = "null" if self_text is None else self_text
    return f'{{"type":"delta","base":{base},"version":{version},"self":{own},{body}'
