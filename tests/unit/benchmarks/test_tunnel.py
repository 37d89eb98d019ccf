"""The tunnel benchmark's arithmetic: the median's confidence interval and the figures."""

from __future__ import annotations

import math

from benchmarks.tunnel import Sample, figures, half_ci, median_ci, semi_iqr


def test_the_median_interval_is_the_binomial_order_statistics() -> None:
    values = [float(v) for v in range(1, 25)]  # n = 24: the 7th and 18th values
    assert median_ci(values) == (7.0, 18.0)
    assert median_ci([float(v) for v in range(1, 16)]) == (4.0, 12.0)  # n = 15
    assert median_ci([float(v) for v in range(1, 31)]) == (10.0, 21.0)  # n = 30, the default
    assert median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few: the extremes
    assert all(math.isnan(x) for x in median_ci([]))
    assert half_ci(values) == 5.5
    assert semi_iqr(values) == 5.75


def test_figures_pair_each_round_with_the_hand_tunnel() -> None:
    hand = [Sample(1000.0, 500.0), Sample(800.0, 400.0), Sample(1200.0, 520.0)]
    results = {
        "hand": hand,
        "control": [Sample(s.mbps * 1.01, s.per_cpu) for s in hand],
        "wiregate": [Sample(s.mbps * 0.97, s.per_cpu * 0.9) for s in hand],
    }
    got = figures(results, 1440)
    assert got["tunnel_ratio"] == 0.97 and got["tunnel_control_ratio"] == 1.01
    assert got["tunnel_ratio_spread"] == 0.0 and got["tunnel_cpu_ratio"] == 0.9
    assert got["tunnel_hand_mbps"] == 1000.0 and got["tunnel_mtu"] == 1440.0
    assert got["tunnel_rounds"] == 3.0
