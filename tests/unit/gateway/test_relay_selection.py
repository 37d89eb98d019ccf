"""The gateway's relay choice: health from probes, sticky pairs, least load, failover.

Pure tests of :class:`~gateway.relays.RelaySelector`, then the
:class:`~gateway.relays.RelayMonitor` driving it with a scripted probe.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.relays import NoRelayUp, RelayMonitor, RelaySelector, pair_key
from lab.relay_api import ScriptedProbe
from relay.client.probe import PingResult
from relay.endpoints import RelayEndpoint

R1, R2, R3 = (RelayEndpoint(f"relay-{i}", f"192.0.2.{i}", 3480) for i in (1, 2, 3))


def selector(*relays: RelayEndpoint, **kwargs: float) -> RelaySelector:
    return RelaySelector(relays or (R1, R2, R3), **kwargs)  # type: ignore[arg-type]


def all_up(sel: RelaySelector, rtt: float = 0.01) -> RelaySelector:
    for relay in sel.relays:
        sel.answered(relay.id, rtt, 0, 100)
    return sel


def test_pair_key_is_unordered() -> None:
    assert pair_key("b", "a") == pair_key("a", "b") == ("a", "b")


def test_never_probed_relays_are_down_and_none_up_is_refused() -> None:
    sel = selector()
    assert [s.up for s in sel.status()] == [False, False, False]
    with pytest.raises(NoRelayUp, match="no relay answers") as info:
        sel.choose("a", "b", (), 0.0)
    assert info.value.status == 503 and info.value.hint and "/api/v1/relays" in info.value.hint


def test_no_relay_configured() -> None:
    with pytest.raises(NoRelayUp, match="no relay is configured"):
        RelaySelector(()).choose("a", "b", (), 0.0)


def test_least_loaded_then_rtt_then_id() -> None:
    sel = selector()
    sel.answered("relay-1", 0.001, 50, 100)
    sel.answered("relay-2", 0.050, 10, 100)
    sel.answered("relay-3", 0.020, 10, 100)
    assert sel.choose("a", "b", (), 0.0) == R3  # same load as relay-2, lower RTT
    sel2 = all_up(selector())
    assert sel2.choose("a", "b", (), 0.0) == R1  # all equal: the lowest id


def test_load_is_relative_to_capacity() -> None:
    sel = selector()
    sel.answered("relay-1", 0.01, 10, 20)  # half full
    sel.answered("relay-2", 0.01, 30, 1000)  # 3 %
    sel.answered("relay-3", 0.01, 0, 0)  # no capacity at all
    assert sel.choose("a", "b", (), 0.0) == R2


def test_new_pairs_spread_before_the_next_probe() -> None:
    sel = selector(R1, R2)
    sel.answered("relay-1", 0.01, 0, 2)
    sel.answered("relay-2", 0.01, 0, 2)
    chosen = [sel.choose("a", peer, (), 0.0).id for peer in ("b", "c", "d", "e")]
    assert sorted(chosen) == ["relay-1", "relay-1", "relay-2", "relay-2"]


def test_pair_is_sticky_and_both_sides_get_the_same_relay() -> None:
    sel = all_up(selector())
    first = sel.choose("a", "b", (), 0.0)
    sel.answered(first.id, 0.01, 99, 100)  # now the most loaded: the pair stays anyway
    assert sel.choose("b", "a", (), 1.0) == first
    assert sel.choose("a", "b", (), 2.0) == first
    assert sel.assignment("b", "a") == first.id


def test_down_after_two_misses_up_on_the_next_answer() -> None:
    sel = all_up(selector())
    assert sel.choose("a", "b", (), 0.0) == R1
    sel.missed("relay-1", "no answer")
    assert sel.is_up("relay-1") and sel.choose("a", "b", (), 1.0) == R1  # one miss: kept
    sel.missed("relay-1", "no answer")
    assert not sel.is_up("relay-1")
    moved = sel.choose("b", "a", (), 2.0)
    assert moved == R2 and sel.choose("a", "b", (), 3.0) == R2  # both sides follow
    (status,) = (s for s in sel.status() if s.relay == R1)
    assert status.error == "no answer" and not status.up
    sel.answered("relay-1", 0.01, 0, 100)
    assert sel.is_up("relay-1")
    assert sel.choose("a", "b", (), 4.0) == R2  # no move back while relay-2 is fine


def test_avoid_moves_the_pair_and_the_other_side_follows() -> None:
    sel = all_up(selector())
    assert sel.choose("a", "b", (), 0.0) == R1
    assert sel.choose("a", "b", ["relay-1"], 1.0) == R2
    assert sel.choose("b", "a", (), 2.0) == R2  # relay-1 is suspect for this pair
    all_up(sel)  # the next probe round: no pending assignments tip the balance
    assert sel.choose("c", "d", (), 2.0) == R1  # but not for other pairs


def test_suspicion_expires() -> None:
    sel = all_up(selector(R1, R2), rtt=0.01)
    sel.choose("a", "b", ["relay-1"], 0.0)
    sel.missed("relay-2", "x")
    sel.missed("relay-2", "x")
    with pytest.raises(NoRelayUp, match="avoided"):
        sel.choose("a", "b", (), 10.0)
    assert sel.choose("a", "b", (), 121.0) == R1


def test_unknown_ids_in_avoid_are_ignored() -> None:
    sel = all_up(selector())
    assert sel.choose("a", "b", ["relay-9", "nope"], 0.0) == R1


def test_everything_avoided_is_503_with_a_hint() -> None:
    sel = all_up(selector(R1, R2))
    with pytest.raises(NoRelayUp, match="avoided") as info:
        sel.choose("a", "b", ["relay-1", "relay-2"], 0.0)
    assert info.value.hint and "suspect" in info.value.hint
    assert sel.assignment("a", "b") is None


def test_idle_assignments_are_forgotten() -> None:
    sel = all_up(selector())
    sel.choose("a", "b", (), 0.0)
    sel.choose("c", "d", (), 3000.0)
    assert sel.forget_idle(3600.0) == 1
    assert sel.assignment("a", "b") is None and sel.assignment("c", "d") == "relay-2"


def test_status_document() -> None:
    sel = selector(R1, R2)
    sel.answered("relay-1", 0.0125, 3, 12)
    doc = [s.to_dict() for s in sel.status()]
    assert doc[0] == {
        "id": "relay-1",
        "control": "192.0.2.1:3480",
        "up": True,
        "rtt_ms": 12.5,
        "allocations": 3,
        "capacity": 12,
        "load": 0.25,
        "error": None,
    }
    assert doc[1]["up"] is False and doc[1]["rtt_ms"] is None and doc[1]["load"] is None


# --- the monitor ------------------------------------------------------------------------------


async def test_monitor_rounds_mark_relays_up_and_down() -> None:
    sel, probe = selector(R1, R2), ScriptedProbe()
    probe.answers[("192.0.2.1", 3480)] = PingResult(0.02, 1, 10)
    monitor = RelayMonitor(sel, probe, interval=5.0)
    await monitor.probe_all()
    assert monitor.first_round.is_set()
    assert [s.up for s in sel.status()] == [True, False]
    assert {c for c, _ in probe.calls} == {("192.0.2.1", 3480), ("192.0.2.2", 3480)}
    assert {t for _, t in probe.calls} == {2.0}
    probe.answers.clear()
    await monitor.probe_all()
    assert sel.is_up("relay-1")
    await monitor.probe_all()
    assert not sel.is_up("relay-1")
    assert sel.status()[0].error == "no PONG"


async def test_monitor_run_probes_every_interval() -> None:
    sel, probe = selector(R1), ScriptedProbe()
    monitor = RelayMonitor(sel, probe, interval=0.05)
    task = asyncio.create_task(monitor.run())
    await asyncio.sleep(0.22)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 4 <= len(probe.calls) <= 6
    assert probe.calls[0][1] == 0.025  # half the interval


async def test_monitor_counts_resolution_errors_as_misses() -> None:
    sel = selector(R1)

    async def unresolvable(control: tuple[str, int], timeout: float) -> PingResult:
        raise OSError("Name or service not known")

    monitor = RelayMonitor(sel, unresolvable, interval=5.0)
    await monitor.probe_all()
    assert sel.status()[0].error == "Name or service not known"


async def test_a_failing_probe_is_a_miss_and_the_monitor_goes_on() -> None:
    sel, calls = selector(R1, R2), []

    async def buggy(control: tuple[str, int], timeout: float) -> PingResult:
        calls.append(control)
        if control[0] == "192.0.2.1":
            raise KeyError("bug")
        return PingResult(0.01, 0, 10)

    monitor = RelayMonitor(sel, buggy, interval=5.0)
    await monitor.probe_all()
    await monitor.probe_all()
    assert [s.up for s in sel.status()] == [False, True]
    assert sel.status()[0].error == "probe failed: KeyError" and len(calls) == 4
