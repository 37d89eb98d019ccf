"""Per-peer path choice: direct first, relay when it must (sans-IO).

One :class:`PathMachine` per peer. It owns no socket, task or clock: the caller
feeds it events carrying ``now`` (POSIX seconds, the clock WireGuard's
latest-handshake uses) and performs the actions it returns.

States (:class:`PathState`)::

    idle ──peer──> probing_direct ──handshake──> direct ──tick (silent 180 s)──┐
      │                │ tick: next candidate; none left ──┐      ^            │
      └─ pointless ────┴───────────────────────────> relay_pending <───────────┘
                                   relay_ready │   │ relay_failed / timeout
                                               v   v
             retry_direct <──tick (backoff)── relayed    failed ──tick (backoff)──> (decide)
                 │ handshake ──> direct (release the relay)
                 └ tick ──> relayed (backoff doubles: 30 s -> 4 min, on a wall-clock grid)

``relayed_tcp`` is ``relayed`` with the binding carried over TLS/TCP 443
(:class:`RelayReady` ``via_tcp``: UDP to the relay is blocked here); it has the same
rows. The runner moves it back to UDP when the relay answers over UDP again, and
direct is retried from it as from ``relayed`` (when netcheck finds UDP again).

Every transition is a row of :data:`TRANSITIONS`: ``(state, event kind)`` -> a
:class:`Rule` naming the handler and the states it may lead to; :meth:`handle`
refuses any other outcome, and the table covers every (state, kind) pair.

Direct is skipped up front when pointless (either side ``udp-blocked``, or both
``symmetric`` with no shared local network), and a probe ends at once when a NAT
type learnt meanwhile (ours from netcheck, the peer's from the map) makes it so.
Setting the relay's endpoint (UDP or TCP) restarts WireGuard's handshake there
with the probes' kicks, until a handshake goes through it or ``probe_timeout``
has passed. A handshake counts as evidence for
a direct candidate only if it is newer than the moment that endpoint was set
and, when the device reports it, the peer's live endpoint is still that one (an
authenticated packet from the relay would make WireGuard roam to it). A live
session that WireGuard roamed to another address of the peer (not a relay's,
read back after our last endpoint write) is evidence too, in every state: the
path becomes direct there, and a direct path follows such roaming instead of
fighting it. A read taken just before a reset (``Handshake(before_write=True)``)
counts only a session that came up since the previous read (see
:meth:`PathMachine._fresh_session`): the reset would throw it away on this side
while the peer's side stays fine. A probe restarts WireGuard's handshake every ``kick`` seconds;
candidates that cannot be reached from here (see
:func:`~agent.paths.vocabulary.worth_kicking`) get neither kicks, session resets
nor retries: the peer reaches us if it can. Towards a symmetric-NAT peer, an
endpoint-independent side predicts ports (:mod:`agent.paths.predict`, action
:class:`Predict`) when it first probes, when the peer's candidates change and on
the retry grid.

How :class:`agent.paths.driver.PathDriver` drives one machine per peer::

    machine = PathMachine(peer.id)              # one per peer of the map
    machine.handle(LocalNat.from_report(report, networks))   # after each netcheck
    machine.handle(PeerUpdate(now, peer.endpoints, nat=None))  # map upsert
    machine.handle(Handshake(now, live.last_handshake, live.endpoint))  # each poll
    machine.handle(RelayReady(now, "relay_ip:port")) / RelayFailed(now, why)
    machine.handle(Tick(now)) when now >= machine.next_deadline()
    for action in returned: SetEndpoint -> desired peer endpoint (reconciler);
        RequestRelay -> POST /api/v1/relay/tickets + relay_client allocate/bind;
        ReleaseRelay -> cancel that / drop the allocation.
    machine.explain() -> PathReport for ``wiregate status`` and the admin page.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from agent.discovery.netcheck import NatType
from agent.paths.predict import plan_prediction, prediction_applies
from agent.paths.vocabulary import (
    REFLEXIVE,
    Action,
    Event,
    Handshake,
    LocalNat,
    PathKind,
    PathReport,
    PathTimers,
    PeerUpdate,
    Predict,
    Ranked,
    RelayFailed,
    RelayReady,
    ReleaseRelay,
    RequestRelay,
    SetEndpoint,
    Tick,
    blocker,
    direct_reason,
    rank_candidates,
    relay_reason,
    sendable,
    worth_kicking,
)

__all__ = [
    "TRANSITIONS",
    "Action",
    "Event",
    "Handshake",
    "LocalNat",
    "PathMachine",
    "PathReport",
    "PathState",
    "PathTimers",
    "PeerUpdate",
    "Predict",
    "RelayFailed",
    "RelayReady",
    "ReleaseRelay",
    "RequestRelay",
    "Rule",
    "SetEndpoint",
    "Tick",
]


class PathState(StrEnum):
    """Where the path to one peer stands (see the module docstring)."""

    IDLE = "idle"
    PROBING_DIRECT = "probing_direct"
    DIRECT = "direct"
    RELAY_PENDING = "relay_pending"
    RELAYED = "relayed"
    RELAYED_TCP = "relayed_tcp"  # relayed, carried over TLS/TCP: UDP blocked here
    RETRY_DIRECT = "retry_direct"
    FAILED = "failed"


_PATHS: dict[PathState, PathKind] = {
    PathState.IDLE: "probing",
    PathState.PROBING_DIRECT: "probing",
    PathState.DIRECT: "direct",
    PathState.RELAY_PENDING: "probing",
    PathState.RELAYED: "relayed",
    PathState.RELAYED_TCP: "relayed",
    PathState.RETRY_DIRECT: "probing",
    PathState.FAILED: "failed",
}
_RELAYED = frozenset({PathState.RELAYED, PathState.RELAYED_TCP})
_PROBES = frozenset({PathState.PROBING_DIRECT, PathState.RETRY_DIRECT})
_KICKED = _PROBES | _RELAYED  # states whose endpoint may be kicked (see _kick)
_UNDECIDED = frozenset(set(PathState) - {PathState.IDLE, PathState.DIRECT})


class PathMachine:
    """The path state of one peer; see the module docstring for how to drive it."""

    def __init__(
        self, peer_id: str, timers: PathTimers | None = None, *, leads: bool = True
    ) -> None:
        self.peer_id = peer_id
        self.timers = timers or PathTimers()
        # which side of the pair this is (the lower device id leads): the relay's kicks
        # of the side that does not lead fall half a kick later (see _enter_relayed)
        self.leads = leads
        self.state = PathState.IDLE
        self._now = self._since = self._endpoint_at = self._asked_at = 0.0
        self._local = LocalNat(0.0, NatType.UNKNOWN)
        self._peer = PeerUpdate(0.0, ())
        self._ranked = Ranked((), ())
        self._endpoint: str | None = None
        self._written = False  # whether _endpoint was written to WireGuard (see _set_endpoint)
        self._try = 0  # index in the ranking of the candidate being probed
        self._kick_at: float | None = None  # next handshake restart of the probe, if any
        self._round = 0  # retry rounds while relayed (rotates the candidate tried)
        self._handshake: float | None = None
        self._born: float | None = None  # the first event's time (see _fresh_session)
        self._seen: float | None = None  # the newest handshake a read reported so far
        self._relay = "none"  # none | pending | ready
        self._relay_endpoint: str | None = None
        self._via_tcp = ""  # how the relay binding is carried over TCP ("": over UDP)
        self._relays_used: tuple[str, ...] = ()  # the last few relay endpoints, newest last
        self._relay_error = ""
        self._backoff = self.timers.retry_first
        self._retry_at: float | None = None
        self._why = "waiting for the peer's endpoints"
        self._out: list[Action] = []
        # the last few port predictions (see _predict), oldest first: when, and probes sent
        self._predictions: tuple[tuple[float, int], ...] = ()
        self._direct_predicted = 0  # probes of the prediction that made the path direct

    # -- driving ----------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Apply ``event`` (and any deadline it passes); the actions to perform, in order."""
        self._now = max(self._now, event.now)
        if self._born is None:
            self._born = event.now
        if not isinstance(event, PeerUpdate):  # new endpoints replace what a timer would try
            self._catch_up(kicks=not isinstance(event, Handshake))  # evidence before a kick
        predicting = self._prediction_target() is not None
        if not isinstance(event, Tick):  # a tick acts only through the deadline it passes
            self._apply(event)
            self._catch_up()
        fresh = isinstance(event, PeerUpdate) or (isinstance(event, LocalNat) and not predicting)
        if fresh and self.state in _UNDECIDED:
            self._predict()  # the NATs were just learnt, or the peer is about to try us
        if isinstance(event, Handshake) and event.latest is not None:
            self._seen = max(self._seen or event.latest, event.latest)
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        """When to deliver the next :class:`Tick`, None if no timer is needed."""
        state, t = self.state, self.timers
        if state in (PathState.PROBING_DIRECT, PathState.RETRY_DIRECT):
            end = self._endpoint_at + t.probe_timeout
            return end if self._kick_at is None else min(end, self._kick_at)
        if state is PathState.DIRECT:
            return (self._handshake or self._since) + t.silence
        if state is PathState.RELAY_PENDING:
            return self._asked_at + t.relay_timeout
        if state is PathState.FAILED:  # on the wall-clock grid, like retries (see there)
            return math.ceil((self._since + self._backoff) / self._backoff) * self._backoff
        if state in _RELAYED:
            due = [d for d in (self._retry_at, self._kick_at) if d is not None]
            return min(due, default=None)
        return None

    def explain(self) -> PathReport:
        """The path to this peer and why, for ``wiregate status``."""
        return PathReport(
            _PATHS[self.state], self._endpoint, self._since, self._reason(), self.state
        )

    def _reason(self) -> str:
        state = self.state
        # off the direct path: a blocker learnt since (the NATs measured) says it best
        why = self._why if state is PathState.RETRY_DIRECT else self._blocker() or self._why
        if state in _RELAYED:
            if state is PathState.RELAYED_TCP:
                why = f"{why}: relayed over {self._via_tcp}"
            if self._retry_at is None and self._blocker() is None:
                unreachable = "none of the peer's candidates is reachable from here"
                return f"{why}; {unreachable}: direct once the peer reaches this host"
            if self._retry_at is None:
                return f"{why}; not retrying direct"
            return f"{why}; retrying direct every {self._backoff:g} s"
        if state is PathState.RELAY_PENDING:
            return f"asking for a relay: {why}"
        if state is PathState.FAILED:
            return f"{why}; no relay: {self._relay_error or 'unavailable'}"
        if state is PathState.RETRY_DIRECT:
            return f"relayed ({self._why}); trying direct candidate {self._endpoint}"
        if state is PathState.DIRECT:
            return self._direct_reason()
        return self._why

    def _direct_reason(self) -> str:
        """Why the direct path works, with the NAT types known now (a peer's NAT type
        often reaches the map after the path went direct)."""
        rank = self._ranked.rank_of(self._endpoint)
        roamed = self._endpoint if rank is None else None
        nats = self._local.nat, self._peer.nat
        return direct_reason(rank, *nats, roamed, self._direct_predicted)

    # -- hard NAT traversal by port prediction (agent.paths.predict) -------------------

    def _prediction_target(self) -> str | None:
        """The peer's published address to predict towards, when prediction applies."""
        if not prediction_applies(self._local.nat, self._peer.nat):
            return None
        ranked = zip(self._ranked.order, self._ranked.ranks, strict=True)
        return next((e for e, r in ranked if r == REFLEXIVE), None)

    def _predict(self) -> None:
        """Open our NAT's filter towards the peer (at most once per probe_timeout)."""
        target = self._prediction_target()
        last = self._predictions[-1][0] if self._predictions else None
        if target is None or (last is not None and self._now - last < self.timers.probe_timeout):
            return
        plan = plan_prediction(target, self._now)
        if plan is not None:
            self._predictions = (*self._predictions, (self._now, len(plan.ports)))[-4:]
            self._out.append(Predict(self.peer_id, plan))

    def _by_prediction(self, latest: float | None) -> int:
        """The probes of the prediction that let in a handshake made at ``latest``: the
        last one before it, when prediction applies (a NAT's filter stays open a while
        after our probes, like a session). Not always the newest: both sides retry on
        the same grid, so the peer's handshake, let in by an earlier prediction, can
        land just before the newest one is sent."""
        if self._prediction_target() is None or latest is None:
            return 0
        before = [(at, n) for at, n in self._predictions if at <= latest]
        if not before or latest - before[-1][0] > self.timers.silence:
            return 0
        return before[-1][1]

    def _apply(self, event: Event) -> None:
        rule = TRANSITIONS[(self.state, event.kind)]
        target = rule.handler(self, event)
        if target not in rule.targets:
            raise AssertionError(f"{self.state} --{event.kind}--> {target} is not in the table")
        if target is not self.state:
            self.state, self._since = target, self._now

    def _catch_up(self, kicks: bool = True) -> None:
        for _ in range(8):  # each tick handler moves the deadline past now
            deadline = self.next_deadline()
            if deadline is None or deadline > self._now:
                return
            if not kicks and deadline == self._kick_at and self.state in _KICKED:
                return
            self._apply(Tick(self._now))

    # -- helpers used by the handlers ------------------------------------------------

    def _set_endpoint(self, endpoint: str, kicks: bool | None = None) -> None:
        """Program ``endpoint``; ``kicks``: restart the handshake there every ``kick``
        seconds until a handshake or the probe window's end (None: if the candidate is
        worth it, see :func:`~agent.paths.vocabulary.worth_kicking`); the side that does
        not lead starts half a period later (see :meth:`_enter_relayed`).

        A candidate nothing can be sent to (:func:`~agent.paths.vocabulary.sendable`:
        what a peer behind symmetric NAT advertises) is probed by waiting, not written:
        the write could land after the peer's handshake made WireGuard roam to its real
        mapping, and would send our replies to an address with no mapping behind it."""
        rank = self._ranked.rank_of(endpoint)
        self._endpoint, self._endpoint_at = endpoint, self._now
        self._written = bool(kicks) or sendable(rank, self._peer.nat)
        if self._written:
            self._out.append(SetEndpoint(self.peer_id, endpoint))
        if kicks is None:
            kicks = worth_kicking(rank, self._peer.nat)
        self._kick_at = None
        if kicks:
            self._next_kick(0.0 if self.leads else self.timers.kick / 2)

    def _adopt(self, live: str | None) -> None:
        """Make ``live``, where WireGuard sends to the peer now, the path's endpoint
        (written, so that the data plane's next apply keeps it)."""
        assert live is not None
        self._endpoint, self._endpoint_at, self._written = live, self._now, True
        self._out.append(SetEndpoint(self.peer_id, live))
        self._kick_at = None

    def _next_kick(self, lag: float = 0.0) -> None:
        """Schedule the next kick, if it falls before the probe window's end."""
        at = self._now + self.timers.kick + lag
        end = self._endpoint_at + self.timers.probe_timeout
        self._kick_at = at if at < end else None

    def _kick(self) -> bool:
        """Restart WireGuard's handshake towards the endpoint just set, if a kick is due
        (the peer may have installed us, or bound at the relay, only since our first
        initiation, which WireGuard would retransmit only after 5 s)."""
        if self._kick_at is None or self._kick_at > self._now:
            return False
        if self._now >= self._endpoint_at + self.timers.probe_timeout:  # the window is over
            self._kick_at = None
            return False
        assert self._endpoint is not None
        self._out.append(SetEndpoint(self.peer_id, self._endpoint))
        self._next_kick()
        return True

    def wants_fresh_handshake(self) -> bool:
        """Whether the endpoint just set (or kicked) is worth a fresh WireGuard session
        (the driver then removes and re-adds the peer): a direct candidate being probed
        that is worth it, or the relay until a handshake through it. A private address
        on a network of neither side is not: resetting for it would only destroy the
        session the peer may be setting up from its side."""
        if self.state in _RELAYED:
            return self._kick_at is not None
        if self.state not in _PROBES:
            return False
        return worth_kicking(self._ranked.rank_of(self._endpoint), self._peer.nat)

    def _retry_plausible(self) -> bool:
        """Whether retrying direct from the relay can work: nothing rules it out and
        some candidate is reachable from here (else the peer must reach us)."""
        ranks = self._ranked.ranks
        if self._blocker() is not None:
            return False
        worth = any(worth_kicking(r, self._peer.nat) for r in ranks)
        return worth or self._prediction_target() is not None

    def _rank(self) -> None:
        local, peer = self._local, self._peer
        self._ranked = rank_candidates(
            peer.endpoints,
            peer_reflexive=peer.reflexive,
            our_reflexive=local.reflexive,
            our_networks=local.networks,
        )

        if self._endpoint in self._ranked.order:
            self._try = self._ranked.order.index(self._endpoint)

    def _blocker(self) -> str | None:
        return blocker(self._local.nat, self._peer.nat, self._ranked)

    def _probe(self, index: int) -> PathState:
        self._try = index
        order = self._ranked.order
        self._set_endpoint(order[index])
        self._why = f"probing direct candidate {order[index]} ({index + 1} of {len(order)})"
        if not self._written:
            self._why += ": waiting for the peer to reach this host (its NAT is symmetric)"
        return PathState.PROBING_DIRECT

    def _to_relay(self, why: str) -> PathState:
        self._why = why
        if self._relay == "ready" and self._relay_endpoint is not None:
            return self._enter_relayed()
        if self._relay == "none":
            self._relay, self._asked_at = "pending", self._now
            self._out.append(RequestRelay(self.peer_id))
        return PathState.RELAY_PENDING

    def _enter_relayed(self) -> PathState:
        """Move to the relay's endpoint, restarting the handshake there (kicks) until
        one goes through it: a pending initiation would wait WireGuard's 5 s retry.

        Both sides bind at the relay at about the same moment (they learn of each
        other from the same map), so kicks on the same period would cross: two
        initiations in flight at once each replace the other side's handshake state,
        WireGuard then refuses both responses, and neither side can send until a
        retransmission 5 s later (or 15 s, when a reset lands on a half-made session).
        The side that does not lead kicks half a period later than the one that does, at
        the relay as while probing a direct candidate (both probe at the same moment too)."""
        assert self._relay_endpoint is not None
        if self._endpoint != self._relay_endpoint:
            self._set_endpoint(self._relay_endpoint, kicks=True)
        self._schedule_retry(self._backoff)
        return PathState.RELAYED_TCP if self._via_tcp else PathState.RELAYED

    def _schedule_retry(self, delay: float, lag: float = 0.0) -> None:
        """Retry direct at the first multiple of ``delay`` (wall clock) after ``now + delay``
        (``+ lag``: a side that stays relayed schedules from where the peer's retry ends).

        Both sides of a pair run the same schedule (backoffs double from the same
        first value, so every coarser grid lies on the finer ones), so their retries
        meet: a NAT pinhole opens only when both send at about the same time."""
        plausible = self._retry_plausible()
        at = math.ceil((self._now + lag + delay) / delay) * delay
        self._retry_at = at if plausible else None

    def _release(self) -> None:
        if self._relay != "none":
            self._out.append(ReleaseRelay(self.peer_id))
        self._relay, self._relay_endpoint = "none", None

    def _direct_evidence(self, event: Handshake) -> bool:
        """Whether ``event`` proves a direct path: a fresh handshake at the direct
        endpoint being tried, or a live session whose packets WireGuard took from
        another address of the peer since that endpoint was set (it roams only to
        where authenticated packets come from: the peer reached us from there)."""
        if event.before_write:
            return self._fresh_session(event)
        latest, endpoint = event.latest, self._endpoint
        if latest is None or endpoint is None or latest <= self._now - self.timers.silence:
            return False
        if event.endpoint not in (None, endpoint):
            return self._roamed(event)
        if latest < self._endpoint_at:
            return False
        return endpoint in self._ranked.order  # not a relay's (perhaps one just lost)

    def _fresh_session(self, event: Handshake) -> bool:
        """Whether a read taken just before a reset shows a session the peer set up
        since the previous read: a handshake newer than any read reported and than this
        machine, at an address of the peer itself (not a relay's, and not while a relay
        binding is under way). Its address is where the peer's packets came from, so it
        is direct evidence; the reset would destroy it on this side only, and the peer,
        whose side stays fine, would not shake hands again until its next rekey.

        A session older than the previous read (one at a NAT mapping the probe is about
        to replace) is not: it was seen before and the machine chose anew anyway."""
        latest, live = event.latest, event.endpoint
        if latest is None or live is None or self._relay == "pending":
            return False
        return latest > max(self._seen or 0.0, self._born or 0.0) and self._roamed_direct(live)

    def _through_relay(self, event: Handshake) -> bool:
        """Whether a read taken just before a kick's reset shows a session that came up
        through the relay being kicked since the previous read: the relay works, and
        the reset would throw that session away (on this side only)."""
        latest = event.latest
        if self.state not in _RELAYED or latest is None or event.endpoint != self._endpoint:
            return False
        return latest >= self._endpoint_at and latest > max(self._seen or 0.0, self._born or 0.0)

    def _roamed(self, event: Handshake) -> bool:
        """Whether WireGuard roamed, after our endpoint was written, to an address of
        the peer itself (a read-back older than that write says nothing about it).
        Not while a relay binding is under way: the relay may forward the peer's
        packets before we learn its address."""
        if self._relay == "pending" or event.now < self._endpoint_at:
            return False
        if (
            event.latest is None
            or event.latest + self.timers.silence - self._now < self.timers.probe_timeout
        ):
            return False  # a session about to be declared silent: no path to move to
        return self._roamed_direct(event.endpoint)

    def _used_relay(self, endpoint: str) -> None:
        """Remember ``endpoint`` as a relay's (the last few distinct ones)."""
        used = [e for e in self._relays_used if e != endpoint]
        self._relays_used = (*used, endpoint)[-4:]

    def _roamed_direct(self, live: str | None) -> bool:
        """Whether ``live``, where WireGuard roamed to, is the peer itself: not one of
        the relays used (any port of their addresses: a relay gives each side its own)."""
        if live is None or live in self._relays_used:
            return False
        relays = {_host(e) for e in self._relays_used}
        return _host(live) not in relays


