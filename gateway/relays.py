"""The gateway's side of the WireGuard relay: its ticket signing key and its relays.

The Ed25519 signing key lives in ``state_dir/relay-signing.key`` (base64 of the
32-byte seed). It is created on first start, mode 0600, atomically: written to
a private temporary file and hard-linked into place, so two starting gateways
never see a half-written key and never overwrite each other's. It is never
logged and never served; only its public key is (``GET /api/v1/relay/signers``),
in the exact format of a relay's ``verify_keys_file``.

:class:`RelaySelector` (pure: every method takes ``now``) keeps what the
gateway knows of its relays and which relay each pair uses. The gateway PINGs
every relay periodically and reports each answer or miss; a relay is down
after ``down_after`` missed probes in a row and up again on its next answer
(never probed: down). A pair (unordered device ids) keeps its relay while that
relay is up and not avoided, so both sides get the same one; a new assignment
goes to the up relay with the lowest load (allocations over capacity, counting
the pairs assigned since its last answer), then the lowest RTT, then the id.
A device that asks to ``avoid`` a relay (it failed to bind or lost the path)
makes that relay suspect for the pair for ``suspect_for`` seconds: the other
side, asking afterwards without ``avoid``, is moved along with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from relay.client.probe import PingResult
from relay.endpoints import RelayEndpoint
from relay.tickets import Node, issue_pair
from wiregate.clock import Clock
from wiregate.errors import Unavailable, WiregateError
from wiregate.files import load_or_create_key_file
from wiregate.logging import get_logger
from wiregate.model import Device
from wiregate.settings import parse_relay_entry

__all__ = [
    "KEY_FILE",
    "TENANT",
    "NoRelayUp",
    "RelayMonitor",
    "RelaySelector",
    "RelaySigner",
    "RelayStatus",
    "load_or_create_signing_key",
    "pair_key",
    "parse_relay_tcp",
]

_log = get_logger("gateway.relays")

Probe = Callable[[tuple[str, int], float], Awaitable[PingResult]]

KEY_FILE = "relay-signing.key"
TENANT = "default"  # one tenant per gateway for now


class NoRelayUp(Unavailable):
    """No relay is up (or every relay that is up was avoided): no ticket can be issued."""

    code = "no_relay_up"


@dataclass(frozen=True, slots=True)
class RelayStatus:
    """What the gateway knows of one relay (``rtt`` in seconds, None before any answer;
    ``answered_at``: POSIX seconds of its last answer)."""

    relay: RelayEndpoint
    up: bool
    rtt: float | None
    allocations: int
    capacity: int
    error: str | None
    answered_at: float | None = None

    @property
    def load(self) -> float | None:
        """Allocations over capacity as last reported; None before any answer."""
        if self.rtt is None:
            return None
        return self.allocations / self.capacity if self.capacity > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``GET /api/v1/relays``."""
        return {
            "id": self.relay.id,
            "control": self.relay.control,
            "up": self.up,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "allocations": self.allocations,
            "capacity": self.capacity,
            "load": self.load,
            "error": self.error,
        }


@dataclass(slots=True)
class _Health:
    up: bool = False
    misses: int = 0
    rtt: float | None = None
    allocations: int = 0
    capacity: int = 0
    pending: int = 0  # pairs assigned since the last answer
    error: str | None = "not probed yet"
    answered_at: float | None = None


@dataclass(slots=True)
class _Assignment:
    relay_id: str
    used_at: float
    suspects: dict[str, float] = field(default_factory=dict)  # relay id -> until


def pair_key(a: str, b: str) -> tuple[str, str]:
    """The unordered pair of device ids, in a canonical order."""
    return (a, b) if a <= b else (b, a)


