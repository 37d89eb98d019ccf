"""The soak's pure parts: each invariant check catches what it is there to catch, and the
ping, iperf3, metrics and agent-log parsers read real outputs."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

from tests.soak import checks
from tests.soak.probes import iperf_figures, parse_metrics, parse_ping, rotation_window
from wiregate.mapwire import read_full
from wiregate.model import NetMap

KEY_A, KEY_B, KEY_C, KEY_X = (c * 43 + "=" for c in "ABCX")


def device(i: str, key: str, tags: list[str], endpoints: list[str]) -> dict[str, object]:
    return {"id": i, "name": f"n{i}", "public_key": key, "tags": tags, "endpoints": endpoints,
            "addresses": [f"100.64.0.{i}", f"fd7a::{i}"]}  # fmt: skip


LIVE = checks.live_devices([
    device("1", KEY_A, ["tag:sim"], ["198.51.100.200:1000"]),
    device("2", KEY_B, ["tag:sim"], ["198.51.100.201:1000"]),
    device("3", KEY_C, ["tag:real"], []),
])  # fmt: skip


def netmap(version: int, self_key: str, peers: list[dict[str, object]]) -> NetMap:
    return read_full({
        "type": "full", "version": version,
        "self": {"id": "1", "name": "n1", "public_key": self_key,
                 "addresses": ["100.64.0.1/32", "fd7a::1/128"]},
        "peers": peers,
    })  # fmt: skip


def peer(i: str, key: str, endpoints: list[str]) -> dict[str, object]:
    addrs = [f"100.64.0.{i}/32", f"fd7a::{i}/128"]
    return {"id": i, "name": f"n{i}", "public_key": key, "addresses": addrs,
            "allowed_ips": addrs, "endpoints": endpoints}  # fmt: skip


GOOD_PEER = peer("2", KEY_B, ["198.51.100.201:1000"])


def test_a_map_equal_to_the_database_passes() -> None:
    assert checks.check_map("1", netmap(7, KEY_A, [GOOD_PEER]), LIVE, 9, set()) == []


def test_map_problems_are_each_reported() -> None:
    def problems(nm: NetMap, removed: frozenset[str] = frozenset()) -> str:
        return " | ".join(checks.check_map("1", nm, LIVE, 9, set(removed)))

    assert "ahead of the database" in problems(netmap(10, KEY_A, [GOOD_PEER]))
    assert "self key" in problems(netmap(9, KEY_X, [GOOD_PEER]))
    assert "missing" in problems(netmap(9, KEY_A, []))
    assert "stale key" in problems(netmap(9, KEY_A, [peer("2", KEY_X, ["198.51.100.201:1000"])]))
    assert "endpoints" in problems(netmap(9, KEY_A, [peer("2", KEY_B, [])]))
    # a device of the other peering group, and a removed one
    assert "unexpected" in problems(netmap(9, KEY_A, [GOOD_PEER, peer("3", KEY_C, [])]))
    gone = problems(netmap(9, KEY_A, [GOOD_PEER, peer("4", KEY_X, [])]), frozenset({"4"}))
    assert "1 removed" in gone


def test_duplicate_addresses_and_interface_keys() -> None:
    assert checks.check_addresses(LIVE) == []
    twin = checks.Live("9", "n9", KEY_X, ipv4="100.64.0.1", ipv6="fd7a::9", tags=(), endpoints=())
    doubled = {**LIVE, "9": twin}
    assert checks.check_addresses(doubled) == ["ipv4 100.64.0.1 held by 2 devices"]
    assert checks.check_peer_keys("real", set(), "3", LIVE) == []
    assert checks.check_peer_keys("real", {KEY_A}, "3", LIVE) == [
        "real: interface holds 1 keys that are not current"
    ]


PING = """PING 100.64.0.2 (100.64.0.2) 56(84) bytes of data.
[1700000000.000000] 64 bytes from 100.64.0.2: icmp_seq=1 ttl=64 time=0.5 ms
[1700000000.020000] 64 bytes from 100.64.0.2: icmp_seq=2 ttl=64 time=0.5 ms
[1700000000.080000] 64 bytes from 100.64.0.2: icmp_seq=5 ttl=64 time=0.5 ms
[1700000000.080100] 64 bytes from 100.64.0.2: icmp_seq=5 ttl=64 time=0.5 ms (DUP!)
[1700000000.100000] 64 bytes from 100.64.0.2: icmp_seq=6 ttl=64 time=0.5 ms

