"""The kernel fast path's adapter: applies :mod:`relay.kernelpath` through :mod:`wiregate.nft`.

:class:`KernelPath` owns the relay's nftables table for one life of the process:

* ``start`` replaces whatever table a previous life left (a relay killed with -9
  leaves its rules; the agents rebind) and deletes the conntrack entries of the
  relay ports, so no stale NAT binding survives;
* ``reconcile`` (after each new binding, and on the housekeeping timer) reads the
  per-side counters back, marks the pairs that carried traffic active in the core,
  runs the core's idle expiry, then brings the table in step with the core's bound
  pairs in one nftables transaction and deletes the conntrack entries of every
  pair added or removed (conntrack decides NAT on a flow's first packet: an entry
  left by the bind exchange, or by a removed pair, would otherwise win);
* ``close`` removes the table and those conntrack entries.

A table found missing or out of step (a firewall reload flushed the ruleset) is
rebuilt empty and every pair installed again. nftables runs in a worker thread
(libnftables releases the GIL): listing the counters of thousands of pairs takes
a few hundred milliseconds, which must not stall the event loop.

:func:`kernel_refusal` says why the kernel path cannot run here (nftables missing,
``net.ipv4.ip_forward`` off); permissions are proved by creating the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from pyroute2.conntrack import AsyncConntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from relay.forwarding import Relay
from relay.kernelpath import (
    DROP_COUNTERS,
    Counters,
    Installed,
    KernelLimits,
    SideKey,
    kernel_pairs,
    parse_counters,
    plan,
    render_remove_table,
    render_table,
    table_name,
)
from relay.metrics import KernelMetrics
from relay.tickets import PairKey
from wiregate.clock import Clock
from wiregate.errors import ConfigError
from wiregate.logging import get_logger
from wiregate.nft import Nft, NftError, nft_available

__all__ = ["KernelPath", "forget_flows", "kernel_refusal", "limits_for", "start_kernel_path"]

log = get_logger("relay.kernelpath")

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
STATUS = Path("/proc/self/status")
_CAP_NET_ADMIN = 12
KERNEL_LIMIT_MAX = 18_000_000_000  # rate + burst (bytes) an nftables byte limit accepts


def kernel_refusal(ip_forward: Path = IP_FORWARD, status: Path = STATUS) -> str | None:
    """Why the kernel path cannot run in this network namespace, or None."""
    if not nft_available():
        return "nftables is not installed (libnftables.so.1 or nft)"
    if not _has_net_admin(status):
        return "the relay lacks CAP_NET_ADMIN"
    try:
        forwarding = ip_forward.read_text().strip()
    except OSError as exc:
        return f"cannot read {ip_forward}: {exc.strerror}"
    if forwarding != "1":
        return "net.ipv4.ip_forward is 0 in the relay's network namespace"
    return None


def _has_net_admin(status: Path) -> bool:
    """Whether CAP_NET_ADMIN is in this process's effective set (True if unknowable:
    creating the table then decides)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


Forget = Callable[[frozenset[int], str | None], Awaitable[None]]


async def forget_flows(ports: frozenset[int], address: str | None) -> None:
    """Delete the conntrack entries of UDP flows to ``ports`` (either direction), only
    those to ``address`` when it is given (a relay on one address)."""
    ct = AsyncConntrack()
    try:
        query = NFCTAttrTuple(proto=socket.IPPROTO_UDP)
        doomed = [e async for e in await ct.dump_entries(tuple_orig=query)]
        for entry in doomed:
            ends = (entry.tuple_orig, entry.tuple_reply)
            if any(end.dport in ports and address in (None, end.daddr) for end in ends):
                with contextlib.suppress(OSError, NetlinkError):  # gone meanwhile
                    await ct.delete(entry)
    finally:
        ct.close()


