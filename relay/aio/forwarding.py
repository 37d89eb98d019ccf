"""asyncio glue for the WireGuard relay: a control port, a pool of relay ports, metrics.

:class:`~relay.aio.stun.RelayServer` binds the sockets (the control port, then
the relay ports) and hands them to :class:`RelayForwarder`. Every socket feeds
the one sans-IO :class:`~relay.forwarding.Relay` and sends what it returns from
the socket of the port it names; a timer runs ``Relay.expire``. Nothing else
happens here. The core's :class:`~relay.forwarding.RelayConfig` is completed
with the bound ports (port 0 in the settings means an ephemeral port, for tests).
Where ``forward_path`` permits, :mod:`relay.aio.kernelpath` has the kernel forward
the core's bound pairs; the timer then reads the kernel's counters back before
the core's expiry runs.

:func:`forwarding_from_settings` builds the :class:`ForwardingSettings` from the
``[relay]`` settings: ``relay_id`` empty means no forwarding (STUN only);
otherwise the trusted signers come from ``verify_keys_file``, a JSON document
``{"signers": [{"public_key": "<base64 Ed25519 verify key>", "tenants": ["default"]}]}``
(what the gateway serves at ``GET /api/v1/relay/signers``), or from that URL itself
(``signers_url``, fetched by :mod:`relay.aio.signers`; until it first answers the
relay has no signer and admits nobody). Exactly one of the two. Forwarding without
a signer is refused (fail closed).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from relay.aio.batchio import BatchSocket
from relay.aio.kernelpath import KernelPath, start_kernel_path
from relay.filters import normalize_ip
from relay.forwarding import Relay, RelayConfig
from relay.metrics import ForwardingMetrics, KernelMetrics
from relay.tickets import MAX_TEXT, TrustedSigner
from wiregate.clock import Clock
from wiregate.errors import ConfigError
from wiregate.logging import get_logger
from wiregate.net import parse_hostport
from wiregate.settings import RelaySettings, parse_port_range

__all__ = [
    "ForwardingSettings",
    "RelayForwarder",
    "forwarding_from_settings",
    "is_local_address",
    "load_verify_keys",
    "parse_signers",
    "signers_document",
]

log = get_logger("relay.forwarding")

#: Datagrams read per system call, and batches handled per wake-up before the
#: loop gets a turn (so one busy port cannot starve the others or the timers).
BATCH = 64
ROUNDS = 8
#: Receive and send buffer of each relay socket: absorbs bursts while the loop
#: is busy elsewhere. Memory is only charged for datagrams actually queued.
SOCKET_BUFFER = 4 << 20


@dataclass(frozen=True, slots=True)
class ForwardingSettings:
    """Where the relay listens and what it admits.

    ``relay_ports`` are bound on ``host`` (0 = ephemeral); ``config`` carries the
    relay id and limits (its ``control_port`` and ``ports`` are replaced by the
    bound ones). ``secret`` keys the bind cookies; random if not given.
    """

    host: str
    control_port: int
    relay_ports: tuple[int, ...]
    config: RelayConfig
    verify_keys: tuple[TrustedSigner, ...]
    secret: bytes | None = None
    housekeeping_interval: float = 5.0
    signers_url: str = ""  # fetched by relay.aio.signers; verify_keys is then empty at start
    signers_ca_file: Path | None = None
    signers_refresh: float = 60.0  # seconds between fetches once the signers are known
    signers_retry: float = 1.0  # first delay after a failed fetch (doubles, up to 30 s)
    # seconds between conditional fetches of the gateway's revocation document (next to
    # signers_url): a removed device loses its allocations within about this long
    revocations_refresh: float = 1.0
    forward_path: str = "userspace"  # "auto" | "kernel" | "userspace" (relay.aio.kernelpath)


class RelayForwarder:
    """Binds the relay's sockets, runs the core and its housekeeping timer."""

    def __init__(
        self,
        settings: ForwardingSettings,
        registry: CollectorRegistry,
        *,
        clock: Clock = time.time,
    ) -> None:
        self._settings, self._clock = settings, clock
        self._socks: dict[int, socket.socket] = {}
        self._batch: dict[int, BatchSocket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.core: Relay | None = None
        self.control_address: tuple[str, int] | None = None
        self.relay_ports: tuple[int, ...] = ()
        self._metrics = ForwardingMetrics(registry)
        self._kernel_metrics = KernelMetrics(registry)
        self.kernel: KernelPath | None = None  # the kernel fast path, when on
        self._verify_keys = settings.verify_keys

    async def start(self, socks: Sequence[socket.socket]) -> None:
        """Serve on bound sockets: the control port first, then the relay ports."""
        bound = [(str(sock.getsockname()[0]), int(sock.getsockname()[1])) for sock in socks]
        self.control_address, self.relay_ports = bound[0], tuple(p for _, p in bound[1:])
        core = self.core = self._make_core(bound[0], self.relay_ports)
        self._metrics.serve(
            core.config.relay_id,
            core.load,
            lambda: (core.counters, core.forwarded_bytes, core.allocations_created),
        )
        loop = self._loop = asyncio.get_running_loop()
        for sock, (_, port) in zip(socks, bound, strict=True):
            sock.setblocking(False)
            tune_buffers(sock, SOCKET_BUFFER)
            self._socks[port], self._batch[port] = sock, BatchSocket(sock)
            loop.add_reader(sock.fileno(), self._readable, port)
        self.kernel = await start_kernel_path(
            self._settings.forward_path,
            core,
            bound[0][0],
            clock=self._clock,
            metrics=self._kernel_metrics,
        )
        self._schedule()
        log.info("relay forwarding", control=self.control_address, ports=len(self.relay_ports))

    def _make_core(self, control: tuple[str, int], relay_ports: Sequence[int]) -> Relay:
        s = self._settings
        own = s.config.own_addresses
        if not normalize_ip(control[0]).is_unspecified:
            own = (*own, control[0])
        config = replace(
            s.config,
            control_port=control[1],
            ports=tuple(relay_ports),
            own_addresses=own,
            local_addresses=tuple(a for a in own if is_local_address(a)),
        )
        secret = s.secret if s.secret is not None else secrets.token_bytes(32)
        return Relay(config, self._verify_keys, secret=secret)

    def set_verify_keys(self, signers: Sequence[TrustedSigner]) -> None:
        """Trust exactly ``signers`` from now on (sessions already admitted are kept)."""
        self._verify_keys = tuple(signers)
        if self.core is not None:
            self.core.verify_keys = list(signers)

    def revoke(self, revoked: Mapping[tuple[str, str], float]) -> None:
        """Apply the gateway's list of removed devices (:meth:`Relay.revoke`); the kernel
        path follows the released allocations at its next reconcile, started at once."""
        if self.core is not None:
            released = self.core.revoke(revoked)
            if released:
                log.info("relay allocations revoked", released=released, devices=len(revoked))

    def received(self, data: bytes, src: tuple[str, int], port: int) -> None:
        """One datagram in; whatever the core returns, out."""
        self._handle([(data, src)], port)

    def _readable(self, port: int) -> None:
        """Drain a socket: up to ``ROUNDS`` batches, each handled and sent as a batch."""
        batch = self._batch.get(port)
        for _ in range(ROUNDS):
            if batch is None:
                return
            try:
                datagrams = batch.recv_batch(BATCH)
            except OSError as exc:
                log.debug("relay socket error", port=port, error=str(exc))
                return
            if datagrams:
                self._handle(datagrams, port)
            if len(datagrams) < BATCH:
                return

    def _handle(self, datagrams: list[tuple[bytes, tuple[str, int]]], port: int) -> None:
        if self.core is not None:
            self._send(self.core.handle_batch(datagrams, port, self._clock()))

    def _send(self, out: Mapping[int, list[tuple[bytes, tuple[str, int]]]]) -> None:
        for port, items in out.items():
            batch = self._batch.get(port)
            if batch is None:
                continue
            try:
                batch.send_batch(items)
            except (OSError, ValueError) as exc:
                log.debug("relay send failed", port=port, error=str(exc))

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._settings.housekeeping_interval, self._housekeeping)

    def _housekeeping(self) -> None:
        if self.kernel is not None:  # counters read back first: kernel traffic is activity
            self.kernel.housekeeping()
        elif self.core is not None:
            self.core.expire(self._clock())
        self._schedule()

    async def close_kernel(self) -> None:
        """Remove the kernel fast path's rules (before the sockets close)."""
        if self.kernel is not None:
            await self.kernel.close()

    def close(self) -> None:
        """Stop the timer and close every socket; safe to call twice."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sock in self._socks.values():
            if self._loop is not None and sock.fileno() >= 0 and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._socks.clear()
        self._batch.clear()


def tune_buffers(sock: socket.socket, size: int) -> None:
    """Receive and send buffers of ``size`` bytes: beyond the sysctl caps when allowed
    (``SO_*BUFFORCE`` needs CAP_NET_ADMIN), else as large as the caps let them be."""
    for force, plain in (
        (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
        (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
    ):
        if force is not None and _setsockopt(sock, force, size):
            continue
        if not _setsockopt(sock, plain, size):  # not fatal: the default buffers still work
            log.debug("socket buffer not set", option=plain, size=size)


def _setsockopt(sock: socket.socket, option: int, value: int) -> bool:
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, value)
    except OSError:
        return False
    return True


def is_local_address(text: str) -> bool:
    """Whether ``text`` is a non-loopback address configured on this host (it can be bound).

    Loopback is left out: with ``route_localnet`` (set by kube-proxy) Linux
    accepts 127/8 sources from outside, so they prove nothing.
    """
    try:
        ip = normalize_ip(text)
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return False
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((str(ip), 0))
        except OSError:
            return False
    return True


_HINT = 'write {"signers": [{"public_key": "<base64>", "tenants": ["default"]}]}'


def forwarding_from_settings(settings: RelaySettings) -> ForwardingSettings | None:
    """The relay's forwarding settings, or None when ``relay_id`` is empty.

    Raises :class:`~wiregate.errors.ConfigError` for anything unusable, including
    forwarding with no verify keys file or no signer in it.
    """
    if not settings.relay_id:
        return None
    if settings.verify_keys_file is None and not settings.signers_url:
        raise ConfigError(
            "relay_id is set but neither verify_keys_file nor signers_url is: the relay would"
            " admit nobody",
            hint="set signers_url to the gateway's URL of GET /api/v1/relay/signers, or save "
            "that document into a file and set verify_keys_file",
        )
    if settings.verify_keys_file is not None and settings.signers_url:
        raise ConfigError(
            "verify_keys_file and signers_url are both set: give exactly one",
            hint="signers_url follows the gateway's key rotations; a file does not",
        )
    if settings.burst_bytes < settings.max_datagram:
        raise ConfigError("burst_bytes must be at least max_datagram")
    host, control_port = parse_hostport(
        settings.relay_listen, allow_port_zero=True, what="relay_listen"
    )
    return ForwardingSettings(
        host=host,
        control_port=control_port,
        relay_ports=_ports(settings.relay_ports),
        config=_core_config(settings),
        verify_keys=(
            () if settings.verify_keys_file is None else load_verify_keys(settings.verify_keys_file)
        ),
        signers_url=settings.signers_url,
        signers_ca_file=settings.signers_ca_file,
        signers_refresh=settings.signers_refresh,
        forward_path=settings.forward_path,
    )


def _core_config(settings: RelaySettings) -> RelayConfig:
    """The core's limits; the control port and relay ports are filled in once bound."""
    return RelayConfig(
        relay_id=settings.relay_id,
        control_port=0,
        ports=(),
        own_addresses=tuple(settings.own_addresses),
        max_allocations=settings.max_allocations,
        max_allocations_per_device=settings.max_allocations_per_device,
        bytes_per_second=float(settings.bytes_per_second),
        burst_bytes=float(settings.burst_bytes),
        idle_timeout=settings.idle_timeout,
        max_datagram=settings.max_datagram,
    )


