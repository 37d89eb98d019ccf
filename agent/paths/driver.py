"""Driving one :class:`~agent.paths.machine.PathMachine` per peer from the agent.

:class:`PathBook` is the pure part: it keeps a machine per peer of the map,
turns the map, netcheck reports, WireGuard's handshake read-back, relay
outcomes and the clock into machine events, and remembers the endpoint each
machine chose. :meth:`PathBook.shape` rewrites a map so that each peer carries
the endpoint its machine chose (the data plane then writes only what changed).

:class:`PathRunner` is the asyncio half: it polls the device for handshakes
(every second while some peer is being probed, every five otherwise), delivers
ticks, and runs one relay session per peer that needs a relay: a ticket from
the gateway, the binding at the relay (:func:`~agent.paths.relaylink.bind_at_relay`),
then a liveness probe of the relay every ``ping_interval`` and a fresh binding
every ``rebind_interval`` (which also repairs a changed NAT mapping), sooner while
the peer has not bound yet (see :meth:`PathRunner._next_rebind`). A relay
that stops answering is reported as failed and avoided on the next request, so
the gateway moves the pair to another relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agent.dataplane.desired import check_endpoint
from agent.dataplane.facade import PeerStatus
from agent.discovery.netcheck import NatType
from agent.paths.machine import (
    Action,
    Event,
    Handshake,
    LocalNat,
    PathMachine,
    PathReport,
    PathState,
    PathTimers,
    PeerUpdate,
    Predict,
    RelayFailed,
    RelayReady,
    ReleaseRelay,
    RequestRelay,
    SetEndpoint,
    Tick,
)
from agent.paths.predict import PredictionPlan
from agent.paths.relaylink import Addr, RelayBinding
from wiregate.clock import Clock
from wiregate.errors import WiregateError
from wiregate.logging import get_logger
from wiregate.model import NetMap, Peer

__all__ = ["PathBook", "PathRunner", "RelayHooks"]

log = get_logger("agent.paths")

_DIRECT_PROBES = frozenset({PathState.PROBING_DIRECT, PathState.RETRY_DIRECT})
_PROBING = _DIRECT_PROBES | {PathState.RELAY_PENDING}


class PathBook:
    """The path machines of every peer, and the endpoints they chose (pure)."""

    def __init__(self, timers: PathTimers | None = None) -> None:
        self.timers = timers or PathTimers()
        self.machines: dict[str, PathMachine] = {}
        self.chosen: dict[str, str] = {}  # peer id -> endpoint its machine set
        self.relays: dict[str, str] = {}  # peer id -> relay id while bound there
        self._keys: dict[str, str] = {}  # public key -> peer id
        self._endpoints: dict[str, tuple[tuple[str, ...], str | None]] = {}
        self._local: LocalNat | None = None
        self.resetting: set[str] = set()  # peers left out of the next write (see needs_reset)

    def update_map(self, netmap: NetMap, now: float) -> list[Action]:
        """New peers get a machine, gone peers lose theirs, changed endpoints are told."""
        out: list[Action] = []
        for peer_id in [p for p in self.machines if p not in netmap.peers]:
            out += self._forget(peer_id)
        self._keys = {p.public_key: p.id for p in netmap.peers.values()}
        for peer in netmap.peers.values():
            seen = (_valid_endpoints(peer), peer.nat)
            if peer.id in self.machines and self._endpoints.get(peer.id) == seen:
                continue
            self._endpoints[peer.id] = seen
            endpoints = seen[0]
            machine = self.machines.get(peer.id)
            if machine is None:
                leads = netmap.self_view.id < peer.id
                machine = PathMachine(peer.id, self.timers, leads=leads)
                self.machines[peer.id] = machine
                if self._local is not None:
                    out += self._feed(machine, self._local)
            out += self._feed(machine, PeerUpdate(now, endpoints, nat=_nat(peer.nat)))
        return out

    def local_reflexive(self) -> str | None:
        """The reflexive endpoint of the last netcheck (None before one)."""
        return None if self._local is None else self._local.reflexive

    def local_nat(self, event: LocalNat) -> list[Action]:
        """A new netcheck report, for every machine."""
        self._local = event
        return [a for m in self.machines.values() for a in self._feed(m, event)]

    def handshakes(self, live: Iterable[PeerStatus], now: float) -> list[Action]:
        """WireGuard's read-back: each peer's latest handshake and live endpoint."""
        out: list[Action] = []
        for status in live:
            peer_id = self._keys.get(status.public_key)
            machine = self.machines.get(peer_id) if peer_id else None
            if machine is not None:
                event = Handshake(now, status.last_handshake, status.endpoint)
                out += self._feed(machine, event)
        return out

    def before_reset(self, live: Iterable[PeerStatus], now: float) -> list[Action]:
        """A read of the device taken just before the peers in :attr:`resetting` are
        reset: a machine whose peer set up a session since the previous read takes it
        (see :meth:`PathMachine._fresh_session`) and is left out of the reset."""
        out: list[Action] = []
        for status in live:
            peer_id = self._keys.get(status.public_key)
            machine = self.machines.get(peer_id) if peer_id in self.resetting else None
            if machine is not None:
                event = Handshake(now, status.last_handshake, status.endpoint, before_write=True)
                out += self._feed(machine, event)
        kept = {p for p in self.resetting if not self.machines[p].wants_fresh_handshake()}
        for peer_id in sorted(kept):
            log.info("reset skipped: the peer set up a session since the last read", peer=peer_id)
        self.resetting -= kept
        return out

    def relay_ready(self, peer_id: str, binding: RelayBinding, now: float) -> list[Action]:
        """The relay session for ``peer_id`` is bound."""
        machine = self.machines.get(peer_id)
        if machine is None:
            return [ReleaseRelay(peer_id)]
        self.relays[peer_id] = binding.relay_id
        return self._feed(machine, RelayReady(now, binding.endpoint, binding.via_tcp))

    def relay_failed(self, peer_id: str, reason: str, now: float) -> list[Action]:
        """The relay session for ``peer_id`` failed or its relay stopped answering."""
        self.relays.pop(peer_id, None)
        machine = self.machines.get(peer_id)
        return [] if machine is None else self._feed(machine, RelayFailed(now, reason))

    def tick(self, now: float) -> list[Action]:
        """Deliver the timers that are due."""
        out: list[Action] = []
        for machine in self.machines.values():
            deadline = machine.next_deadline()
            if deadline is not None and deadline <= now:
                out += self._feed(machine, Tick(now))
        return out

    def next_deadline(self) -> float | None:
        deadlines = [d for m in self.machines.values() if (d := m.next_deadline()) is not None]
        return min(deadlines, default=None)

    def probing(self) -> bool:
        """Whether some peer's path is being decided (poll the device more often)."""
        return any(m.state in _PROBING for m in self.machines.values())

    def needs_reset(self, action: SetEndpoint) -> bool:
        """Whether ``action``'s endpoint needs a fresh WireGuard session.

        A handshake is the proof that a direct candidate works, and WireGuard only
        shakes hands when it has no session (or an old one), and retries a pending
        handshake only every 5 s, towards whatever endpoint is set by then. So for
        each probe (and each kick of a probe, see PathTimers.kick) the peer is removed
        and re-added, which makes WireGuard shake hands at once (persistent keepalive)
        towards the endpoint being probed; likewise when the relay's endpoint (UDP or
        TCP) is set, and at its kicks until a handshake goes through it. Not for a
        private address on a network of neither side: the reset would only destroy
        the session the peer may be setting up from its side (see
        PathMachine.wants_fresh_handshake)."""
        machine = self.machines.get(action.peer_id)
        return machine is not None and machine.wants_fresh_handshake()

    def shape(self, netmap: NetMap) -> NetMap:
        """``netmap`` with each peer's endpoint set to the one its machine chose
        (and the peers being reset left out)."""
        if not self.chosen and not self.resetting:
            return netmap
        peers = {
            pid: replace(p, endpoints=(self.chosen[pid],)) if pid in self.chosen else p
            for pid, p in netmap.peers.items()
            if pid not in self.resetting
        }
        return replace(netmap, peers=peers)

    def report(self, peer_id: str) -> dict[str, Any] | None:
        """The path to ``peer_id`` and why, for ``wiregate status``."""
        machine = self.machines.get(peer_id)
        if machine is None:
            return None
        report: PathReport = machine.explain()
        return {
            "path": report.path,
            "state": report.state,
            "endpoint": report.endpoint,
            "since": report.since,
            "reason": report.reason,
            "relay": self.relays.get(peer_id) if report.path == "relayed" else None,
        }

    def _feed(self, machine: PathMachine, event: Event) -> list[Action]:
        before = machine.state
        actions = machine.handle(event)
        for action in actions:
            if isinstance(action, SetEndpoint):
                self.chosen[action.peer_id] = action.endpoint
        if machine.state is not before:
            report = machine.explain()
            log.info("path", peer=machine.peer_id, state=str(machine.state), why=report.reason)
        return actions

    def _forget(self, peer_id: str) -> list[Action]:
        machine = self.machines.pop(peer_id)
        self.chosen.pop(peer_id, None)
        self.relays.pop(peer_id, None)
        self._endpoints.pop(peer_id, None)
        return [ReleaseRelay(peer_id)] if machine.state is not PathState.IDLE else []