def _host(endpoint: str) -> str:
    """The address part of ``endpoint`` (``[v6]:port`` or ``v4:port``)."""
    return endpoint.rpartition(":")[0]


# -- handlers: each returns the next state; TRANSITIONS says which ones it may return -------


def _stay(m: PathMachine, event: Any) -> PathState:
    return m.state


def _record_local(m: PathMachine, event: LocalNat) -> PathState:
    moved = m._local.reflexive is not None and event.reflexive != m._local.reflexive
    m._local = event
    m._rank()
    if m.state in _RELAYED and (m._retry_at is None) == m._retry_plausible():
        m._schedule_retry(m._backoff)
    if m.state is PathState.DIRECT and moved and m._endpoint in m._ranked.order:
        # Our NAT mapping changed: the peer's NAT knows only the old one. Probe the
        # same endpoint afresh, as the peer probes our new one, so both open at once.
        return m._probe(m._ranked.order.index(m._endpoint))
    return m.state


def _local_while_probing(m: PathMachine, event: LocalNat) -> PathState:
    """Our NAT type learnt while probing: to the relay at once when it makes direct
    pointless (see :func:`~agent.paths.vocabulary.blocker`), else go on probing."""
    _record_local(m, event)
    why = m._blocker()
    return m.state if why is None else m._to_relay(why)


