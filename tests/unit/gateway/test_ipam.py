"""IPAM: next-fit allocation of host indexes in the tunnel pools."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mapping.ipam import Pool, allocate
from wiregate.errors import Conflict

SMALL = Pool.parse("10.9.0.0/29", "fd00:9::/120")  # 6 hosts in IPv4


def test_first_allocation_skips_network_address() -> None:
    a = allocate(SMALL, set(), 0)
    assert (a.index, a.ipv4, a.ipv6) == (1, "10.9.0.1", "fd00:9::1")


def test_ipv6_uses_same_index_as_ipv4() -> None:
    a = SMALL.addresses(5)
    assert a.ipv4 == "10.9.0.5" and a.ipv6 == "fd00:9::5"
    assert SMALL.index_of("10.9.0.5") == 5


def test_broadcast_is_never_handed_out() -> None:
    assert SMALL.size == 6
    with pytest.raises(ValueError):
        SMALL.addresses(7)  # 10.9.0.7 is the broadcast address


def test_next_fit_prefers_never_used_over_released() -> None:
    # 1 and 2 were handed out, 1 was released: next is 3, not 1.
    assert allocate(SMALL, {2}, 2).index == 3


def test_released_index_reused_only_after_wrap() -> None:
    assert allocate(SMALL, {2, 3, 4, 5, 6}, 6).index == 1


def test_exhaustion_raises_conflict() -> None:
    with pytest.raises(Conflict) as info:
        allocate(SMALL, set(range(1, 7)), 3)
    assert info.value.status == 409 and info.value.code == "pool_exhausted"


def test_pool_size_limited_by_smaller_family() -> None:
    pool = Pool.parse("10.0.0.0/16", "fd00::/120")
    assert pool.size == 255


def test_pool_rejects_wrong_families_and_tiny_pools() -> None:
    with pytest.raises(ValueError):
        Pool.parse("fd00::/64", "fd00::/64")
    with pytest.raises(ValueError):
        Pool.parse("10.0.0.0/31", "fd00::/64")


def test_index_of_refuses_outside_pool() -> None:
    with pytest.raises(ValueError):
        SMALL.index_of("10.9.0.7")


ops = st.lists(st.one_of(st.just("alloc"), st.integers(min_value=0, max_value=50)), max_size=80)


@settings(max_examples=300)
@given(ops)
def test_random_allocate_release_sequences(sequence: list[object]) -> None:
    live: dict[int, str] = {}
    cursor = 0
    for op in sequence:
        if op == "alloc":
            if len(live) == SMALL.size:
                with pytest.raises(Conflict):
                    allocate(SMALL, live, cursor)
                continue
            a = allocate(SMALL, live, cursor)
            assert a.index not in live
            assert ipaddress.ip_address(a.ipv4) in SMALL.ipv4
            assert ipaddress.ip_address(a.ipv6) in SMALL.ipv6
            assert a.ipv4 not in {"10.9.0.0", "10.9.0.7"}
            live[a.index] = a.ipv4
            cursor = a.index
        elif live:
            live.pop(sorted(live)[int(str(op)) % len(live)])
        assert len(set(live.values())) == len(live)


@given(st.sets(st.integers(min_value=1, max_value=6)), st.integers(min_value=0, max_value=6))
def test_next_fit_picks_first_free_after_cursor(in_use: set[int], cursor: int) -> None:
    free_after = [i for i in [*range(cursor + 1, 7), *range(1, cursor + 1)] if i not in in_use]
    if not free_after:
        with pytest.raises(Conflict):
            allocate(SMALL, in_use, cursor)
    else:
        assert allocate(SMALL, in_use, cursor).index == free_after[0]
