"""The reconciler's diff: desired device vs live device -> the minimal update (pure).

Only what differs is touched, so that a no-op reconcile issues no write and no
handshake is reset. Endpoints are special: WireGuard roams (it updates a peer's
endpoint to wherever authenticated packets come from), so the agent sets an
endpoint only when the control plane's choice changed since the last apply, or
when the peer has none. Without a previous apply (agent restart) the live
endpoint is compared with the desired one.

``only`` restricts the peers looked at to the given public keys: with a live
state known to match the last applied config, only :func:`changed_peers` can
need a write, so an apply costs time proportional to the change.
"""

from __future__ import annotations

from collections.abc import Collection

from agent.dataplane.backend import DeviceUpdate, LiveDevice, LivePeer, PeerUpdate
from agent.dataplane.desired import DesiredDevice, DesiredPeer

__all__ = ["changed_peers", "diff"]


def changed_peers(desired: DesiredDevice, before: DesiredDevice) -> set[str]:
    """Public keys of the peers added, removed or changed between ``before`` and ``desired``."""
    new, old = desired.peers, before.peers
    if new is old:
        return set()
    keys = new.keys() ^ old.keys()
    keys.update(
        k for k, p in new.items() if (q := old.get(k)) is not p and q is not None and q != p
    )
    return keys


def diff(
    desired: DesiredDevice,
    live: LiveDevice,
    last_applied: DesiredDevice | None,
    only: Collection[str] | None = None,
) -> DeviceUpdate:
    """The update that brings ``live`` to ``desired`` (for the peers in ``only``, if given)."""
    private_key = None if live.public_key == desired.public_key else desired.private_key
    # listen port 0 = "any port": never fight the port the device picked
    port_same = desired.listen_port in (0, live.listen_port)
    listen_port = None if port_same else desired.listen_port
    fwmark = None if desired.fwmark == live.fwmark else desired.fwmark
    return DeviceUpdate(
        private_key=private_key,
        listen_port=listen_port,
        fwmark=fwmark,
        peers=_peer_updates(desired, live, last_applied, only),
    )


def _peer_updates(
    desired: DesiredDevice,
    live: LiveDevice,
    last_applied: DesiredDevice | None,
    only: Collection[str] | None,
) -> tuple[PeerUpdate, ...]:
    if only is None:
        gone, wanted = live.peers.keys() - desired.peers.keys(), sorted(desired.peers)
    else:
        gone = {k for k in only if k in live.peers and k not in desired.peers}
        wanted = sorted(k for k in only if k in desired.peers)
    removals = [PeerUpdate(k, remove=True) for k in sorted(gone)]
    changes: list[PeerUpdate] = []
    for key in wanted:
        want = desired.peers[key]
        have = live.peers.get(key)
        if have is None:
            changes.append(_new_peer(want))
            continue
        before = None if last_applied is None else last_applied.peers.get(key)
        change = _peer_change(want, have, before)
        if change is not None:
            changes.append(change)
    # Additions and changes before removals: a peer taking over addresses (a rotated
    # key, a reused address) owns them before the old peer goes, so no packet meets
    # an address without a peer (WireGuard moves an allowed IP to its newest owner).
    return tuple(changes + removals)


def _new_peer(want: DesiredPeer) -> PeerUpdate:
    return PeerUpdate(
        public_key=want.public_key,
        allowed_ips=want.allowed_ips,
        endpoint=want.endpoint,
        keepalive=want.keepalive or None,
    )


def _peer_change(
    want: DesiredPeer, have: LivePeer, before: DesiredPeer | None
) -> PeerUpdate | None:
    allowed = None if want.allowed_ips == have.allowed_ips else want.allowed_ips
    keepalive = None if want.keepalive == have.keepalive else want.keepalive
    endpoint = want.endpoint if _endpoint_needed(want, have, before) else None
    if allowed is None and keepalive is None and endpoint is None:
        return None
    return PeerUpdate(
        public_key=want.public_key,
        update_only=True,
        allowed_ips=allowed,
        endpoint=endpoint,
        keepalive=keepalive,
    )


def _endpoint_needed(want: DesiredPeer, have: LivePeer, before: DesiredPeer | None) -> bool:
    if want.endpoint is None or want.endpoint == have.endpoint:
        return False
    if have.endpoint is None:
        return True
    if before is None:
        return True
    return before.endpoint != want.endpoint
