"""The soak's invariants, as pure functions of what the database and the streams hold.

Each check returns a list of problems (empty: the invariant holds); the driver
prints them and the test asserts they are empty. Who may peer with whom is
derived here from the tags alone (the soak's policy: ``tag:sim`` devices peer
with each other, ``tag:real`` and ``tag:probe`` devices with each other), not
from the gateway's policy code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import median

from wiregate.model import NetMap

__all__ = [
    "POLICY_YAML",
    "Live",
    "check_addresses",
    "check_map",
    "check_peer_keys",
    "check_rss_growth",
    "expected_peers",
    "group_of",
    "live_devices",
]

POLICY_YAML = """\
acls:
  - {src: ["tag:sim"], dst: ["tag:sim"]}
  - {src: ["tag:real", "tag:probe"], dst: ["tag:real", "tag:probe"]}
"""


@dataclass(frozen=True, slots=True)
class Live:
    """A device as the database holds it (from the admin API's device list)."""

    id: str
    name: str
    public_key: str
    ipv4: str
    ipv6: str
    tags: tuple[str, ...]
    endpoints: tuple[str, ...]


def live_devices(docs: Iterable[Mapping[str, object]]) -> dict[str, Live]:
    """The admin API's DEVICE objects as :class:`Live` values, by id."""
    out = {}
    for doc in docs:
        v4, v6 = (str(a) for a in doc["addresses"])  # type: ignore[attr-defined]
        out[str(doc["id"])] = Live(
            id=str(doc["id"]),
            name=str(doc["name"]),
            public_key=str(doc["public_key"]),
            ipv4=v4,
            ipv6=v6,
            tags=tuple(str(t) for t in doc["tags"]),  # type: ignore[attr-defined]
            endpoints=tuple(str(e) for e in doc["endpoints"]),  # type: ignore[attr-defined]
        )
    return out


def group_of(tags: Iterable[str]) -> str:
    """The peering group the soak's policy puts a device in."""
    tags = set(tags)
    if tags & {"tag:real", "tag:probe"}:
        return "real"
    return "sim" if "tag:sim" in tags else "none"


def expected_peers(viewer: Live, live: Mapping[str, Live]) -> set[str]:
    """Every other live device the viewer may peer with."""
    group = group_of(viewer.tags)
    return {d.id for d in live.values() if d.id != viewer.id and group_of(d.tags) == group}


def check_addresses(live: Mapping[str, Live]) -> list[str]:
    """Every IPv4 and every IPv6 tunnel address is held by one device at most."""
    problems = []
    for family in ("ipv4", "ipv6"):
        counts = Counter(getattr(d, family) for d in live.values())
        problems += [f"{family} {a} held by {n} devices" for a, n in counts.items() if n > 1]
    return problems


def check_map(
    viewer_id: str, netmap: NetMap, live: Mapping[str, Live], version: int, removed: set[str]
) -> list[str]:
    """One agent's map: not ahead of the database (an agent's version is the last change
    that concerned it), its own current key, exactly the permitted live devices with their
    current keys, addresses and endpoints, no removed device."""
    viewer = live.get(viewer_id)
    if viewer is None:
        return [f"{viewer_id}: connected but not a live device"]
    where = f"{viewer.name} ({viewer_id})"
    problems = []
    if netmap.version > version:
        problems.append(f"{where}: map version {netmap.version} ahead of the database's {version}")
    if netmap.self_view.public_key != viewer.public_key:
        problems.append(f"{where}: self key is not the device's current key")
    want, have = expected_peers(viewer, live), set(netmap.peers)
    if missing := want - have:
        problems.append(f"{where}: {len(missing)} permitted devices missing, e.g. {min(missing)}")
    if extra := have - want:
        gone = extra & removed
        problems.append(f"{where}: {len(extra)} unexpected peers ({len(gone)} removed ones)")
    for peer_id in want & have:
        peer, device = netmap.peers[peer_id], live[peer_id]
        if peer.public_key != device.public_key:
            problems.append(f"{where}: peer {device.name} has a stale key")
        if peer.endpoints != device.endpoints:
            problems.append(f"{where}: peer {device.name} endpoints {peer.endpoints} "
                            f"!= {device.endpoints}")  # fmt: skip
        if set(peer.addresses) != {f"{device.ipv4}/32", f"{device.ipv6}/128"}:
            problems.append(f"{where}: peer {device.name} addresses {peer.addresses}")
    return problems


def check_peer_keys(
    where: str, keys: set[str], viewer_id: str, live: Mapping[str, Live]
) -> list[str]:
    """A real agent's interface holds exactly the current keys of its permitted peers."""
    viewer = live.get(viewer_id)
    if viewer is None:
        return [f"{where}: not a live device"]
    want = {live[i].public_key for i in expected_peers(viewer, live)}
    problems = []
    if missing := want - keys:
        problems.append(f"{where}: interface lacks {len(missing)} current peer keys")
    if extra := keys - want:
        problems.append(f"{where}: interface holds {len(extra)} keys that are not current")
    return problems


def check_rss_growth(
    where: str,
    samples: Sequence[tuple[float, int]],
    warmup_s: float,
    bound: float,
    window_s: float = 60.0,
) -> tuple[dict[str, float | int], list[str]]:
    """A process's memory after the warm-up: ``samples`` are (seconds into the churn,
    VmRSS KiB) in time order. RSS after the warm-up is the median of the samples in
    the ``window_s`` after ``warmup_s``, at the end the median of the last ``window_s``
    (the garbage collector's saw-tooth is a few MiB); the growth from one to the other
    must stay below ``bound`` (0.05: 5 %). Returns the figures and the problems (none
    when the bound held)."""
    end_t = samples[-1][0] if samples else 0.0
    if end_t < warmup_s + 2 * window_s:
        return {}, [f"{where}: no RSS samples {2 * window_s:.0f} s past the warm-up "
                    f"({warmup_s:.0f} s)"]  # fmt: skip
    after = [rss for t, rss in samples if warmup_s <= t <= warmup_s + window_s]
    last = [rss for t, rss in samples if t >= end_t - window_s]
    warm, end = int(median(after)), int(median(last))
    grew = end / warm - 1
    minutes = (end_t - warmup_s - window_s) / 60
    figure = {"warmup_s": warmup_s, "rss_kb_after_warmup": warm, "end_s": round(end_t, 1),
              "rss_kb_at_end": end, "rss_growth": round(grew, 4),
              "kib_per_min": round((end - warm) / max(minutes, 1 / 60), 1)}  # fmt: skip
    if grew >= bound:
        return figure, [f"{where}: RSS grew {grew:.1%} from {warm} KiB after the warm-up "
                        f"to {end} KiB (bound {bound:.0%})"]  # fmt: skip
    return figure, []
