"""Make-before-break rotation of the agent's WireGuard key.

The flow (see docs/operations.md, "Device lifecycle: expiry, rotation, revocation, audit"):

1. The agent generates its next key on the host (``private.key.next``, 0600,
   written atomically next to ``private.key``; never sent, printed or logged)
   and calls ``POST /api/v1/devices/self/rotate {"public_key": NEXT}`` with its
   device token: at 2/3 of the key's lifetime, or when asked (``wiregate
   rotate`` sends SIGUSR1).
2. The gateway records the key and publishes ONE map version: every peer's
   entry for this device carries the new key with the same allowed IPs, and
   this device's ``self`` carries it too ("switch now"; ``previous_public_key``
   names the key it replaces).
3. This agent sets the new private key in the apply of that version
   (:meth:`KeyRotator.before_apply`), then makes ``private.key.next`` the
   ``private.key`` (``os.replace``). Peers replace the peer (WireGuard
   identifies a peer by its public key, and allowed IPs cannot be on two peers
   of one interface, so the old peer goes and the new one takes its addresses
   in one write) :data:`ROTATION_GRACE` after receiving the version, so that
   the rotating device has switched first: make before break. In between, the
   rotating device still *accepts* the old session (changing the private key
   only stops WireGuard sending on it) and queues what it sends while its
   handshake waits for the peers.
4. Both sides then *nudge* the peers whose key changed: one small UDP datagram
   to the peer's tunnel address makes WireGuard start a handshake at once.
   Whichever side applied the version last completes it on the first try
   (the other side already knows the new key), so nobody waits for WireGuard's
   5 s handshake retry. While the handshake runs, WireGuard queues outgoing
   packets instead of dropping them, and packets still in flight on the old
   session are accepted by the rotating side (changing the private key only
   stops *sending* on the old session): the old key stays accepted until every
   peer has switched.

The switch is idempotent and crash-safe: a restarted agent holding
``private.key.next`` whose public key the map names switches on its first
apply; a pending next key is re-sent if the rotation call failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from agent.gateway_client import connector
from agent.keyfile import KEY_FILE, NEXT_KEY_FILE, load_or_create_key
from wiregate.clock import Clock
from wiregate.errors import Unavailable, from_api_response
from wiregate.files import fsync_dir
from wiregate.keylife import rotate_after
from wiregate.keys import encode_key, fingerprint, public_from_private
from wiregate.logging import get_logger
from wiregate.model import NetMap, Peer

__all__ = ["NEXT_KEY_FILE", "NUDGE_PORT", "ROTATION_GRACE", "KeyRotator", "nudge"]

NUDGE_PORT = 9  # discard: the datagram only has to make WireGuard shake hands
ROTATION_GRACE = 0.25  # s a peer waits before replacing a rotated key (WireGuard queues more)
ROTATE_PATH = "/api/v1/devices/self/rotate"
log = get_logger("agent.rotation")


class _Agent(Protocol):
    """What the rotator needs from :class:`agent.daemon.Agent`."""

    settings: Any
    enrollment: Any
    session: Any
    public_key: str
    dataplane: Any

    def gateway_url(self) -> str: ...


class KeyRotator:
    """Rotates one agent's key: when due, when asked, and switches when the map says."""

    def __init__(self, agent: _Agent, *, clock: Clock = time.time) -> None:
        self._agent = agent
        self._clock = clock
        self._asked = asyncio.Event()
        self._switching: str | None = None  # the public key set by before_apply
        self._peer_keys: dict[str, str] = {}
        self._unknown_key_logged = ""
        self.last_rotation: float | None = None
        self.last_error = ""

    # -- paths -----------------------------------------------------------------

    @property
    def _state_dir(self) -> Path:
        return Path(self._agent.settings.state_dir)

    def _next_path(self) -> Path:
        return self._state_dir / NEXT_KEY_FILE

    def _next_key(self) -> bytes | None:
        """The pending next private key, if one was generated."""
        if not self._next_path().exists():
            return None
        return load_or_create_key(self._state_dir, NEXT_KEY_FILE)

    # -- when ------------------------------------------------------------------

    def request(self) -> None:
        """Rotate as soon as possible (SIGUSR1, ``wiregate rotate``)."""
        self._asked.set()

    def due_at(self) -> float | None:
        """When the current key should be rotated (2/3 of its lifetime), if it expires."""
        netmap: NetMap | None = self._agent.session.netmap
        expires = None if netmap is None else netmap.self_view.expires_at
        if expires is None:
            return None
        issued = (self._state_dir / KEY_FILE).stat().st_mtime  # written when it took effect
        return rotate_after(min(issued, expires), expires)

    async def run(self) -> None:
        """Rotate when due or asked; SIGUSR1 asks."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGUSR1, self.request)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._asked.wait(), self._agent.settings.rotation_check_interval
                    )
                due = self.due_at()
                if self._asked.is_set() or (due is not None and self._clock() >= due):
                    self._asked.clear()
                    await self._rotate_logged()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGUSR1)

    async def _rotate_logged(self) -> None:
        try:
            await self.rotate()
            self.last_error = ""
        except (Unavailable, OSError, aiohttp.ClientError) as exc:
            self.last_error = str(exc)
            log.warning("key rotation failed; will retry", error=self.last_error)
        except Exception as exc:  # a refusal (409...): reported, retried when due or asked
            self.last_error = str(exc)
            log.warning("key rotation refused", error=self.last_error)

    # -- rotating ----------------------------------------------------------------

    async def rotate(self) -> str:
        """Generate (or reuse) the next key and register it; its public key.

        The switch itself happens when the map carrying the key arrives.
        """
        enrollment = self._agent.enrollment
        if enrollment is None:
            raise Unavailable("not enrolled yet")
        private = load_or_create_key(self._state_dir, NEXT_KEY_FILE)
        public = encode_key(public_from_private(private))
        url = self._agent.gateway_url() + ROTATE_PATH
        headers = {"Authorization": f"Bearer {enrollment.token}"}
        timeout = aiohttp.ClientTimeout(total=15)
        settings = self._agent.settings
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=connector(settings.ca_file)) as http,
            http.post(url, json={"public_key": public}, headers=headers) as resp,
        ):
            body = await resp.json(content_type=None)
            if resp.status >= 400 and not self._already_registered(resp.status, body, public):
                raise from_api_response(resp.status, body)
        log.info("key rotation registered", next_fingerprint=fingerprint(public))
        return public

    def _already_registered(self, status: int, body: Any, public: str) -> bool:
        """A 409 for our own next key: an earlier call went through."""
        code = body.get("error") if isinstance(body, dict) else None
        netmap: NetMap | None = self._agent.session.netmap
        named = netmap is not None and netmap.self_view.public_key == public
        return status == 409 and code == "duplicate_public_key" and named

    # -- switching (called by the daemon around each apply, under its apply lock) --

    async def before_apply(self, netmap: NetMap) -> None:
        """Before an apply: if the map names our next key, give it to the data plane;
        if it rotates a peer's key, first give that peer :data:`ROTATION_GRACE` to switch."""
        known = self._peer_keys
        if any(known.get(i, p.public_key) != p.public_key for i, p in netmap.peers.items()):
            await asyncio.sleep(ROTATION_GRACE)
        wanted = netmap.self_view.public_key
        if wanted == self._agent.public_key or self._agent.dataplane is None:
            return
        private = self._next_key()
        if private is None or encode_key(public_from_private(private)) != wanted:
            if self._unknown_key_logged != wanted:
                self._unknown_key_logged = wanted
                log.warning("the map names a key this agent does not hold; not switching",
                            fingerprint=fingerprint(wanted))  # fmt: skip
            return
        self._agent.dataplane.set_private_key(private)
        self._switching = wanted

    async def after_apply(self, netmap: NetMap) -> None:
        """Commit a switch (the next key becomes ``private.key``) and nudge changed peers."""
        peers = list(netmap.peers.values())
        if self._switching is not None:
            old = self._agent.public_key
            os.replace(self._next_path(), self._state_dir / KEY_FILE)
            fsync_dir(self._state_dir)
            self._agent.public_key, self._switching = self._switching, None
            self.last_rotation = self._clock()
            log.info("key switched", previous=fingerprint(old),
                     current=fingerprint(self._agent.public_key))  # fmt: skip
            targets = peers
        else:
            known = self._peer_keys
            targets = [p for p in peers if known.get(p.id, p.public_key) != p.public_key]
        self._peer_keys = {p.id: p.public_key for p in peers}
        if targets:
            await asyncio.to_thread(nudge, targets)


def nudge(peers: Iterable[Peer]) -> int:
    """Send one tiny UDP datagram to each peer's tunnel IPv4 address; how many went out.

    The datagram is routed into the WireGuard interface, which starts a
    handshake with the peer's (new) key at once. Nothing needs to listen.
    """
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for peer in peers:
            address = next((a.split("/")[0] for a in peer.addresses if ":" not in a), None)
            if address is None:
                continue
            with contextlib.suppress(OSError):
                sock.sendto(b"\x00", (address, NUDGE_PORT))
                sent += 1
    return sent