def _ports(text: str) -> tuple[int, ...]:
    try:
        return parse_port_range(text)
    except ValueError as exc:
        raise ConfigError(f"relay_ports: {exc}", hint='write "40000-40063"') from exc


def load_verify_keys(path: Path) -> tuple[TrustedSigner, ...]:
    """Read and parse a verify keys file; ConfigError when unreadable or invalid."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read verify_keys_file {path}: {exc.strerror}") from exc
    try:
        return signers_document(text)
    except ValueError as exc:
        raise ConfigError(f"verify_keys_file {path}: {exc}", hint=_HINT) from exc


def signers_document(text: bytes | str) -> tuple[TrustedSigner, ...]:
    """A signers document (a verify keys file, or the body of ``signers_url``) to
    trusted signers; ValueError naming what is wrong, on one line."""
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"not JSON: {exc}") from None
    return parse_signers(data)


def parse_signers(data: Any) -> tuple[TrustedSigner, ...]:
    """``{"signers": [...]}`` to trusted signers; ValueError naming what is wrong."""
    if not isinstance(data, dict) or set(data) != {"signers"}:
        raise ValueError('the document must be an object with only "signers"')
    raw = data["signers"]
    if not isinstance(raw, list) or not raw:
        raise ValueError("signers must be a non-empty list (no signer: every ticket refused)")
    signers = tuple(_signer(item, f"signers[{i}]") for i, item in enumerate(raw))
    if len({s.verify_key for s in signers}) != len(signers):
        raise ValueError("a public key is listed twice")
    return signers


def _signer(item: Any, where: str) -> TrustedSigner:
    if not isinstance(item, dict) or set(item) != {"public_key", "tenants"}:
        raise ValueError(f'{where} must be an object with "public_key" and "tenants" only')
    return TrustedSigner(_verify_key(item["public_key"], where), _tenants(item["tenants"], where))


def _verify_key(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{where}.public_key must be a string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}.public_key is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"{where}.public_key is not a 32-byte Ed25519 key")
    return raw


def _tenants(tenants: Any, where: str) -> frozenset[str]:
    if not isinstance(tenants, list) or not tenants:
        raise ValueError(f"{where}.tenants must be a non-empty list of strings")
    for tenant in tenants:
        if not isinstance(tenant, str) or not 1 <= len(tenant.encode()) <= MAX_TEXT:
            raise ValueError(f"{where}.tenants: each tenant is 1..{MAX_TEXT} bytes of text")
    return frozenset(tenants)