def _decide(m: PathMachine, event: Any) -> PathState:
    """Skip direct when pointless, else probe the best candidate."""
    why = m._blocker()
    return m._to_relay(why) if why is not None else m._probe(0)


def _peer_decide(m: PathMachine, event: PeerUpdate) -> PathState:
    m._peer = event
    m._rank()
    return _decide(m, event)


def _peer_record(m: PathMachine, event: PeerUpdate) -> PathState:
    m._peer = event
    m._rank()
    return m.state


def _peer_while_probing(m: PathMachine, event: PeerUpdate) -> PathState:
    """New candidates while probing: go on with the one being probed if it is still the
    best, else start over from the best (a reflexive address that arrived late)."""
    old = m._ranked.order
    _peer_record(m, event)
    order, why = m._ranked.order, m._blocker()
    if why is not None:  # the peer's NAT type makes direct pointless
        return m._to_relay(why)
    if m._endpoint in order and (order == old or m._endpoint == order[0]):
        return m.state
    return m._probe(0)


def _peer_while_direct(m: PathMachine, event: PeerUpdate) -> PathState:
    """New candidates while direct: probe the best one, unless the path already uses it
    or is one the peer reached us on (whatever it advertises, that one carries the
    session; silence would tell when it stops)."""
    old = m._ranked.order
    roamed = m._endpoint not in old
    _peer_record(m, event)
    order = m._ranked.order
    if order == old or roamed or (order and m._endpoint == order[0]):
        return m.state
    return m._probe(0) if order else m._to_relay("the peer advertises no direct endpoint")