def _nat(text: str | None) -> NatType | None:
    """The peer's NAT type from the map (None when unknown or not one we know)."""
    try:
        return None if text is None else NatType(text)
    except ValueError:
        return None


def _valid_endpoints(peer: Peer) -> tuple[str, ...]:
    """The peer's endpoints the data plane would accept (see :func:`check_endpoint`)."""
    valid: list[str] = []
    for text in peer.endpoints:
        with contextlib.suppress(ValueError):
            valid.append(check_endpoint(text))
    return tuple(dict.fromkeys(valid))


@dataclass(slots=True)
class RelayHooks:
    """What a relay session needs from the agent (injected, so tests can fake the network).

    ``ticket(peer_id, avoid)`` asks the gateway; ``bind(grant)`` binds at the relay
    from the WireGuard port; ``probe(control)`` raises if the relay does not answer."""

    ticket: Callable[[str, Sequence[str]], Awaitable[Any]]
    bind: Callable[[Any], Awaitable[RelayBinding]]
    probe: Callable[[Addr], Awaitable[None]]
    # a binding over TLS/TCP (agent.paths.tcplink.TcpFallback): its session ended; and
    # whether the relay answers over UDP again (then the session ends: UDP is preferred)
    release: Callable[[RelayBinding], None] = lambda _binding: None
    udp_back: Callable[[RelayBinding], Awaitable[bool]] = lambda _binding: _false()
    ping_interval: float = 5.0
    misses: int = 2  # consecutive unanswered probes before the relay counts as dead
    rebind_interval: float = 60.0
    avoid_for: float = 120.0  # seconds a dead relay is avoided for a pair


