"""Sans-IO relay core: tickets in, bound pairs, WireGuard datagrams forwarded between them.

Port model: the relay has one control port and a pool of relay ports. A pair
(A, B) gets two relay ports, ``port_A`` and ``port_B``. A's WireGuard is told
that B lives at ``relay:port_A``, B's that A lives at ``relay:port_B``; a
datagram arriving on ``port_A`` from A's bound address goes to B's bound
address *from* ``port_B`` (the endpoint B's kernel expects), and vice versa.

Admission (see :mod:`relay.controlwire` for the messages):

0. ``PING(nonce)`` on the control port is answered with ``PONG(nonce,
   allocations, capacity)``, no ticket needed: the gateway's liveness probe
   and load figure (same filters, rate limit and size rule as every reply,
   except that a PING from a local own address is answered: see
   :class:`RelayConfig`).
1. ``ALLOCATE(ticket)`` on the control port creates the pair's allocation (or
   finds it) and answers ``ALLOCATED(port)`` for the ticket's side.
2. ``BIND(ticket)`` from the agent's WireGuard port to that relay port is
   answered with ``CHALLENGE(cookie)``; the relay keeps no state.
3. ``CONFIRM(cookie, ticket)`` from the same address binds it (``BOUND``) and
   puts the ticket id in the replay cache until the ticket expires. A later
   ticket for the same side rebinds (NAT mapping changed); a ticket never binds
   twice, and a spoofed source never sees its cookie.

Every reply goes to the request's source from the port it arrived on, is never
larger than the request, and is never sent to a forbidden address
(:func:`relay.filters.destination_refusal`); unauthenticated sources are rate
limited. Forwarding needs a bound source, a bound peer, WireGuard's exact shape,
a handshake mac1 keyed with the peer's public key and bandwidth left in the
sending device's token bucket. Without verify keys nothing is admitted.
Every outcome, forwarded or dropped, is counted under a label of :data:`OUTCOMES`.
"""

from __future__ import annotations

import hmac
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relay.controlwire import (
    MAGIC,
    REASONS,
    VERSION,
    Allocate,
    Allocated,
    Bind,
    Bound,
    Challenge,
    Confirm,
    ControlMessage,
    Kind,
    Ping,
    Pong,
    Refused,
    build_control,
    is_control,
    make_cookie,
    parse_control,
)
from relay.errors import ControlError, NoTrustedSigners, ReplayedTicket, TicketError
from relay.filters import (
    HANDSHAKE_RESPONSE,
    IPAddress,
    destination_refusal,
    mac1_valid,
    normalize_ip,
    wireguard_type,
)
from relay.pool import Addr, Allocation, AllocationPool, AllocationView, PoolExhausted
from relay.stun_core import RateLimiter
from relay.tickets import Ticket, TrustedSigner, parse_ticket, ticket_id_of

__all__ = ["OUTCOMES", "Addr", "AllocationView", "Relay", "RelayConfig", "Send"]

#: Every label a :class:`Relay` counts: what it did, then why it dropped a datagram.
OUTCOMES = (
    "allocated",
    "pinged",
    "challenged",
    "bound",
    "forwarded",
    "idle_expired",
    "bad_source",
    "forbidden_destination",
    "rate_limited",
    "malformed_control",
    "unexpected_control",
    "no_allocation",
    *REASONS[1:],  # every refusal reason the relay can send on the wire
    "unbound_source",
    "not_wireguard",
    "too_large",
    "peer_unbound",
    "bad_mac1",
    "over_bandwidth",
)


_KIND = len(MAGIC) + 1  # offset of the kind byte


