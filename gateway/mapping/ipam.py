"""Tunnel address management (pure, no I/O).

A device gets one *host index* ``i`` in the pools: its IPv4 address is the
``i``-th address of the IPv4 pool and its IPv6 address the ``i``-th of the IPv6
pool, so both families agree. Index 0 (the network address) and the IPv4
broadcast address are never handed out.

Allocation is next-fit: the search starts just after the last index handed out
(the *cursor*) and wraps at the end of the pool. An index released by a deleted
device is therefore reused only after the whole pool has been cycled, so a stale
peer entry somewhere cannot suddenly point at a new device.

The store keeps the set of live indexes and the cursor; the database's UNIQUE
constraints back this module up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Container
from dataclasses import dataclass

from wiregate.errors import Conflict

__all__ = ["Allocation", "Pool", "allocate"]


@dataclass(frozen=True, slots=True)
class Allocation:
    """One host index and the two addresses it stands for."""

    index: int
    ipv4: str
    ipv6: str


@dataclass(frozen=True, slots=True)
class Pool:
    """The configured IPv4 and IPv6 tunnel pools."""

    ipv4: ipaddress.IPv4Network
    ipv6: ipaddress.IPv6Network

    @classmethod
    def parse(cls, ipv4: str, ipv6: str) -> Pool:
        """Build a pool from two CIDR strings (host bits must be zero)."""
        v4 = ipaddress.ip_network(ipv4, strict=True)
        v6 = ipaddress.ip_network(ipv6, strict=True)
        if not isinstance(v4, ipaddress.IPv4Network) or v4.num_addresses < 4:
            raise ValueError("the IPv4 pool must be an IPv4 network of /30 or larger")
        if not isinstance(v6, ipaddress.IPv6Network) or v6.num_addresses < 2:
            raise ValueError("the IPv6 pool must be an IPv6 network")
        return cls(v4, v6)

    @property
    def size(self) -> int:
        """The highest usable host index (indexes run from 1 to ``size``)."""
        return min(self.ipv4.num_addresses - 2, self.ipv6.num_addresses - 1)

    def addresses(self, index: int) -> Allocation:
        """The addresses of host index ``index``."""
        if not 1 <= index <= self.size:
            raise ValueError(f"host index {index} is outside the pool")
        return Allocation(index, str(self.ipv4[index]), str(self.ipv6[index]))

    def index_of(self, ipv4: str) -> int:
        """The host index of an IPv4 address of this pool."""
        index = int(ipaddress.IPv4Address(ipv4)) - int(self.ipv4.network_address)
        if not 1 <= index <= self.size:
            raise ValueError(f"{ipv4} is not a host address of {self.ipv4}")
        return index


def allocate(pool: Pool, in_use: Container[int], cursor: int) -> Allocation:
    """Next free host index after ``cursor`` (wrapping); :class:`Conflict` when full.

    ``in_use`` holds the indexes of live devices; the caller stores the returned
    index as the new cursor.
    """
    size = pool.size
    start = cursor % size if cursor > 0 else 0
    for step in range(size):
        index = (start + step) % size + 1
        if index not in in_use:
            return pool.addresses(index)
    raise Conflict(
        "the tunnel address pool is exhausted",
        code="pool_exhausted",
        hint="delete unused devices or configure a larger ipv4_pool",
    )