@dataclass(slots=True)
class _Avoid:
    until: dict[str, float] = field(default_factory=dict)  # relay id -> until

    def add(self, relay_id: str, until: float) -> None:
        self.until[relay_id] = until

    def current(self, now: float) -> list[str]:
        return sorted(r for r, t in self.until.items() if t > now)


class PathRunner:
    """Runs a :class:`PathBook` against the device and the relays."""

    def __init__(
        self,
        book: PathBook,
        hooks: RelayHooks,
        read_status: Callable[[], Awaitable[Sequence[PeerStatus]]],
        reapply: Callable[[], Awaitable[None]],
        clock: Clock = time.time,
        predict: Callable[[PredictionPlan], Coroutine[Any, Any, int]] | None = None,
    ) -> None:
        """``predict`` sends a port prediction's probes from the WireGuard port and
        returns how many went out (None: this agent does not predict)."""
        self.book = book
        self._predict = predict
        self._predictions: dict[str, asyncio.Task[int]] = {}
        self.hooks = hooks
        self._read_status = read_status
        self._reapply = reapply
        self._clock = clock
        self._sessions: dict[str, asyncio.Task[None]] = {}
        self._avoid: dict[str, _Avoid] = {}
        self._bindings: dict[str, RelayBinding] = {}  # peer id -> its session's binding
        self._wake = asyncio.Event()
        self._generation = 0  # bumped when every relay binding must be renewed at once

    async def perform(self, actions: Sequence[Action], *, apply: bool = False) -> None:
        """Carry out what the machines asked for; re-apply the map if an endpoint moved
        (or ``apply``: the map itself changed)."""
        moved = self._dispatch(actions) or apply
        if self.book.resetting:
            moved = await self._before_reset() or moved
        if self.book.resetting:
            await self._reapply()
            self.book.resetting.clear()
        if moved:
            await self._reapply()
        self._wake.set()

    def _dispatch(self, actions: Sequence[Action]) -> bool:
        """Start or stop what ``actions`` ask for; whether an endpoint moved (peers
        whose new endpoint needs a fresh session go into ``book.resetting``)."""
        moved = False
        for action in actions:
            if isinstance(action, SetEndpoint):
                moved = True
                if self.book.needs_reset(action):
                    self.book.resetting.add(action.peer_id)
            elif isinstance(action, RequestRelay):
                self._start_session(action.peer_id)
            elif isinstance(action, ReleaseRelay):
                self._stop_session(action.peer_id)
            elif isinstance(action, Predict):
                self._start_prediction(action)
        return moved

    async def _before_reset(self) -> bool:
        """Read the device once more before a reset: the peer may have set up a session
        since the last read (its handshake and our reset cross), which the reset would
        throw away on this side only (see :meth:`PathBook.before_reset`). Whether an
        endpoint moved as a result."""
        try:
            live = await self._read_status()
        except (OSError, WiregateError) as exc:
            log.warning("cannot read the device before a reset", error=str(exc))
            return False
        return self._dispatch(self.book.before_reset(live, self._clock()))

    async def run(self) -> None:
        """Poll handshakes and deliver ticks until cancelled."""
        try:
            while True:
                now = self._clock()
                try:
                    live = await self._read_status()
                except (OSError, WiregateError) as exc:
                    log.warning("cannot read the device for handshakes", error=str(exc))
                    live = ()
                await self.perform(self.book.handshakes(live, now) + self.book.tick(now))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_delay(now))
        finally:
            for peer_id in list(self._sessions):
                self._stop_session(peer_id)

    def rebind_all(self) -> None:
        """This host's NAT mapping changed: every relay binding is renewed at its next
        liveness probe (the relays still know the old mapping)."""
        self._generation += 1

    def _poll_delay(self, now: float) -> float:
        delay = 1.0 if self.book.probing() else 5.0
        deadline = self.book.next_deadline()
        if deadline is not None:
            delay = min(delay, max(deadline - now, 0.05))
        return delay

    def _start_session(self, peer_id: str) -> None:
        self._stop_session(peer_id)
        self._sessions[peer_id] = asyncio.create_task(self._session(peer_id))

    def _start_prediction(self, action: Predict) -> None:
        """Send the prediction's probes in the background (one burst per peer at once)."""
        if self._predict is None:
            return
        old = self._predictions.pop(action.peer_id, None)
        if old is not None:
            old.cancel()
        task = asyncio.create_task(self._predict(action.plan))
        self._predictions[action.peer_id] = task
        task.add_done_callback(functools.partial(self._predicted, action.peer_id))

    def _predicted(self, peer_id: str, task: asyncio.Task[int]) -> None:
        if self._predictions.get(peer_id) is task:
            del self._predictions[peer_id]
        _prediction_done(peer_id, task)

    def _stop_session(self, peer_id: str) -> None:
        task = self._sessions.pop(peer_id, None)
        if task is not None:
            task.cancel()
        self._release(peer_id)

    def _release(self, peer_id: str) -> None:
        binding = self._bindings.pop(peer_id, None)
        if binding is not None:
            self.hooks.release(binding)

    async def _session(self, peer_id: str) -> None:
        """Bind at a relay for ``peer_id``, then keep the binding alive and checked."""
        hooks, avoid = self.hooks, self._avoid.setdefault(peer_id, _Avoid())
        try:
            binding = await self._bind(peer_id, avoid)
        except (OSError, WiregateError) as exc:
            await self._failed(peer_id, f"cannot bind at a relay: {_message(exc)}")
            return
        self._bindings[peer_id] = binding
        await self.perform(self.book.relay_ready(peer_id, binding, self._clock()))
        misses, waits = 0, 0
        rebind_at = self._next_rebind(binding, waits)
        generation = self._generation
        while True:
            await asyncio.sleep(hooks.ping_interval)
            try:
                await hooks.probe(binding.control)
                misses = 0
            except (OSError, WiregateError):
                misses += 1
            if misses >= hooks.misses:
                avoid.add(binding.relay_id, self._clock() + hooks.avoid_for)
                await self._failed(peer_id, f"relay {binding.relay_id} stopped answering")
                return
            if binding.via_tcp and await hooks.udp_back(binding):
                await self._failed(peer_id, f"relay {binding.relay_id} answers over UDP again")
                return
            if binding.via_tcp:  # nothing to renew: the relay sees the link's own address
                continue
            if self._clock() >= rebind_at or generation != self._generation:
                generation = self._generation
                fresh = await self._rebind(peer_id, avoid, binding)
                if fresh.endpoint != binding.endpoint:  # another relay, or it restarted
                    hooks.release(fresh)
                    await self._failed(peer_id, f"relay moved to {fresh.relay_id} {fresh.endpoint}")
                    return
                binding = self._bindings[peer_id] = fresh
                waits = 0 if binding.peer_bound else waits + 1
                rebind_at = self._next_rebind(binding, waits)

    def _next_rebind(self, binding: RelayBinding, waits: int) -> float:
        """When to bind again: after ``rebind_interval``; sooner while the peer has not
        bound yet (``ping_interval``, doubling), so the waiting side keeps its allocation
        alive (the relay expires one that forwards nothing) and follows a pair the
        gateway moved to another relay within seconds, not a minute."""
        hooks = self.hooks
        wait = hooks.rebind_interval
        if not binding.peer_bound:
            wait = min(wait, hooks.ping_interval * 2**waits)
        return self._clock() + wait

    async def _bind(self, peer_id: str, avoid: _Avoid) -> RelayBinding:
        grant = await self.hooks.ticket(peer_id, avoid.current(self._clock()))
        binding = await self.hooks.bind(grant)
        log.info("relay bound", peer=peer_id, relay=binding.relay_id, endpoint=binding.endpoint)
        return binding

    async def _rebind(self, peer_id: str, avoid: _Avoid, old: RelayBinding) -> RelayBinding:
        """A fresh binding (same relay while it lives): repairs a changed NAT mapping."""
        try:
            binding = await self._bind(peer_id, avoid)
        except (OSError, WiregateError) as exc:
            log.warning("relay rebind failed; keeping the binding", peer=peer_id, error=str(exc))
            return old
        return binding

    async def _failed(self, peer_id: str, reason: str) -> None:
        log.warning("relay path failed", peer=peer_id, reason=reason)
        self._sessions.pop(peer_id, None)
        self._release(peer_id)
        await self.perform(self.book.relay_failed(peer_id, reason, self._clock()))


async def _false() -> bool:
    return False


def _prediction_done(peer_id: str, task: asyncio.Task[int]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.warning("port prediction not sent", peer=peer_id, error=_message(exc))
    else:
        log.info("port prediction sent", peer=peer_id, probes=task.result())


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, WiregateError) else str(exc)