@dataclass(frozen=True, slots=True)
class Send:
    """A datagram to send to ``dst`` from the relay's ``local_port``."""

    dst: Addr
    local_port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Limits and identity of one relay. ``allow_loopback`` is for loopback-only tests.

    ``local_addresses`` are the own addresses configured on this host (the
    adapter checks): a PING from one of them was sent by a process here, as
    Linux drops datagrams from outside that carry a local source address, so it
    is answered (a gateway on the relay's host probes it); never from one of
    the relay's own ports, and nothing else is exempted.
    """

    relay_id: str
    control_port: int
    ports: tuple[int, ...]
    own_addresses: tuple[str, ...] = ()
    max_allocations: int = 1024
    max_allocations_per_device: int = 16
    bytes_per_second: float = 1_250_000.0
    burst_bytes: float = 262_144.0
    idle_timeout: float = 60.0
    max_datagram: int = 1500
    cookie_window: float = 30.0
    max_replay_entries: int = 1_000_000
    ticket_skew: float = 5.0
    check_mac1: bool = True
    allow_loopback: bool = False
    local_addresses: tuple[str, ...] = ()


class _Refusal(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_Admission = (TicketError, NoTrustedSigners, PoolExhausted, _Refusal)


class Relay:
    """The relay's state: allocations, bindings, replay cache, quotas and counters."""

    def __init__(
        self,
        config: RelayConfig,
        verify_keys: Sequence[TrustedSigner],
        *,
        secret: bytes,
        limiter: RateLimiter | None = None,
        observe: Callable[[str], None] | None = None,
    ) -> None:
        self.config, self.verify_keys, self._secret = config, list(verify_keys), secret
        self._limiter = limiter if limiter is not None else RateLimiter()
        self._observe = observe or (lambda _outcome: None)
        own = frozenset(normalize_ip(a) for a in config.own_addresses)
        # Loopback tests share 127.0.0.1 with the relay: there, only the relay's own
        # ports on its own addresses stay forbidden (no relay-to-itself loops).
        self._own = frozenset(a for a in own if not (config.allow_loopback and a.is_loopback))
        self._own_ports = frozenset((config.control_port, *config.ports))
        self._local = frozenset(normalize_ip(a) for a in config.local_addresses) & own
        ports = [p for p in config.ports if p != config.control_port]
        self._pool = AllocationPool(
            ports,
            capacity=config.max_allocations,
            per_device=config.max_allocations_per_device,
            rate=config.bytes_per_second,
            burst=config.burst_bytes,
        )
        self._replay: dict[bytes, float] = {}
        self.counters: Counter[str] = Counter()

    # --- entry points ---------------------------------------------------------------------

    def handle(self, data: bytes, src: Addr, local_port: int, now: float) -> list[Send]:
        """What to send in answer to one datagram from ``src`` on ``local_port``."""
        sends, outcome = self._dispatch(data, src, local_port, now)
        self._count(outcome)
        return sends

    def expire(self, now: float) -> int:
        """Drop allocations idle for ``idle_timeout`` and spent replay entries; how many."""
        idle = [a for a in self._pool if now - a.last_active >= self.config.idle_timeout]
        for alloc in idle:
            self._pool.release(alloc)
            self._count("idle_expired")
        self._replay = {tid: until for tid, until in self._replay.items() if until > now}
        return len(idle)

    def next_deadline(self) -> float | None:
        """When the next allocation goes idle, if any (for the adapter's timer)."""
        times = [a.last_active for a in self._pool]
        return min(times) + self.config.idle_timeout if times else None

    def load(self) -> tuple[int, int]:
        """Live allocations and how many fit (what a PONG reports)."""
        return len(self._pool), self._pool.capacity

    def allocations(self) -> list[AllocationView]:
        """Every live allocation."""
        return [a.view() for a in self._pool]

    # --- dispatch -------------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        self.counters[outcome] += 1
        self._observe(outcome)

    def _dispatch(
        self, data: bytes, src: Addr, local_port: int, now: float
    ) -> tuple[list[Send], str]:
        try:
            ip = normalize_ip(src[0])
        except ValueError:
            return [], "bad_source"
        if local_port == self.config.control_port:
            return self._on_control(data, src, ip, now)
        entry = self._pool.at_port(local_port)
        if entry is None:
            return [], "no_allocation"
        alloc, index = entry
        if is_control(data):
            return self._on_port_control(data, src, ip, alloc, index, now)
        return self._forward(data, ip, src[1], alloc, index, now)

    def _forbidden(self, ip: IPAddress, port: int) -> bool:
        if port in self._own_ports and (ip.is_loopback or ip.is_unspecified):
            return True
        return (
            destination_refusal(ip, self._own, allow_loopback=self.config.allow_loopback)
            is not None
        )

    def _gate(self, data: bytes, src: Addr, ip: IPAddress, now: float) -> ControlMessage | str:
        """The parsed control message of an unauthenticated sender, or why it is dropped."""
        if self._forbidden(ip, src[1]) and not self._local_ping(data, ip, src[1]):
            return "forbidden_destination"
        if not self._limiter.allow(ip, now):
            return "rate_limited"
        try:
            return parse_control(data)
        except ControlError:
            return "malformed_control"

    def _local_ping(self, data: bytes, ip: IPAddress, port: int) -> bool:
        """A PING from a process on this host (see :class:`RelayConfig`)."""
        return (
            ip in self._local
            and port not in self._own_ports
            and data[: _KIND + 1] == MAGIC + bytes([VERSION, Kind.PING])
        )

    def _reply(self, request: bytes, dst: Addr, port: int, msg: ControlMessage) -> list[Send]:
        """``msg`` back to ``dst``, only if it is no larger than ``request``."""
        data = build_control(msg)
        return [Send(dst, port, data)] if len(data) <= len(request) else []

    def _refuse(
        self, request: bytes, ticket: bytes, dst: Addr, port: int, reason: str
    ) -> tuple[list[Send], str]:
        echo = ticket[2:18] if len(ticket) >= 18 else bytes(16)
        return self._reply(request, dst, port, Refused(echo, reason)), reason

    # --- control port ---------------------------------------------------------------------

    def _on_control(
        self, data: bytes, src: Addr, ip: IPAddress, now: float
    ) -> tuple[list[Send], str]:
        msg = self._gate(data, src, ip, now)
        if isinstance(msg, str):
            return [], msg
        port = self.config.control_port
        if isinstance(msg, Ping):
            return self._reply(data, src, port, Pong(msg.nonce, *self.load())), "pinged"
        if not isinstance(msg, Allocate):
            return [], "unexpected_control"
        try:
            ticket = self._admit(msg.ticket, now)
            alloc = self._pool.get_or_create(ticket.pair, now)
        except _Admission as exc:
            return self._refuse(data, msg.ticket, src, port, exc.reason)
        answer = Allocated(ticket.ticket_id, alloc.sides[ticket.pair_index].port)
        return self._reply(data, src, port, answer), "allocated"

    def _admit(self, raw: bytes, now: float) -> Ticket:
        ticket = parse_ticket(
            raw, self.verify_keys, now, relay_id=self.config.relay_id, skew=self.config.ticket_skew
        )
        if ticket.ticket_id in self._replay:
            raise ReplayedTicket("ticket already used")
        return ticket

    # --- relay ports: bind and confirm ------------------------------------------------------

    def _on_port_control(
        self, data: bytes, src: Addr, ip: IPAddress, alloc: Allocation, index: int, now: float
    ) -> tuple[list[Send], str]:
        msg = self._gate(data, src, ip, now)
        if isinstance(msg, str):
            return [], msg
        if isinstance(msg, Bind):
            return self._on_bind(msg, data, src, ip, alloc, index, now)
        if isinstance(msg, Confirm):
            return self._on_confirm(msg, data, src, ip, alloc, index, now)
        return [], "unexpected_control"

    def _on_bind(
        self,
        msg: Bind,
        data: bytes,
        src: Addr,
        ip: IPAddress,
        alloc: Allocation,
        index: int,
        now: float,
    ) -> tuple[list[Send], str]:
        port = alloc.sides[index].port
        try:
            ticket = self._admit(msg.ticket, now)
            _check_port(ticket, alloc, index)
        except _Admission as exc:
            return self._refuse(data, msg.ticket, src, port, exc.reason)
        cookie = self._cookie(int(now // self.config.cookie_window), ip, src[1], port, ticket)
        return self._reply(data, src, port, Challenge(ticket.ticket_id, cookie)), "challenged"

    def _cookie(self, window: int, ip: IPAddress, port: int, relay_port: int, t: Ticket) -> bytes:
        return make_cookie(self._secret, window, ip, port, relay_port, t.ticket_id)

    def _cookie_ok(self, msg: Confirm, ip: IPAddress, src_port: int, port: int, now: float) -> bool:
        try:
            tid = ticket_id_of(msg.ticket)
        except TicketError:
            return False
        window = int(now // self.config.cookie_window)
        return any(
            hmac.compare_digest(make_cookie(self._secret, w, ip, src_port, port, tid), msg.cookie)
            for w in (window, window - 1)
        )

    def _on_confirm(
        self,
        msg: Confirm,
        data: bytes,
        src: Addr,
        ip: IPAddress,
        alloc: Allocation,
        index: int,
        now: float,
    ) -> tuple[list[Send], str]:
        side, other = alloc.sides[index], alloc.sides[1 - index]
        if not self._cookie_ok(msg, ip, src[1], side.port, now):
            return [], "bad_cookie"
        tid = ticket_id_of(msg.ticket)
        if tid != side.ticket_id or not side.sent_by(ip, src[1]):  # else: a retransmission
            try:
                ticket = self._admit(msg.ticket, now)
                _check_port(ticket, alloc, index)
                self._remember(ticket)
            except _Admission as exc:
                return self._refuse(data, msg.ticket, src, side.port, exc.reason)
            side.addr, side.ip, side.ticket_id = src, ip, tid
            alloc.last_active = now
        return self._reply(data, src, side.port, Bound(tid, other.addr is not None)), "bound"

    def _remember(self, ticket: Ticket) -> None:
        if len(self._replay) >= self.config.max_replay_entries:
            raise _Refusal("replay_cache_full")
        self._replay[ticket.ticket_id] = ticket.expires_at + self.config.ticket_skew

    # --- relay ports: forwarding ------------------------------------------------------------

    def _forward(
        self, data: bytes, ip: IPAddress, src_port: int, alloc: Allocation, index: int, now: float
    ) -> tuple[list[Send], str]:
        side, other = alloc.sides[index], alloc.sides[1 - index]
        if not side.sent_by(ip, src_port):
            return [], "unbound_source"
        kind = wireguard_type(data, self.config.max_datagram)
        if kind is None:
            return [], "too_large" if len(data) > self.config.max_datagram else "not_wireguard"
        if other.addr is None:
            return [], "peer_unbound"
        if (
            self.config.check_mac1
            and kind <= HANDSHAKE_RESPONSE
            and not mac1_valid(data, other.key)
        ):
            return [], "bad_mac1"
        if not self._pool.bucket(side.device, now).take(len(data), now):
            return [], "over_bandwidth"
        alloc.last_active = now
        return [Send(other.addr, other.port, data)], "forwarded"


def _check_port(ticket: Ticket, alloc: Allocation, index: int) -> None:
    """The ticket must be for this allocation's pair and for the side this port serves."""
    if ticket.pair != alloc.pair or ticket.pair_index != index:
        raise _Refusal("wrong_port")