def _peer_while_relayed(m: PathMachine, event: PeerUpdate) -> PathState:
    _peer_record(m, event)
    m._backoff = m.timers.retry_first
    m._schedule_retry(m.timers.probe_timeout)
    return m.state


def _peer_while_retrying(m: PathMachine, event: PeerUpdate) -> PathState:
    _peer_record(m, event)
    return m.state if m._endpoint in m._ranked.order else m._to_relay(m._why)


def _handshake_direct(m: PathMachine, event: Handshake) -> PathState:
    """A handshake on the direct endpoint being tried: the path is direct. (One through
    the relay just set ends the relay's kicks.)"""
    if not m._direct_evidence(event):
        if event.before_write:  # says nothing about the endpoint about to be written,
            if m._through_relay(event):  # but a session the relay just carried is kept
                m._kick_at = None
            return m.state
        through = event.endpoint in (None, m._endpoint)
        if m.state in _RELAYED and through and (event.latest or 0.0) >= m._endpoint_at:
            m._kick_at = None
        return m.state
    if event.endpoint not in (None, m._endpoint) or not m._written:
        # adopt where WireGuard already sends (also a candidate only waited on: the
        # session at it is the peer's doing, and the data plane must keep it)
        m._adopt(event.endpoint or m._endpoint)
    m._handshake, m._kick_at = event.latest, None
    m._release()
    m._backoff, m._retry_at = m.timers.retry_first, None
    m._direct_predicted = m._by_prediction(event.latest)
    return PathState.DIRECT