--- 100.64.0.2 ping statistics ---
7 packets transmitted, 4 received, 42.8571% packet loss, time 120ms
"""


def test_ping_losses_are_placed_in_time() -> None:
    log = parse_ping(PING)
    assert log.sent == 7
    assert log.lost() == [3, 4]  # 7 was in flight when ping stopped: not counted
    assert [round(t - 1700000000, 3) for t in log.lost_at()] == [0.04, 0.06]
    assert log.lost_between(1700000000.03, 1700000000.05) == 1


def test_ping_sequence_numbers_unwrap() -> None:
    text = "\n".join(
        f"[{1700000000 + n * 0.02:.6f}] 64 bytes from x: icmp_seq={n % 65536} ttl=64 time=1 ms"
        for n in range(65530, 65540)
        if n != 65537
    )
    log = parse_ping(text + "\n70000 packets transmitted, 1 received\n")
    assert 65537 in log.lost() and 65536 in log.replies


def test_iperf_metrics_and_rotation_log() -> None:
    doc = {"intervals": [{"sum": {"bits_per_second": 4e7, "retransmits": 3}}],
           "end": {"sum_sent": {"bits_per_second": 4e7, "retransmits": 3, "seconds": 10},
                   "sum_received": {"bits_per_second": 3.9e7}}}  # fmt: skip
    figures = iperf_figures("noise\n" + json.dumps(doc))
    assert figures["received_mbps"] == 39.0 and figures["min_interval_mbps"] == 40.0
    assert "error" in iperf_figures('{"error": "unable to connect"}')
    page = '# HELP x\nwiregate_asyncio_tasks 17.0\nprocess_open_fds 21.0\nother{a="b"} 1\n'
    assert parse_metrics(page) == {"wiregate_asyncio_tasks": 17.0, "process_open_fds": 21.0}
    events = [
        ("key switched", "01.0"),
        ("key switched", "10.5"),
        ("key rotation registered", "10.7"),
    ]
    log = "\n".join(
        json.dumps({"event": e, "timestamp": f"2026-11-25T01:00:{sec}Z"}) for e, sec in events
    )
    at = datetime(2026, 11, 25, 1, 0, 5, tzinfo=UTC).timestamp()
    window = rotation_window(log, after=at)  # the switch before 01:00:05 is an older one
    assert window is not None and round(window[0] - window[1], 1) == 0.2
    assert rotation_window(log, after=at + 60) is None


def test_rss_growth_after_the_warm_up_is_bounded() -> None:
    def run(rss_at: Callable[[float], int]) -> list[tuple[float, int]]:
        return [(t, rss_at(t)) for t in range(0, 2101, 10)]  # 35 min, a sample every 10 s

    def level(t: float) -> int:  # the ramp, then 100 000 KiB with a GC saw-tooth of 3 MiB
        return int(100_000 * min(1.0, t / 300)) + (3072 if t % 60 < 30 else 0)

    figure, problems = checks.check_rss_growth("replica 0", run(level), 300.0, 0.05)
    assert problems == []
    assert figure["rss_kb_after_warmup"] == figure["rss_kb_at_end"]
    # the issue's leak: 2 MiB a minute from the start of the churn
    figure, problems = checks.check_rss_growth(
        "replica 0", run(lambda t: level(t) + int(2048 * t / 60)), 300.0, 0.05
    )
    assert problems and problems[0].startswith("replica 0: RSS grew 5")
    assert problems[0].endswith("(bound 5%)")
    assert 2000 < figure["kib_per_min"] < 2100
    # 0.2 MiB a minute (6 MiB over the 30 minutes) on 100 MiB also fails; 0.1 passes
    slow = checks.check_rss_growth("r", run(lambda t: level(t) + int(205 * t / 60)), 300.0, 0.05)
    slower = checks.check_rss_growth("r", run(lambda t: level(t) + int(100 * t / 60)), 300, 0.05)
    assert slow[1] and not slower[1]
    # a run that ended before the warm-up's window and the end's could be told apart
    short = run(level)[:40]
    assert "no RSS samples 120 s past" in checks.check_rss_growth("r", short, 300.0, 0.05)[1][0]
