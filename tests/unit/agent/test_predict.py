"""Port prediction's planning core: which probes, towards what, how many, how fast."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.discovery.netcheck import NatType
from agent.paths.predict import (
    MAX_PROBES,
    MAX_RATE,
    PredictionPlan,
    plan_prediction,
    prediction_applies,
)


def test_the_published_port_first_then_the_nearest_ones() -> None:
    plan = plan_prediction("198.51.100.14:51820", 100.0, probes=7, rate=100.0)
    assert plan == PredictionPlan(
        "198.51.100.14", (51820, 51821, 51819, 51822, 51818, 51823, 51817), 0.01, 100.0
    )
    assert plan.duration == pytest.approx(0.06)


def test_ports_stay_in_the_unprivileged_range() -> None:
    low = plan_prediction("198.51.100.14:1025", 0.0, probes=5)
    high = plan_prediction("198.51.100.14:65534", 0.0, probes=4)
    assert low is not None and low.ports == (1025, 1026, 1024, 1027, 1028)
    assert high is not None and high.ports == (65534, 65535, 65533, 65532)


def test_budget_and_rate_are_clamped() -> None:
    plan = plan_prediction("198.51.100.14:30000", 0.0, probes=100_000, rate=1e9)
    assert plan is not None
    assert len(plan.ports) == MAX_PROBES == len(set(plan.ports))
    assert plan.interval == pytest.approx(1 / MAX_RATE)
    one = plan_prediction("198.51.100.14:30000", 0.0, probes=0, rate=0.0)
    assert one is not None and one.ports == (30000,) and one.interval == 1.0


@pytest.mark.parametrize(
    "endpoint",
    [
        "10.1.2.3:51820",  # private: no NAT publishes it
        "192.168.1.9:51820",
        "100.64.0.7:51820",  # shared address space (the tunnel's own)
        "127.0.0.1:51820",
        "169.254.169.254:80",  # metadata
        "0.0.0.0:51820",
        "224.0.0.1:51820",
        "[2001:db8::1]:51820",  # IPv4 only (the raw socket is)
        "not an endpoint",
    ],
)
def test_never_towards_anything_but_a_public_ipv4_address(endpoint: str) -> None:
    assert plan_prediction(endpoint, 0.0) is None


def test_only_an_easy_mapping_predicts_towards_a_symmetric_peer() -> None:
    assert prediction_applies(NatType.EIM, NatType.SYMMETRIC)
    for ours in NatType:
        for theirs in (*NatType, None):
            if (ours, theirs) != (NatType.EIM, NatType.SYMMETRIC):
                assert not prediction_applies(ours, theirs)


@given(st.integers(1, 65535), st.integers(-5, 2000), st.floats(0.0, 1e6))
def test_every_plan_is_bounded_and_distinct(port: int, probes: int, rate: float) -> None:
    plan = plan_prediction(f"203.0.113.9:{port}", 5.0, probes=probes, rate=rate)
    assert plan is not None
    assert len(plan.ports) <= MAX_PROBES and len(set(plan.ports)) == len(plan.ports)
    assert all(1024 <= p <= 65535 for p in plan.ports)
    assert plan.interval >= 1 / MAX_RATE