def _handshake_keep(m: PathMachine, event: Handshake) -> PathState:
    """Refresh a direct path's handshake time. When WireGuard roamed to another address
    of the peer (not a relay's) that carries the session, adopt it: rewriting the old
    endpoint would undo the roaming and cut the path the peer is using."""
    if event.before_write:  # no reset is written for a direct path
        return m.state
    live, latest = event.endpoint, event.latest
    alive = latest is not None and latest > m._now - m.timers.silence
    if alive and live not in (None, m._endpoint) and m._roamed(event):
        m._adopt(live)
    if latest is not None and live in (None, m._endpoint):
        m._handshake = max(m._handshake or 0.0, latest)
    return m.state


def _probe_tick(m: PathMachine, event: Tick) -> PathState:
    if m._kick():
        return m.state
    if m._try + 1 < len(m._ranked.order):
        return m._probe(m._try + 1)
    return m._to_relay(relay_reason(m._local.nat, m._peer.nat, m.timers.probe_timeout))


def _direct_tick(m: PathMachine, event: Tick) -> PathState:
    return m._to_relay(f"direct path went silent (no handshake for {m.timers.silence:g} s)")


def _relay_ready(m: PathMachine, event: RelayReady) -> PathState:
    m._relay, m._relay_endpoint, m._via_tcp = "ready", event.endpoint, event.via_tcp
    m._used_relay(event.endpoint)
    return m._enter_relayed()


