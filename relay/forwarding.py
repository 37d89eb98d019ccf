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
The gateway's revocation list (:meth:`Relay.revoke`, :mod:`relay.revocations`)
releases every allocation of a removed device and refuses tickets naming it that
were issued before its removal (``ticket_revoked``).
Every outcome, forwarded or dropped, is counted under a label of :data:`OUTCOMES`
(plain integers in :attr:`Relay.counters`, read by the metrics on scrape).

:meth:`Relay.handle` takes one datagram; :meth:`Relay.handle_batch`, the
adapter's hot path, takes what one ``recvmmsg`` returned and gives each datagram
the same outcome, checking a bound pair's transport data for the whole batch at
once (no address parsing: a source is compared with the bound address as the
socket reports it; addresses are parsed once per source text and cached).
"""

from __future__ import annotations

import hmac
import operator
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice, repeat

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
    TRANSPORT,
    IPAddress,
    destination_refusal,
    mac1_valid,
    normalize_ip,
    transport_sizes,
    wireguard_type,
)
from relay.pool import Addr, Allocation, AllocationPool, AllocationView, Bucket, PoolExhausted
from relay.revocations import Revoked
from relay.stun_core import RateLimiter
from relay.tickets import PairKey, Ticket, TrustedSigner, parse_ticket, ticket_id_of

__all__ = ["OUTCOMES", "Addr", "AllocationView", "Relay", "RelayConfig", "Send"]

#: Every label a :class:`Relay` counts: what it did, then why it dropped a datagram.
OUTCOMES = (
    "allocated",
    "pinged",
    "challenged",
    "bound",
    "forwarded",
    "idle_expired",
    "revoked",
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
_IP_CACHE = 4096  # parsed source addresses kept before the cache starts over
_TRANSPORT_HEAD = bytes([TRANSPORT, 0, 0, 0])  # WireGuard transport data: type 4, reserved 0
_DATA, _SOURCE = operator.itemgetter(0), operator.itemgetter(1)


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
        self._observe = observe
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
        self._revoked: Revoked = {}  # (tenant, device id) -> when the gateway removed it
        self.counters: Counter[str] = Counter()
        self.forwarded_bytes = 0  # WireGuard bytes forwarded (exported on scrape)
        self._ips: dict[str, IPAddress] = {}  # source host text -> address, bounded
        self._sizes = transport_sizes(config.max_datagram)
        # TCP/443 bridges (relay.aio.tcp): a loopback UDP source -> the TCP client's address.
        # Admitted although loopback, rate limited as that client; tickets and the rest as usual.
        self.bridges: dict[Addr, IPAddress] = {}
        # Called when a side binds or allocations are released (the kernel fast path
        # reconciles against allocations() then: relay.aio.kernelpath).
        self.on_change: Callable[[], None] | None = None

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
        if idle and self.on_change is not None:
            self.on_change()
        return len(idle)

    def revoke(self, revoked: Mapping[tuple[str, str], float]) -> int:
        """Trust the gateway's list of removed devices (``(tenant, device id)`` -> when)
        from now on, in place of the last: release every allocation either side of which
        is listed, refuse tickets naming one that were issued before its removal. How
        many allocations were released (each counted ``revoked``)."""
        self._revoked = dict(revoked)
        doomed = [a for a in self._pool if any(s.device in self._revoked for s in a.sides)]
        for alloc in doomed:
            self._pool.release(alloc)
            self._count("revoked")
        if doomed and self.on_change is not None:
            self.on_change()
        return len(doomed)

    def touch(self, pairs: Collection[PairKey], now: float) -> None:
        """Mark ``pairs`` active at ``now`` (traffic the kernel forwarded for them)."""
        if pairs:
            for alloc in self._pool:
                if alloc.pair in pairs:
                    alloc.last_active = max(alloc.last_active, now)

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

    @property
    def allocations_created(self) -> int:
        """Allocations created since start (a counter: releases do not lower it)."""
        return self._pool.created

    # --- dispatch -------------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        self.counters[outcome] += 1
        if self._observe is not None:
            self._observe(outcome)

    def _ip(self, host: str) -> IPAddress:
        """``host`` parsed once: later datagrams from it cost a lookup. ValueError if bad."""
        ip = self._ips.get(host)
        if ip is None:
            if len(self._ips) >= _IP_CACHE:
                self._ips.clear()
            ip = self._ips[host] = normalize_ip(host)
        return ip

    def _dispatch(
        self, data: bytes, src: Addr, local_port: int, now: float
    ) -> tuple[list[Send], str]:
        try:
            ip = self._ip(src[0])
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
        client = self.bridges.get(src)
        local = client is not None or self._local_ping(data, ip, src[1])
        if not local and self._forbidden(ip, src[1]):
            return "forbidden_destination"
        if not self._limiter.allow(ip if client is None else client, now):
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
        for node in (ticket.node_a, ticket.node_b):
            revoked_at = self._revoked.get((ticket.tenant, node.device_id))
            if revoked_at is not None and ticket.issued_at < revoked_at:
                raise _Refusal("ticket_revoked")
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
            if self.on_change is not None:
                self.on_change()
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
        self.forwarded_bytes += len(data)
        return [Send(other.addr, other.port, data)], "forwarded"

    # --- relay ports: batched forwarding (the adapter's hot path) ---------------------------

    def handle_batch(
        self, datagrams: Sequence[tuple[bytes, Addr]], local_port: int, now: float
    ) -> dict[int, list[tuple[bytes, Addr]]]:
        """What to send for datagrams that arrived together on ``local_port``: by the port
        to send from, ``(data, destination)`` in order. Each datagram has the outcome
        :meth:`handle` would give it.

        Transport data from the port's bound source, to a bound peer, within the
        sending device's bandwidth, is checked and forwarded inline with no address
        parsing (the source is compared with the bound address as the socket spells
        it); everything else, handshakes included (mac1), takes :meth:`handle`.
        """
        lane = self._lane(local_port, now)
        if lane is not None:  # the common case: the whole batch checked with loops in C
            sends = self._whole_batch(lane, datagrams)
            if sends is not None:
                return {lane.port: sends}
        return self._handle_mixed(datagrams, local_port, now)

    def _handle_mixed(
        self, datagrams: Sequence[tuple[bytes, Addr]], local_port: int, now: float
    ) -> dict[int, list[tuple[bytes, Addr]]]:
        """Runs of inline-forwardable datagrams, each other datagram through :meth:`handle`."""
        out: dict[int, list[tuple[bytes, Addr]]] = {}
        done, total = 0, len(datagrams)
        while done < total:
            lane = self._lane(local_port, now)  # again after each slow datagram
            if lane is not None:
                done += self._run_lane(lane, datagrams, done, out.setdefault(lane.port, []))
                if done >= total:
                    break
            data, src = datagrams[done]
            for send in self.handle(data, src, local_port, now):
                out.setdefault(send.local_port, []).append((send.data, send.dst))
            done += 1
        return {port: sends for port, sends in out.items() if sends}

    def _run_lane(
        self,
        lane: _Lane,
        datagrams: Sequence[tuple[bytes, Addr]],
        start: int,
        sends: list[tuple[bytes, Addr]],
    ) -> int:
        """Forward datagrams from ``start`` while each passes every check inline; how many.
        The first that does not is left to :meth:`handle`."""
        bound, dst, append = lane.src, lane.dst, sends.append
        head, sizes, budget = _TRANSPORT_HEAD, self._sizes, lane.bucket.tokens
        count = spent = 0
        for data, src in islice(datagrams, start, None):
            n = len(data)
            if (
                (src is bound or src == bound)
                and data.startswith(head)
                and n in sizes
                and spent + n <= budget
            ):
                append((data, dst))
                count, spent = count + 1, spent + n
            else:
                break
        if count:
            self._forwarded(lane, count, spent)
        return count

    def _lane(self, local_port: int, now: float) -> _Lane | None:
        """The inline forwarding state of a relay port whose two sides are bound."""
        entry = self._pool.at_port(local_port)
        if entry is None:
            return None
        alloc, index = entry
        side, other = alloc.sides[index], alloc.sides[1 - index]
        if side.addr is None or other.addr is None:
            return None
        bucket = self._pool.bucket(side.device, now)
        bucket.take(0.0, now)  # refill up to now; the batch then spends from it
        return _Lane(side.addr, other.addr, other.port, bucket, alloc, now)

    def _whole_batch(
        self, lane: _Lane, datagrams: Sequence[tuple[bytes, Addr]]
    ) -> list[tuple[bytes, Addr]] | None:
        """The sends when every datagram is from the bound source, WireGuard transport
        data and within the bucket (checked with loops in C); None if any is not."""
        datas = list(map(_DATA, datagrams))
        sizes = list(map(len, datas))
        spent = sum(sizes)
        if not (
            sizes
            and spent <= lane.bucket.tokens
            and self._sizes.issuperset(sizes)
            and all(map(bytes.startswith, datas, repeat(_TRANSPORT_HEAD)))
            and all(map(operator.eq, map(_SOURCE, datagrams), repeat(lane.src)))
        ):
            return None
        self._forwarded(lane, len(datas), spent)
        return list(zip(datas, repeat(lane.dst)))

    def _forwarded(self, lane: _Lane, count: int, size: int) -> None:
        """``count`` datagrams of ``size`` bytes in all went out: spend, count, keep alive."""
        lane.bucket.tokens -= size
        lane.alloc.last_active = lane.now
        self.counters["forwarded"] += count
        self.forwarded_bytes += size
        if self._observe is not None:
            for _ in range(count):
                self._observe("forwarded")


@dataclass(slots=True)
class _Lane:
    """A bound relay port's inline path: who may send, to whom, from which port, the
    sending device's bucket, and the allocation kept alive by what it forwards."""

    src: Addr
    dst: Addr
    port: int
    bucket: Bucket
    alloc: Allocation
    now: float


def _check_port(ticket: Ticket, alloc: Allocation, index: int) -> None:
    """The ticket must be for this allocation's pair and for the side this port serves."""
    if ticket.pair != alloc.pair or ticket.pair_index != index:
        raise _Refusal("wrong_port")
