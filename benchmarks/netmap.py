"""Network-map core costs: full maps and the fan-out of one endpoint change.

``python -m benchmarks.netmap`` prints one JSON object of figures:

* ``netmap_full_10k_ms``: the ``full`` message text for a 10 000-peer view, as the broker
  builds it for the first agent to connect after a gateway start or load: a fresh
  :class:`NetworkState` each repetition, so no peer JSON is cached yet (cold);
* ``netmap_full_10k_warm_ms``: the same once every peer's JSON is cached (later connects);
* ``netmap_full_10k_netmap_json_ms``: :func:`full_map` + ``json.dumps(build_full(...))``;
* ``netmap_full_10k_filtered_ms`` / ``..._filtered_warm_ms``: the cold and warm full map when
  a policy file restricts ports between every pair (every peer entry carries a ``filter``);
* ``netmap_change_us_per_affected_peer``: one endpoint change seen by 9 999 peers;
* ``netmap_delta_bytes_10k``: bytes of the deltas that change pushes;
* ``netmap_slope``: log-log slope of change time against affected peers
  (N = 100, 1 000, 10 000; allow-all and ~N/10 groups).
"""

from __future__ import annotations

import functools
import json
import statistics
from dataclasses import replace

from benchmarks.common import emit, fleet, grouped_policy, loglog_slope, median_seconds
from gateway.mapping.netmap import (
    AgentUpdate,
    NetworkState,
    apply_upsert,
    encode_delta_body,
    encode_full,
    full_map,
)
from identity.policy import Policy
from identity.policy_file import parse_policy
from wiregate.mapwire import build_full, encode_delta
from wiregate.model import Device

SIZES = (100, 1_000, 10_000)
COLD_REPEAT = 9


def push_change(state: NetworkState, device: Device, version: int) -> tuple[int, int]:
    """Apply one change and encode every delta as the broker does: (messages, bytes)."""
    fanout = apply_upsert(state, device)
    bodies: dict[int, str] = {}
    messages = size = 0
    for agent, update in fanout.updates.items():
        body = bodies.get(id(update))
        if body is None:
            body = bodies[id(update)] = encode_delta_body(state, update)
        own = _self_text(state, agent, update)
        size += len(encode_delta(version - 1, version, own, body))
        messages += 1
    return messages, size


def _self_text(state: NetworkState, agent: str, update: AgentUpdate) -> str | None:
    return None if update.self_view is None else state.self_text(agent)


def measure_change(state: NetworkState, repeat: int) -> tuple[float, int, int]:
    """Median seconds of one endpoint change of device d0, with its messages and bytes."""
    base = state.device("d0")
    counter = iter(range(1, 1_000_000))
    last: list[tuple[int, int]] = []

    def change() -> None:
        n = next(counter)
        moved = replace(base, endpoints=(f"203.0.113.{n % 250}:{1024 + n}",))
        last.append(push_change(state, moved, n + 1))

    seconds = median_seconds(change, repeat)
    messages, size = last[-1]
    return seconds, messages, size


def measure_full(state: NetworkState) -> dict[str, float]:
    """Full-map figures for device d1 of ``state``, in milliseconds."""
    devices = list(state)
    cold = []
    for _ in range(COLD_REPEAT):
        fresh = NetworkState(state.policy, devices)
        cold.append(median_seconds(functools.partial(encode_full, fresh, "d1", 1), repeat=1))
    encode_full(state, "d1", 1)  # every peer's JSON cached
    return {
        "netmap_full_10k_ms": 1e3 * statistics.median(cold),
        "netmap_full_10k_warm_ms": 1e3 * median_seconds(lambda: encode_full(state, "d1", 1)),
        "netmap_full_10k_netmap_json_ms": 1e3
        * median_seconds(lambda: json.dumps(build_full(full_map(state, "d1", 1)))),
    }


def measure_filtered(devices: list[Device]) -> dict[str, float]:
    """Full-map figures when every peer of d1 is filtered (a policy with ports), in ms."""
    tagged = [replace(d, tags=("tag:a",)) for d in devices]
    acl = {"src": ["tag:a"], "dst": ["tag:a"], "ports": ["tcp:22", "icmp"]}
    policy = parse_policy({"acls": [acl]}).policy
    cold = []
    for _ in range(COLD_REPEAT):
        fresh = NetworkState(policy, tagged)
        cold.append(median_seconds(functools.partial(encode_full, fresh, "d1", 1), repeat=1))
    return {
        "netmap_full_10k_filtered_ms": 1e3 * statistics.median(cold),
        "netmap_full_10k_filtered_warm_ms": 1e3
        * median_seconds(lambda: encode_full(fresh, "d1", 1)),
    }


def run() -> dict[str, float]:
    """Measure every figure; see the module docstring."""
    results: dict[str, float] = {}
    affected: list[float] = []
    seconds: list[float] = []
    for n in SIZES:
        for grouped in (False, True):
            policy = grouped_policy() if grouped else Policy.allow_all()
            state = NetworkState(policy, fleet(n, grouped))
            repeat = 201 if n < 10_000 else 31
            took, messages, size = measure_change(state, repeat)
            affected.append(messages)
            seconds.append(took)
            if n == 10_000 and not grouped:
                results["netmap_change_us_per_affected_peer"] = took / messages * 1e6
                results["netmap_change_10k_ms"] = took * 1e3
                results["netmap_delta_bytes_10k"] = size
                results.update(measure_full(state))
                results.update(measure_filtered(list(state)))
    results["netmap_slope"] = loglog_slope(affected, seconds)
    return results


if __name__ == "__main__":
    emit(run())