class KernelPath:
    """The relay's nftables table and the conntrack entries of its ports."""

    def __init__(
        self,
        limits: KernelLimits,
        core: Relay,
        *,
        clock: Clock,
        metrics: KernelMetrics,
        nft: Nft | None = None,
        forget: Forget | None = None,
    ) -> None:
        self.limits, self._core, self._clock, self._metrics = limits, core, clock, metrics
        self._nft = nft if nft is not None else Nft()
        self._forget = forget if forget is not None else forget_flows
        self.installed: dict[PairKey, Installed] = {}
        self._serial = 1
        self._seen: dict[str | SideKey, tuple[int, int]] = {}  # counter -> last values read
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._expire = False  # a timer tick is pending
        self._closed = False
        self._created = False  # the table exists (start got that far)

    async def start(self) -> None:
        """Replace any earlier table with an empty one; raises NftError when refused."""
        await self._run_nft(render_table(self.limits))
        self._created = True
        await self._forget_flows(self.limits.relay_ports)
        self._metrics.serve(lambda: len(self.installed))
        log.info("relay kernel path on", table=self.limits.table)

    # --- triggers ----------------------------------------------------------------------------

    def changed(self) -> None:
        """The core's bindings changed: reconcile soon (coalesced; never concurrently)."""
        self._trigger(expire=False)

    def housekeeping(self) -> None:
        """The timer: counters read back, idle expiry, then reconcile."""
        self._trigger(expire=True)

    def _trigger(self, *, expire: bool) -> None:
        if self._closed:
            return
        self._expire = self._expire or expire
        if self._task is not None and not self._task.done():
            self._again = True  # the running pass goes round once more
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            self._again = True
            while self._again and not self._closed:
                self._again, expire, self._expire = False, self._expire, False
                await self.reconcile(expire=expire)
        except NftError as exc:
            log.warning("relay kernel path update refused", error=exc.message)
        except (OSError, NetlinkError) as exc:
            log.warning("relay kernel path conntrack update failed", error=str(exc))

    # --- reconcile ---------------------------------------------------------------------------

    async def reconcile(self, *, expire: bool = False) -> None:
        """Bring the table in step with the core (see the module's docstring)."""
        async with self._lock:
            if self._closed:
                return
            now = self._clock()
            try:
                counters = await asyncio.to_thread(self._read_counters)
            except NftError as exc:  # e.g. a firewall reload flushed the ruleset
                log.warning("relay kernel table unreadable: rebuilt", error=exc.message)
                await self._rebuild()
            else:
                self._account(counters, now)
            if expire:
                self._core.expire(now)
            try:
                await self._apply()
            except NftError as exc:  # the table is not what we think: start it over
                log.warning("relay kernel table out of step: rebuilt", error=exc.message)
                await self._rebuild()
                await self._apply()

    def _read_counters(self) -> Counters:
        """The sides' element counters and the drop counters (in a worker thread: with
        thousands of pairs a listing takes a few hundred milliseconds)."""
        t = f"inet {self.limits.table}"
        sides = self._nft.query_json(f"list set {t} forwarded4")
        return parse_counters(sides, self._nft.query_json(f"list counters table {t}"))

    async def _run_nft(self, script: str) -> None:
        """One transaction, off the event loop (libnftables releases the GIL)."""
        await asyncio.to_thread(self._nft.run, script)

    def _account(self, counters: Counters, now: float) -> None:
        """Counter deltas into metrics; a pair whose counters moved is active now."""
        for name in DROP_COUNTERS:
            packets, _ = self._delta(name, counters)
            self._metrics.dropped(name, packets)
        active: set[PairKey] = set()
        for key, inst in self.installed.items():
            for index in range(2):
                packets, size = self._delta(inst.counter(index), counters)
                self._metrics.forwarded(packets, size)
                if packets > 0:
                    active.add(key)
        self._core.touch(active, now)

    def _delta(self, name: str | SideKey, counters: Counters) -> tuple[int, int]:
        now = (counters.packets(name), counters.bytes(name))
        then = self._seen.get(name, (0, 0))
        self._seen[name] = now
        if now[0] < then[0]:  # a table replaced underneath: start over from its values
            return now
        return now[0] - then[0], now[1] - then[1]

    async def _apply(self) -> None:
        desired = kernel_pairs(self._core.allocations())
        step = plan(self.installed, desired, self.limits, self._serial)
        if not step.script:
            return
        await self._run_nft(step.script)
        self._serial = step.next_serial
        for inst in step.removed:
            del self.installed[inst.pair.pair]
            for index in range(2):
                self._seen.pop(inst.counter(index), None)
        for inst in step.added:
            self.installed[inst.pair.pair] = inst
        ports = [s.relay_port for i in (*step.removed, *step.added) for s in i.pair.sides]
        await self._forget_flows(ports)
        if step.added or step.removed:
            log.info(
                "relay kernel pairs",
                added=len(step.added),
                removed=len(step.removed),
                installed=len(self.installed),
            )

    async def _rebuild(self) -> None:
        """An empty table again (every pair to be installed afresh), no stale flow."""
        await self._run_nft(render_table(self.limits))
        self.installed.clear()
        self._seen.clear()
        await self._forget_flows(self.limits.relay_ports)

    async def _forget_flows(self, ports: Iterable[int]) -> None:
        wanted = frozenset(ports)
        if wanted:
            await self._forget(wanted, self.limits.source)

    # --- shutdown ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Remove the table and the relay ports' conntrack entries; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if not self._created:
            return
        async with self._lock:
            try:
                await self._run_nft(render_remove_table(self.limits))
                await self._forget_flows(self.limits.relay_ports)
            except (NftError, OSError, NetlinkError) as exc:
                log.warning("relay kernel path cleanup failed", error=str(exc))
            self.installed.clear()
        log.info("relay kernel path off", table=self.limits.table)


