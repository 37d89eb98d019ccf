"""The relay's allocation table (pure): relay ports, pairs, per-device quotas and buckets.

:class:`~relay.forwarding.Relay` speaks the protocol; this module only keeps
the books: which pair holds which two relay ports, which address each side
bound, how many allocations each device is in, and each device's byte bucket.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from relay.filters import IPAddress
from relay.tickets import Node, PairKey
from wiregate.keys import decode_key

__all__ = [
    "Addr",
    "Allocation",
    "AllocationPool",
    "AllocationView",
    "Bucket",
    "PoolExhausted",
    "Side",
]

Addr = tuple[str, int]
Device = tuple[str, str]  # (tenant, device id)


class PoolExhausted(Exception):
    """No allocation can be made; ``reason`` is ``relay_full`` or ``device_quota``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AllocationView:
    """An allocation seen from outside: the pair, its two ports, the bound addresses."""

    pair: PairKey
    ports: tuple[int, int]
    bound: tuple[Addr | None, Addr | None]
    last_active: float


@dataclass(slots=True)
class Bucket:
    """A token bucket counting bytes; time never runs backwards here."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, cost: float, now: float) -> bool:
        """Spend ``cost`` tokens if there are that many."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


@dataclass(slots=True)
class Side:
    """One side of an allocation: its relay port, its node, the address it bound."""

    port: int
    node: Node
    key: bytes
    device: Device
    addr: Addr | None = None
    ip: IPAddress | None = None
    ticket_id: bytes = b""

    def sent_by(self, ip: IPAddress, port: int) -> bool:
        """Whether ``(ip, port)`` is the bound address."""
        return self.addr is not None and self.ip == ip and self.addr[1] == port


@dataclass(slots=True)
class Allocation:
    """A relayed pair and its two sides (index 0 is ``pair.first``)."""

    pair: PairKey
    sides: tuple[Side, Side]
    last_active: float

    def view(self) -> AllocationView:
        """A frozen copy for callers outside the core."""
        first, second = self.sides
        return AllocationView(
            self.pair, (first.port, second.port), (first.addr, second.addr), self.last_active
        )


class AllocationPool:
    """Allocations by pair and by port, within ``capacity`` and ``per_device`` quotas."""

    def __init__(
        self, ports: Iterable[int], *, capacity: int, per_device: int, rate: float, burst: float
    ) -> None:
        self._free = list(dict.fromkeys(ports))
        self._capacity = min(capacity, len(self._free) // 2)
        self._per_device_max, self._rate, self._burst = per_device, rate, burst
        self._by_pair: dict[PairKey, Allocation] = {}
        self._by_port: dict[int, tuple[Allocation, int]] = {}
        self._per_device: Counter[Device] = Counter()
        self._buckets: dict[Device, Bucket] = {}
        self.created = 0  # allocations made since start

    def __len__(self) -> int:
        return len(self._by_pair)

    @property
    def capacity(self) -> int:
        """How many allocations fit: the configured maximum, or half the relay ports."""
        return self._capacity

    def __iter__(self) -> Iterator[Allocation]:
        return iter(list(self._by_pair.values()))

    def at_port(self, port: int) -> tuple[Allocation, int] | None:
        """The allocation a relay port belongs to and the side index it serves."""
        return self._by_port.get(port)

    def get_or_create(self, pair: PairKey, now: float) -> Allocation:
        """The pair's allocation, made if needed; raises :class:`PoolExhausted`."""
        alloc = self._by_pair.get(pair)
        return alloc if alloc is not None else self._create(pair, now)

    def _create(self, pair: PairKey, now: float) -> Allocation:
        if len(self._by_pair) >= self._capacity:
            raise PoolExhausted("relay_full")
        nodes = (pair.first, pair.second)
        devices = [(pair.tenant, n.device_id) for n in nodes]
        if any(self._per_device[d] >= self._per_device_max for d in devices):
            raise PoolExhausted("device_quota")
        first, second = (
            Side(self._free.pop(0), n, decode_key(n.public_key), d)
            for n, d in zip(nodes, devices, strict=True)
        )
        alloc = Allocation(pair, (first, second), now)
        self._by_pair[pair] = alloc
        self._by_port[first.port], self._by_port[second.port] = (alloc, 0), (alloc, 1)
        self._per_device.update(devices)
        self.created += 1
        return alloc

    def release(self, alloc: Allocation) -> None:
        """Forget ``alloc``: its ports go back to the pool, its devices' counts down."""
        del self._by_pair[alloc.pair]
        for side in alloc.sides:
            del self._by_port[side.port]
            self._free.append(side.port)
            self._per_device[side.device] -= 1
            if self._per_device[side.device] <= 0:
                del self._per_device[side.device]
                self._buckets.pop(side.device, None)

    def bucket(self, device: Device, now: float) -> Bucket:
        """The byte bucket of ``device``, shared by all its allocations."""
        bucket = self._buckets.get(device)
        if bucket is None:
            bucket = self._buckets[device] = Bucket(self._rate, self._burst, self._burst, now)
        return bucket