class RelaySelector:
    """Relay health from probes, and the sticky relay of each pair."""

    def __init__(
        self,
        relays: Sequence[RelayEndpoint],
        *,
        tcp: Mapping[str, str] | None = None,
        down_after: int = 2,
        suspect_for: float = 120.0,
        forget_after: float = 3600.0,
    ) -> None:
        self.relays = tuple(relays)
        self.tcp = dict(tcp or {})  # relay id -> "HOST:PORT" of its TLS/TCP listener
        self._by_id = {r.id: r for r in self.relays}
        self._health = {r.id: _Health() for r in self.relays}
        self._pairs: dict[tuple[str, str], _Assignment] = {}
        self._down_after, self._suspect_for = down_after, suspect_for
        self._forget_after = forget_after

    def ticket_relay(self, relay: RelayEndpoint) -> dict[str, str]:
        """The ``relay`` object of a ticket answer: id, control port and, if the relay has
        one, its TLS/TCP address (agents that predate it ignore the field)."""
        doc = {"id": relay.id, "control": relay.control}
        if relay.id in self.tcp:
            doc["tcp"] = self.tcp[relay.id]
        return doc

    # --- probes ---------------------------------------------------------------------------

    def answered(
        self, relay_id: str, rtt: float, allocations: int, capacity: int, at: float | None = None
    ) -> None:
        """A PONG (received at ``at``, POSIX seconds): the relay is up, with these figures."""
        self._health[relay_id] = _Health(True, 0, rtt, allocations, capacity, 0, None, at)

    def missed(self, relay_id: str, error: str) -> None:
        """A probe without answer; the relay is down after ``down_after`` in a row."""
        health = self._health[relay_id]
        health.misses += 1
        health.error = error
        if health.misses >= self._down_after:
            health.up = False

    def is_up(self, relay_id: str) -> bool:
        """Whether the relay answers its probes."""
        return self._health[relay_id].up

    def status(self) -> list[RelayStatus]:
        """Every relay, in configuration order."""
        return [self._status(r) for r in self.relays]

    def _status(self, relay: RelayEndpoint) -> RelayStatus:
        h = self._health[relay.id]
        return RelayStatus(relay, h.up, h.rtt, h.allocations, h.capacity, h.error, h.answered_at)

    # --- assignment -----------------------------------------------------------------------

    def choose(self, a: str, b: str, avoid: Collection[str], now: float) -> RelayEndpoint:
        """The relay for the pair ``a``-``b``; raises :class:`NoRelayUp`."""
        key = pair_key(a, b)
        current = self._pairs.get(key)
        if current is None:
            current = self._pairs[key] = _Assignment("", now)
        current.used_at = now
        for relay_id in avoid:
            if relay_id in self._by_id:
                current.suspects[relay_id] = now + self._suspect_for
        current.suspects = {r: until for r, until in current.suspects.items() if until > now}
        if self._usable(current.relay_id, current.suspects):
            return self._by_id[current.relay_id]
        candidates = [r for r in self._by_id if self._usable(r, current.suspects)]
        if not candidates:
            del self._pairs[key]
            raise self._none_up()
        current.relay_id = min(candidates, key=self._rank)
        self._health[current.relay_id].pending += 1
        return self._by_id[current.relay_id]

    def _usable(self, relay_id: str, suspects: dict[str, float]) -> bool:
        health = self._health.get(relay_id)
        return health is not None and health.up and relay_id not in suspects

    def _rank(self, relay_id: str) -> tuple[float, float, str]:
        h = self._health[relay_id]
        load = (h.allocations + h.pending) / h.capacity if h.capacity > 0 else float("inf")
        return load, h.rtt if h.rtt is not None else float("inf"), relay_id

    def _none_up(self) -> NoRelayUp:
        if not self.relays:
            return NoRelayUp("no relay is configured", hint="set relays in [gateway]")
        up = [r for r, h in self._health.items() if h.up]
        if up:
            return NoRelayUp(
                f"every relay that is up is avoided for this pair: {', '.join(sorted(up))}",
                hint="retry in a while; the avoided relays are suspect for "
                f"{self._suspect_for:.0f} s",
            )
        return NoRelayUp(
            "no relay answers the gateway's probes",
            hint="check that the relays run and that the gateway reaches their control ports "
            "(GET /api/v1/relays)",
        )

    def adopt(self, a: str, b: str, relay_id: str, now: float) -> None:
        """Make ``relay_id`` the pair's relay (another replica chose it), keeping what this
        replica suspects of the others; an unknown relay id is ignored."""
        if relay_id not in self._by_id:
            return
        key = pair_key(a, b)
        current = self._pairs.get(key)
        if current is None:
            self._pairs[key] = _Assignment(relay_id, now)
        else:
            current.relay_id = relay_id

    def forget_idle(self, now: float) -> int:
        """Drop pair assignments unused for ``forget_after`` seconds; how many."""
        idle = [k for k, a in self._pairs.items() if now - a.used_at >= self._forget_after]
        for key in idle:
            del self._pairs[key]
        return len(idle)

    def assignment(self, a: str, b: str) -> str | None:
        """The relay id the pair currently uses, if any."""
        current = self._pairs.get(pair_key(a, b))
        return current.relay_id if current is not None and current.relay_id else None