async def start_kernel_path(
    mode: str,
    core: Relay,
    host: str,
    *,
    clock: Clock,
    metrics: KernelMetrics,
    ip_forward: Path = IP_FORWARD,
) -> KernelPath | None:
    """The kernel path for ``core`` as ``mode`` (``auto``/``kernel``/``userspace``) asks.

    ``auto`` falls back to the userspace path with one log line saying why;
    ``kernel`` raises :class:`~wiregate.errors.ConfigError` instead.
    """
    refusal = None if mode != "userspace" else "forward_path is userspace"
    path: KernelPath | None = None
    if refusal is None and _is_loopback(host):
        refusal = "the relay ports listen on loopback"
    if refusal is None:
        refusal = kernel_refusal(ip_forward)
    if refusal is None:
        try:
            path = KernelPath(limits_for(core, host), core, clock=clock, metrics=metrics)
            await path.start()
        except (NftError, OSError, NetlinkError) as exc:
            refusal = f"cannot program nftables/conntrack here ({exc}): CAP_NET_ADMIN needed"
            if path is not None:
                await path.close()  # nothing half-made stays behind
            path = None
    if path is None:
        if mode == "kernel":
            raise ConfigError(
                f"forward_path is kernel but {refusal}",
                hint='grant CAP_NET_ADMIN, set net.ipv4.ip_forward=1, or use forward_path="auto"',
            )
        if mode == "auto":
            log.info("relay kernel path off: forwarding in userspace", reason=refusal)
        metrics.path("userspace")
        return None
    metrics.path("kernel")
    core.on_change = path.changed
    return path


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def limits_for(core: Relay, host: str) -> KernelLimits:
    """The table's parameters from the core's configuration and the ports' address."""
    config = core.config
    try:
        ip = ipaddress.ip_address(host)
        source = str(ip) if ip.version == 4 and not ip.is_unspecified else None
    except ValueError:
        source = None
    # the kernel refuses a byte limit whose rate plus burst exceeds 2^64 ns-scaled
    # (~1.8e10 bytes/s, 147 Gbit/s): beyond that a quota is no limit anyway, so cap it
    burst = min(max(1, int(config.burst_bytes)), KERNEL_LIMIT_MAX // 2)
    rate = min(max(1, int(config.bytes_per_second)), KERNEL_LIMIT_MAX - burst)
    return KernelLimits(
        relay_ports=tuple(config.ports),
        source=source,
        bytes_per_second=rate,
        burst_bytes=burst,
        max_datagram=config.max_datagram,
        table=table_name(config.relay_id),
    )
