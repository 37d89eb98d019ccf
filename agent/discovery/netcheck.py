"""What the network does to the WireGuard port: reflexive address and NAT type.

:func:`classify` is pure: it takes what each STUN server answered (or not) and the
local address, and returns a :class:`NetReport`. :func:`run_netcheck` is the probe:
it asks the STUN servers from the WireGuard listen port through a raw socket
(:mod:`agent.discovery.rawudp`), adding the first server's OTHER-ADDRESS when only
one server is configured, so the mappings compared are the ones WireGuard uses.
Given relays (:func:`fetch_relays` asks the gateway's ``GET /api/v1/relays``
with the device token), it also PINGs each relay's control port, at the same
time, and reports reachability and latency (:class:`RelayProbe`).

NAT types:

``open``         the reflexive address is the local address and port: no NAT.
``eim``          every server saw the same mapping (endpoint-independent mapping):
                 peers can reach the reflexive address once WireGuard has sent to them.
``symmetric``    the servers saw different mappings: the reflexive address is of no
                 use to peers (each destination gets its own port).
``udp-blocked``  no server answered.
``unknown``      one server answered with a translated address: EIM or symmetric
                 cannot be told apart with one server.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp

from agent.discovery.endpoints import format_endpoint
from agent.discovery.rawudp import RawAnswer, raw_stun_query
from agent.paths.relaylink import resolve_ipv4
from relay.client.probe import PingResult, ping_relay
from relay.endpoints import RelayEndpoint, parse_relays
from wiregate.clock import Clock
from wiregate.errors import Unavailable, WiregateError, from_api_response
from wiregate.tls import client_context, tls_refusal

__all__ = [
    "NatType",
    "NetReport",
    "Probe",
    "RelayProbe",
    "check_relays",
    "classify",
    "fetch_relays",
    "run_netcheck",
]

Addr = tuple[str, int]
Query = Callable[[Addr, int, float], Awaitable[RawAnswer]]
Ping = Callable[[Addr, float], Awaitable[PingResult]]
_HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=5)


class NatType(StrEnum):
    """How the network maps the WireGuard port (see the module docstring)."""

    OPEN = "open"
    EIM = "eim"
    SYMMETRIC = "symmetric"
    UDP_BLOCKED = "udp-blocked"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Probe:
    """One STUN server's answer (``mapped``) or why there was none (``error``)."""

    server: Addr
    mapped: Addr | None = None
    rtt: float | None = None
    other_address: Addr | None = None
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "server": format_endpoint(*self.server),
            "reachable": self.mapped is not None,
            "mapped": format_endpoint(*self.mapped) if self.mapped else None,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class RelayProbe:
    """One relay's answer to PING (``rtt``) or why there was none (``error``)."""

    relay: RelayEndpoint
    rtt: float | None = None
    error: str = ""

    @property
    def reachable(self) -> bool:
        return self.rtt is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.relay.id,
            "control": self.relay.control,
            "reachable": self.reachable,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class NetReport:
    """The outcome of one netcheck, with the evidence that led to it."""

    nat_type: NatType
    reflexive: Addr | None
    local: Addr | None
    probes: tuple[Probe, ...]
    evidence: str
    checked_at: float
    relays: tuple[RelayProbe, ...] = ()

    @property
    def usable_reflexive(self) -> str | None:
        """The reflexive endpoint worth advertising to peers (``open`` or ``eim`` only)."""
        if self.reflexive is None or self.nat_type not in (NatType.OPEN, NatType.EIM):
            return None
        return format_endpoint(*self.reflexive)

    @property
    def advertised_reflexive(self) -> str | None:
        """The reflexive candidate to advertise: :attr:`usable_reflexive`, or behind
        symmetric NAT the NAT's public address with the WireGuard port. No peer can
        send to a symmetric mapping it has not seen, but the address lets a peer behind
        an address-filtering NAT open its filter towards it by port prediction
        (:mod:`agent.paths.predict`); the listen port, not the port one STUN server
        saw, keeps the candidate stable across netchecks."""
        if self.nat_type is not NatType.SYMMETRIC or self.local is None:
            return self.usable_reflexive
        mapped = next((p.mapped for p in self.probes if p.mapped is not None), None)
        return None if mapped is None else format_endpoint(mapped[0], self.local[1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "nat_type": str(self.nat_type),
            "reflexive": format_endpoint(*self.reflexive) if self.reflexive else None,
            "local": format_endpoint(*self.local) if self.local else None,
            "evidence": self.evidence,
            "checked_at": self.checked_at,
            "servers": [p.to_dict() for p in self.probes],
            "relays": [r.to_dict() for r in self.relays],
        }


def classify(
    probes: Sequence[Probe],
    local: Addr | None,
    now: float,
    relays: Sequence[RelayProbe] = (),
) -> NetReport:
    """Decide the NAT type from the probes' answers and the local ``(ip, port)``."""
    nat, reflexive, evidence = _decide(probes, local)
    return NetReport(nat, reflexive, local, tuple(probes), evidence, now, tuple(relays))


def _decide(probes: Sequence[Probe], local: Addr | None) -> tuple[NatType, Addr | None, str]:
    answered = [p for p in probes if p.mapped is not None]
    if not answered:
        return NatType.UDP_BLOCKED, None, f"no answer from {_servers(probes)}"
    seen = {p.mapped for p in answered}
    first = answered[0].mapped
    if len(seen) > 1:
        return NatType.SYMMETRIC, None, f"different mappings per server: {_mappings(answered)}"
    if first == local:
        return NatType.OPEN, first, f"{_servers(answered)} saw the local address unchanged"
    if len(answered) == 1:
        why = f"only {_servers(answered)} answered ({_mappings(answered)}); EIM or symmetric?"
        return NatType.UNKNOWN, first, why
    return NatType.EIM, first, f"the same mapping for every server: {_mappings(answered)}"


def _servers(probes: Sequence[Probe]) -> str:
    return ", ".join(format_endpoint(*p.server) for p in probes)


def _mappings(probes: Sequence[Probe]) -> str:
    return ", ".join(
        f"{format_endpoint(*p.server)} -> {format_endpoint(*p.mapped)}" for p in probes if p.mapped
    )


async def run_netcheck(
    servers: Sequence[Addr],
    port: int,
    *,
    wait: float = 1.5,
    query: Query = raw_stun_query,
    clock: Clock = time.time,
    relays: Sequence[RelayEndpoint] = (),
    ping: Ping = ping_relay,
) -> NetReport:
    """Probe ``servers`` (host names allowed; IPv4) from UDP ``port`` and classify;
    PING ``relays`` meanwhile.

    With a single server, its OTHER-ADDRESS (if any) is probed as the second one.
    ``OSError`` from the raw socket (no CAP_NET_RAW) propagates.
    """
    targets = [await resolve_ipv4(s) for s in servers]
    if not targets:
        raise ValueError("netcheck needs at least one STUN server")
    relay_task = asyncio.ensure_future(check_relays(relays, wait=wait, ping=ping))
    try:
        first = await _probe(query, targets[0], port, wait)
        if len(targets) == 1 and first.other_address is not None:
            targets.append(first.other_address)
        rest = await asyncio.gather(*(_probe(query, t, port, wait) for t in targets[1:]))
        local = await _local_address(targets[0], port)
        relay_probes = await relay_task
    finally:
        relay_task.cancel()
    return classify([first, *rest], local, clock(), relay_probes)


async def check_relays(
    relays: Sequence[RelayEndpoint], *, wait: float = 1.5, ping: Ping = ping_relay
) -> list[RelayProbe]:
    """PING every relay's control port at once; each gets ``wait`` seconds."""
    return list(await asyncio.gather(*(_ping(ping, r, wait) for r in relays)))


async def _ping(ping: Ping, relay: RelayEndpoint, wait: float) -> RelayProbe:
    try:
        result = await ping((relay.host, relay.port), wait)
    except WiregateError as exc:
        return RelayProbe(relay, error=exc.message)
    except OSError as exc:  # unresolvable name, no route
        return RelayProbe(relay, error=exc.strerror or str(exc))
    return RelayProbe(relay, rtt=result.rtt)


async def fetch_relays(
    server: str, token: str, *, ca_file: Path | None = None
) -> tuple[RelayEndpoint, ...]:
    """The relays the gateway at ``server`` knows (``GET /api/v1/relays``, device token);
    its HTTPS is verified with the system store plus ``ca_file``.

    Raises :class:`~wiregate.errors.Unavailable` when the gateway cannot be reached
    or answers nonsense, the mapped API error when it refuses.
    """
    headers = {"Authorization": f"Bearer {token}"}
    tls = aiohttp.TCPConnector(ssl=client_context(ca_file))
    try:
        async with (
            aiohttp.ClientSession(timeout=_HTTP_TIMEOUT, connector=tls) as session,
            session.get(server.rstrip("/") + "/api/v1/relays", headers=headers) as resp,
        ):
            data = await resp.json(content_type=None)
            if resp.status >= 400:
                raise from_api_response(resp.status, data)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        refusal = tls_refusal(server, exc)
        if refusal is not None:
            raise Unavailable(refusal, code="tls") from exc
        raise Unavailable(f"cannot get the relays from the gateway at {server}: {exc}") from exc
    try:
        return parse_relays([f"{r['id']}={r['control']}" for r in data["relays"]])
    except (KeyError, TypeError, WiregateError) as exc:
        raise Unavailable(f"the gateway sent a malformed relay list: {exc}") from exc


async def _probe(query: Query, server: Addr, port: int, wait: float) -> Probe:
    try:
        answer = await query(server, port, wait)
    except WiregateError as exc:
        return Probe(server, error=exc.message)
    response = answer.response
    return Probe(server, response.mapped, answer.rtt, response.other_address)


async def _local_address(server: Addr, port: int) -> Addr | None:
    """The source address the kernel picks towards ``server`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(server)
        except OSError:
            return None
        return str(sock.getsockname()[0]), port