def _note_relay(m: PathMachine, event: RelayReady) -> PathState:
    """A relay answer nobody waits for: remember it is a relay's, and stay."""
    m._used_relay(event.endpoint)
    return m.state


def _relay_failed(m: PathMachine, event: RelayFailed) -> PathState:
    m._relay, m._relay_endpoint, m._relay_error = "none", None, event.reason
    return PathState.FAILED


def _relay_timeout(m: PathMachine, event: Tick) -> PathState:
    m._release()
    m._relay_error = f"no answer within {m.timers.relay_timeout:g} s"
    return PathState.FAILED


def _relay_lost(m: PathMachine, event: RelayFailed) -> PathState:
    m._relay, m._relay_endpoint, m._relay_error = "none", None, event.reason
    return m._to_relay(f"relay dropped: {event.reason}")


def _relay_dropped(m: PathMachine, event: RelayFailed) -> PathState:
    m._relay, m._relay_endpoint, m._relay_error = "none", None, event.reason
    return m.state


def _relayed_tick(m: PathMachine, event: Tick) -> PathState:
    if m._kick() or m._retry_at is None or m._retry_at > m._now:
        return m.state
    order = m._ranked.order
    if not m._retry_plausible():
        m._retry_at = None
        return m.state
    # Every other retry goes to the best candidate, so both sides of a pair (whose
    # rounds advance together) meet there; the rounds between rotate over the rest.
    # A private address on a network of neither side (rank OTHER) never: the peer
    # reaches us if it can (see _retry_plausible).
    nat = m._peer.nat
    worth = [e for e, r in zip(order, m._ranked.ranks, strict=True) if worth_kicking(r, nat)]
    m._predict()  # on the grid, when the peer retries towards us too
    if not worth:  # only the peer can reach us: it retries now, through the prediction
        m._backoff = min(m._backoff * 2, m.timers.retry_max)
        m._schedule_retry(m._backoff, lag=m.timers.probe_timeout)  # from where its retry ends
        return m.state
    k = m._round
    index = 0 if k % 2 == 0 or len(worth) == 1 else 1 + (k // 2) % (len(worth) - 1)
    m._set_endpoint(worth[index])
    m._round += 1
    return PathState.RETRY_DIRECT


def _retry_tick(m: PathMachine, event: Tick) -> PathState:
    if m._kick():
        return m.state
    m._backoff = min(m._backoff * 2, m.timers.retry_max)
    return m._to_relay(m._why)


def _failed_tick(m: PathMachine, event: Tick) -> PathState:
    m._backoff = min(m._backoff * 2, m.timers.retry_max)
    return _decide(m, event)


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the table: what handles the event and where it may lead."""

    handler: Callable[[PathMachine, Any], PathState]
    targets: frozenset[PathState]


def _rule(handler: Callable[[PathMachine, Any], PathState], *targets: PathState) -> Rule:
    return Rule(handler, frozenset(targets))


S = PathState
_TO_RELAY = (S.RELAY_PENDING, S.RELAYED, S.RELAYED_TCP)
_STAY = {s: _rule(_stay, s) for s in S}
_RECORD = {s: _rule(_record_local, s) for s in S}
_HANDSHAKE = {s: _rule(_handshake_direct, s, S.DIRECT) for s in S}

TRANSITIONS: dict[tuple[PathState, str], Rule] = {
    **{(s, "local_nat"): _RECORD[s] for s in S},
    (S.DIRECT, "local_nat"): _rule(_record_local, S.DIRECT, S.PROBING_DIRECT),
    **{(s, "relay_ready"): _rule(_note_relay, s) for s in S},
    **{(s, "relay_failed"): _STAY[s] for s in S},
    (S.IDLE, "peer"): _rule(_peer_decide, S.PROBING_DIRECT, *_TO_RELAY),
    (S.IDLE, "handshake"): _STAY[S.IDLE],
    (S.IDLE, "tick"): _STAY[S.IDLE],
    (S.PROBING_DIRECT, "local_nat"): _rule(_local_while_probing, S.PROBING_DIRECT, *_TO_RELAY),
    (S.PROBING_DIRECT, "peer"): _rule(_peer_while_probing, S.PROBING_DIRECT, *_TO_RELAY),
    (S.PROBING_DIRECT, "handshake"): _HANDSHAKE[S.PROBING_DIRECT],
    (S.PROBING_DIRECT, "tick"): _rule(_probe_tick, S.PROBING_DIRECT, *_TO_RELAY),
    (S.DIRECT, "peer"): _rule(_peer_while_direct, S.DIRECT, S.PROBING_DIRECT, *_TO_RELAY),
    (S.DIRECT, "handshake"): _rule(_handshake_keep, S.DIRECT),
    (S.DIRECT, "tick"): _rule(_direct_tick, *_TO_RELAY),
    (S.RELAY_PENDING, "peer"): _rule(_peer_record, S.RELAY_PENDING),
    (S.RELAY_PENDING, "handshake"): _HANDSHAKE[S.RELAY_PENDING],
    (S.RELAY_PENDING, "relay_ready"): _rule(_relay_ready, S.RELAYED, S.RELAYED_TCP),
    (S.RELAY_PENDING, "relay_failed"): _rule(_relay_failed, S.FAILED),
    (S.RELAY_PENDING, "tick"): _rule(_relay_timeout, S.FAILED),
    (S.RELAYED, "peer"): _rule(_peer_while_relayed, S.RELAYED),
    (S.RELAYED, "handshake"): _HANDSHAKE[S.RELAYED],
    (S.RELAYED, "relay_failed"): _rule(_relay_lost, *_TO_RELAY),
    (S.RELAYED, "tick"): _rule(_relayed_tick, S.RELAYED, S.RETRY_DIRECT),
    (S.RELAYED_TCP, "peer"): _rule(_peer_while_relayed, S.RELAYED_TCP),
    (S.RELAYED_TCP, "handshake"): _HANDSHAKE[S.RELAYED_TCP],
    (S.RELAYED_TCP, "relay_failed"): _rule(_relay_lost, *_TO_RELAY),
    (S.RELAYED_TCP, "tick"): _rule(_relayed_tick, S.RELAYED_TCP, S.RETRY_DIRECT),
    (S.RETRY_DIRECT, "peer"): _rule(_peer_while_retrying, S.RETRY_DIRECT, *_TO_RELAY),
    (S.RETRY_DIRECT, "handshake"): _HANDSHAKE[S.RETRY_DIRECT],
    (S.RETRY_DIRECT, "relay_failed"): _rule(_relay_dropped, S.RETRY_DIRECT),
    (S.RETRY_DIRECT, "tick"): _rule(_retry_tick, S.RETRY_DIRECT, *_TO_RELAY),
    (S.FAILED, "peer"): _rule(_peer_decide, S.PROBING_DIRECT, *_TO_RELAY),
    (S.FAILED, "handshake"): _HANDSHAKE[S.FAILED],
    (S.FAILED, "tick"): _rule(_failed_tick, S.PROBING_DIRECT, *_TO_RELAY),
}
"""Every (state, event kind) -> :class:`Rule`; nothing changes state outside this table."""
