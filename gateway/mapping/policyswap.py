"""What each agent must learn when the policy changes (pure: no I/O, no clock).

:func:`policy_fanout` compares the maps two :class:`NetworkState` s (the same
devices under the old and the new policy) give every device: for each one whose
map differs, the peers to upsert (new, or shown differently: another filter, other
approved routes), the peer ids to remove, and its new self view (refused routes).
Agents whose map is the same are not named. Applying each update to an agent's
map under the old policy gives exactly its :func:`~gateway.mapping.netmap.full_map`
under the new one (tested in ``tests/unit/gateway/test_policy_swap.py``).

The policy is compared between *groups* (devices with the same tags and groups), as
:class:`NetworkState` links them: each group's update is computed once and shared by
its members, so the cost follows the groups and the ids the deltas name, not every
pair of devices.
"""

from __future__ import annotations

from bisect import bisect_left

from gateway.mapping.netmap import AgentUpdate, Fanout, NetworkState
from identity.policy import Filter
from wiregate.model import SelfView

__all__ = ["policy_fanout"]

TagSet = frozenset[str]


def policy_fanout(old: NetworkState, new: NetworkState) -> Fanout:
    """Per device of ``new`` whose map differs from its map in ``old``: its update."""
    reshown = {d.id for d in new if old.peer(d.id) != new.peer(d.id)}
    updates: dict[str, AgentUpdate] = {}
    named: set[str] = set()
    for group, members in new._members.items():
        shared = _group_update(old, new, group, reshown)
        named.update(shared.upsert)
        ids, gone = set(shared.upsert), set(shared.remove)
        for viewer in sorted(members):
            own = new.self_view(viewer)
            self_view = own if own != old.self_view(viewer) else None
            update = shared
            if self_view is not None or viewer in ids or viewer in gone:
                update = _for(shared, viewer, self_view)
            if update.upsert or update.remove or update.self_view is not None:
                updates[viewer] = update
    return Fanout(updates=updates, peers={pid: new.peer(pid) for pid in named})


def _group_update(
    old: NetworkState, new: NetworkState, group: TagSet, reshown: set[str]
) -> AgentUpdate:
    """What every member of ``group`` learns (its own id included, taken out per member):
    the members of groups linked anew, of groups unlinked, and of groups whose filter
    on ``group`` changed; of the others, the members shown differently."""
    before, after = old._links[group], new._links[group]
    upsert: set[str] = set()
    remove: set[str] = set()
    for other in before - after:
        remove.update(old._members[other])
    for other in after:
        members = new._members[other]
        if other not in before or old._filter.get((group, other)) != new._filter.get(
            (group, other)
        ):
            upsert.update(members)
        else:
            upsert.update(members & reshown)
    ids = tuple(sorted(upsert))
    filters = tuple(new._filter.get((group, new._group_of[pid])) for pid in ids)
    return AgentUpdate(ids, tuple(sorted(remove)), None, _filters(filters))


def _for(shared: AgentUpdate, viewer: str, self_view: SelfView | None) -> AgentUpdate:
    """``shared`` as ``viewer`` itself gets it: without its own id (the ids are sorted),
    with its self view."""
    upsert, filters = shared.upsert, shared.filters
    i = bisect_left(upsert, viewer)
    if i < len(upsert) and upsert[i] == viewer:
        upsert = upsert[:i] + upsert[i + 1 :]
        filters = _filters(filters[:i] + filters[i + 1 :]) if filters else ()
    remove = shared.remove
    j = bisect_left(remove, viewer)
    if j < len(remove) and remove[j] == viewer:
        remove = remove[:j] + remove[j + 1 :]
    return AgentUpdate(upsert, remove, self_view, filters)


def _filters(filters: tuple[Filter | None, ...]) -> tuple[Filter | None, ...]:
    return () if all(f is None for f in filters) else filters