class RelayMonitor:
    """PINGs every relay each ``interval`` seconds and reports to a :class:`RelaySelector`.

    ``probe`` is :func:`relay.client.probe.ping_relay` (a fake in tests); each probe
    waits at most ``min(2, interval / 2)`` seconds. ``first_round`` is set once
    every relay was probed once, so that requests arriving just after start
    wait for it rather than find every relay down. ``wall`` stamps each answer (the
    console shows when a relay last answered).
    """

    def __init__(
        self,
        selector: RelaySelector,
        probe: Probe,
        interval: float,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self._selector, self._probe, self._interval, self._clock = selector, probe, interval, clock
        self._wall = wall
        self.timeout = min(2.0, interval / 2)
        self.first_round = asyncio.Event()

    async def run(self) -> None:
        """Probe rounds until cancelled."""
        while True:
            started = self._clock()
            await self.probe_all()
            self._selector.forget_idle(self._clock())
            await asyncio.sleep(max(0.0, self._interval - (self._clock() - started)))

    async def probe_all(self) -> None:
        """One round: every relay at once."""
        await asyncio.gather(*(self._probe_one(r) for r in self._selector.relays))
        self.first_round.set()

    async def _probe_one(self, relay: RelayEndpoint) -> None:
        was_up = self._selector.is_up(relay.id)
        try:
            result = await self._probe((relay.host, relay.port), self.timeout)
        except (WiregateError, OSError) as exc:
            self._selector.missed(relay.id, str(exc) or exc.__class__.__name__)
        except Exception as exc:  # a bug must not stop the probes of every relay
            _log.exception("relay_probe_failed", relay=relay.id)
            self._selector.missed(relay.id, f"probe failed: {exc.__class__.__name__}")
        else:
            figures = (result.rtt, result.allocations, result.capacity)
            self._selector.answered(relay.id, *figures, at=self._wall())
        if self._selector.is_up(relay.id) != was_up:
            up = not was_up
            _log.info("relay_up" if up else "relay_down", relay=relay.id, control=relay.control)

    async def wait_first_round(self) -> None:
        """Return once the first round is done, or after one probe timeout."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.first_round.wait(), self.timeout + 0.5)


class RelaySigner:
    """Signs relay tickets; ``repr`` and the API never show the private key."""

    def __init__(self, signing_key: SigningKey, tenant: str = TENANT) -> None:
        self._key, self.tenant = signing_key, tenant

    def __repr__(self) -> str:
        return f"RelaySigner(public_key={self.public_key!r})"

    @property
    def public_key(self) -> str:
        """The verify key, base64."""
        return base64.b64encode(bytes(self._key.verify_key)).decode()

    def signers_document(self) -> dict[str, Any]:
        """What a relay's ``verify_keys_file`` holds to trust this gateway."""
        return {"signers": [{"public_key": self.public_key, "tenants": [self.tenant]}]}

    def ticket_for(
        self, relay: RelayEndpoint, caller: Device, peer: Device, now: float | None = None
    ) -> bytes:
        """A signed ticket admitting ``caller`` (node A) to relay ``caller``-``peer``."""
        own, _ = issue_pair(
            self._key,
            relay_id=relay.id,
            tenant=self.tenant,
            node_a=Node(caller.id, caller.public_key),
            node_b=Node(peer.id, peer.public_key),
            now=time.time() if now is None else now,
        )
        return own


def load_or_create_signing_key(state_dir: Path) -> SigningKey:
    """The key in ``state_dir/relay-signing.key``: a 32-byte seed, created (0600) on first use."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return SigningKey(load_or_create_key_file(state_dir / KEY_FILE, "relay signing key"))


def parse_relay_tcp(entries: Sequence[str]) -> dict[str, str]:
    """``["id=HOST:PORT", ...]`` (``relay_tcp``) to relay id -> ``HOST:PORT``."""
    out: dict[str, str] = {}
    for entry in entries:
        relay_id, host, port = parse_relay_entry(entry)
        out[relay_id] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return out
