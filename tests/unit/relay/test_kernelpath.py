"""The kernel fast path's pure half: which pairs go to the kernel, the rules, the diff."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lab.relay_fixtures import Lab as RelayLab
from lab.relay_fixtures import make_lab, node, pair_tickets, signer
from relay.aio.kernelpath import KernelPath, kernel_refusal, limits_for, start_kernel_path
from relay.forwarding import Relay, RelayConfig
from relay.kernelpath import (
    TABLE,
    Installed,
    KernelLimits,
    KernelPair,
    kernel_pairs,
    limit_name,
    parse_counters,
    plan,
    render_remove_table,
    render_table,
    table_name,
)
from relay.metrics import KernelMetrics
from relay.pool import Addr, AllocationView
from relay.tickets import Node, PairKey
from wiregate.errors import ConfigError
from wiregate.nft import Nft, NftError
from wiregate.settings import RelaySettings

LIMITS = KernelLimits((40000, 40001, 40002, 40003), "198.51.100.1", 12_500_000, 1_000_000, 1500)
WILDCARD = KernelLimits((40000, 40001), None, 1000, 2000, 1500)


def pair(tenant: str = "acme", a: str = "dev-a", b: str = "dev-b") -> PairKey:
    return PairKey(tenant, Node(a, "A" * 43 + "="), Node(b, "B" * 43 + "="))


def view(
    key: PairKey,
    first: Addr | None = ("192.0.2.10", 51820),
    second: Addr | None = ("203.0.113.7", 41641),
    ports: tuple[int, int] = (40000, 40001),
) -> AllocationView:
    return AllocationView(key, ports, (first, second), 0.0)


def test_only_pairs_with_both_sides_on_ordinary_ipv4_go_to_the_kernel() -> None:
    keys = [pair(a=f"a{i}") for i in range(7)]
    views = [
        view(keys[0]),
        view(keys[1], second=None),
        view(keys[2], first=("2001:db8::1", 51820)),
        view(keys[3], first=("127.0.0.1", 51820)),
        view(keys[4], first=("::ffff:192.0.2.99", 51820)),
        view(keys[5], first=("169.254.1.1", 51820)),
        view(keys[6], first=("not an address", 1)),
    ]
    pairs = kernel_pairs(views)
    assert set(pairs) == {keys[0], keys[4]}
    assert pairs[keys[4]].sides[0].addr == ("192.0.2.99", 51820)  # unwrapped
    side_a, side_b = pairs[keys[0]].sides
    assert (side_a.relay_port, side_a.device) == (40000, ("acme", "a0"))
    assert (side_b.addr, side_b.relay_port, side_b.device) == (
        ("203.0.113.7", 41641),
        40001,
        ("acme", "dev-b"),
    )


def test_the_table_replaces_any_earlier_one_and_holds_every_rule() -> None:
    script = render_table(LIMITS)
    lines = script.splitlines()
    t = f"inet {TABLE}"
    assert lines[:3] == [f"add table {t}", f"delete table {t}", f"add table {t}"]
    assert "elements = { 40000, 40001, 40002, 40003 }" in script
    assert "priority raw" in script and "priority dstnat" in script and "priority srcnat" in script
    rules = [line.removeprefix(f"add rule {t} ") for line in lines if line.startswith("add rule")]
    kernel = "raw_pre meta nfproto ipv4 ip daddr 198.51.100.1 udp dport @kernel_ports"
    aligned = ", ".join(str(n) for n in range(40, 616, 16))  # off the grid from 576 bytes on
    data = f"@th,64,32 0x04000000 udp length {{ {aligned}, 616-1508 }}"
    side = "ip saddr . udp sport . udp dport"
    assert rules == [
        # control messages (the MAGIC "WGRL") are untracked and go to Python
        "raw_pre ip daddr 198.51.100.1 udp dport @relay_ports @th,64,32 0x5747524c notrack accept",
        # on a kernel port: only the bound source; WireGuard transport data of the exact
        # shape within the device's limit, counted per side; handshakes of their exact
        # sizes untracked to Python (mac1); anything else dropped and counted
        f'{kernel} {side} != @bound4 counter name "unbound_source" drop',
        f'{kernel} {data} limit name {side} map @limit4 counter name "over_bandwidth" drop',
        f"{kernel} {data} {side} @forwarded4 accept",
        f"{kernel} @th,64,32 0x01000000 udp length 156 notrack accept",
        f"{kernel} @th,64,32 0x02000000 udp length 100 notrack accept",
        f"{kernel} @th,64,32 0x03000000 udp length 72 notrack accept",
        f'{kernel} counter name "not_wireguard" drop',
        # the relay's own sends never meet a NATed flow
        "raw_out ip saddr 198.51.100.1 udp sport @relay_ports notrack",
        f"nat_pre meta nfproto ipv4 ip daddr 198.51.100.1 udp dport @kernel_ports "
        f"dnat ip to {side} map @dnat4",
        "nat_post meta nfproto ipv4 meta l4proto udp ct status dnat "
        "snat ip to ip saddr . udp sport . ip daddr . udp dport map @snat4",
    ]
    wildcard = render_table(WILDCARD)
    assert "masquerade to :" in wildcard and "snat ip to" not in wildcard
    # a wildcard relay owns its ports on every address
    assert "raw_out udp sport @relay_ports notrack" in wildcard and "daddr 198" not in wildcard
    assert render_remove_table(LIMITS) == f"add table {t}\ndelete table {t}\n"


def test_a_small_max_datagram_narrows_the_shapes() -> None:
    small = KernelLimits((40000, 40001), None, 1000, 2000, 100)
    script = render_table(small)
    assert "udp length { 40, 56, 72, 88, 104 }" in script
    assert "0x01000000" not in script and "0x02000000 udp length 100" in script


def test_a_new_pair_is_elements_only_and_its_devices_limits() -> None:
    key = pair()
    desired = kernel_pairs([view(key)])
    step = plan({}, desired, LIMITS, 7)
    assert [i.name for i in step.added] == ["a7"] and step.removed == () and step.next_serial == 8
    t = f"inet {TABLE}"
    lines = step.script.splitlines()
    assert all(line.startswith((f"add element {t} ", f"add limit {t} ")) for line in lines)
    s = step.script
    a, b = "192.0.2.10 . 51820", "203.0.113.7 . 41641"
    # both directions: the bound source, its counter and limit, DNAT to the other side,
    # SNAT to the other side's relay port
    for me, other, port, other_port, device in (
        (a, b, 40000, 40001, ("acme", "dev-a")),
        (b, a, 40001, 40000, ("acme", "dev-b")),
    ):
        assert f"kernel_ports {{ {port} }}" in s
        assert f"bound4 {{ {me} . {port} }}" in s
        assert f"forwarded4 {{ {me} . {port} }}" in s
        assert f'limit4 {{ {me} . {port} : "{limit_name(device)}" }}' in s
        assert f"dnat4 {{ {me} . {port} : {other} }}" in s
        assert f"snat4 {{ {me} . {other} : 198.51.100.1 . {other_port} }}" in s
    # each device's byte limit exists before the elements that name it
    for device in (("acme", "dev-a"), ("acme", "dev-b")):
        name = limit_name(device)
        created = s.index(f"add limit {t} {name} {{ rate over 12500000 bytes/second")
        assert created < s.index(f'"{name}"')
    assert len(lines) == 2 + 12


def test_wildcard_relays_masquerade_to_the_other_relay_port() -> None:
    step = plan({}, kernel_pairs([view(pair())]), WILDCARD, 1)
    assert "masq4 { 192.0.2.10 . 51820 . 203.0.113.7 . 41641 : 40001 }" in step.script
    assert "snat4" not in step.script


def installed(step_added: tuple[Installed, ...]) -> dict[PairKey, Installed]:
    return {inst.pair.pair: inst for inst in step_added}


def test_nothing_to_do_is_an_empty_script() -> None:
    desired = kernel_pairs([view(pair())])
    first = plan({}, desired, LIMITS, 1)
    again = plan(installed(first.added), desired, LIMITS, first.next_serial)
    assert again.script == "" and again.added == () and again.removed == ()
    assert again.next_serial == first.next_serial
    assert plan({}, {}, LIMITS, 1).script == ""


def test_a_rebind_replaces_the_pair_under_a_new_name() -> None:
    key = pair()
    first = plan({}, kernel_pairs([view(key)]), LIMITS, 1)
    moved = kernel_pairs([view(key, second=("203.0.113.7", 50000))])
    step = plan(installed(first.added), moved, LIMITS, first.next_serial)
    assert [i.name for i in step.removed] == ["a1"] and [i.name for i in step.added] == ["a2"]
    s = step.script
    old = "delete element inet wiregate_relay dnat4 { 203.0.113.7 . 41641 . 40001 }"
    new = (
        "add element inet wiregate_relay dnat4 { 203.0.113.7 . 50000 . 40001 : 192.0.2.10 . 51820 }"
    )
    assert s.index(old) < s.index(new)
    assert "bound4 { 203.0.113.7 . 50000 . 40001 }" in s
    assert "add limit" not in s and "delete limit" not in s  # the devices are unchanged


def test_removal_deletes_everything_and_the_last_users_limits() -> None:
    shared, other = pair(a="dev-a", b="dev-b"), pair(a="dev-a", b="dev-c")
    both = kernel_pairs([view(shared), view(other, ("192.0.2.10", 51821), ports=(40002, 40003))])
    first = plan({}, both, LIMITS, 1)
    assert first.script.count("add limit") == 3  # dev-a once, shared by its two pairs
    only_other = {k: v for k, v in both.items() if k == other}
    step = plan(installed(first.added), only_other, LIMITS, first.next_serial)
    (gone,) = step.removed
    s = step.script
    added = [line for line in first.script.splitlines() if "40000" in line or "40001" in line]
    deletes = [line for line in s.splitlines() if line.startswith("delete element")]
    assert len(deletes) == len(added) == 12  # 6 per direction, every one of them
    for line in added:  # each element added is deleted by its key
        where_key = line.removeprefix("add element ").split(" : ")[0].rstrip(" }")
        assert any(d.removeprefix("delete element ").rstrip(" }") == where_key for d in deletes)
    assert f"delete limit inet {TABLE} {limit_name(('acme', 'dev-b'))}" in s
    assert limit_name(("acme", "dev-a")) + " " not in s.split("delete limit")[-1]
    assert s.rstrip().splitlines()[-1].startswith("delete limit")  # after its elements went
    assert gone.counter(0) == ("192.0.2.10", 51820, 40000)


def test_names_are_built_from_validated_values_only() -> None:
    hostile = pair(tenant='x"; flush ruleset; "', a="a } delete table inet x {")
    step = plan({}, kernel_pairs([view(hostile)]), LIMITS, 1)
    assert "flush ruleset" not in step.script and "delete table" not in step.script
    assert re.fullmatch(r"q_[0-9a-f]{16}", limit_name(("t", 'evil"name')))
    assert limit_name(("t", "a")) != limit_name(("t\0a", ""))


def test_counters_are_read_from_the_json_listings() -> None:
    def elem(val: list[object], counter: dict[str, object]) -> dict[str, object]:
        return {"elem": {"val": {"concat": val}, "counter": counter}}

    sides = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {
                "set": {
                    "name": "forwarded4",
                    "elem": [
                        elem(["192.0.2.1", 5, 40000], {"packets": 5, "bytes": 700}),
                        elem(["192.0.2.1", "x", 40000], {"packets": 1, "bytes": 1}),
                        {"elem": {"val": "192.0.2.1"}},
                        "junk",
                    ],
                }
            },
        ]
    }
    named = {
        "nftables": [
            {"counter": {"name": "not_wireguard", "packets": 2, "bytes": 90}},
            {"counter": {"name": "broken", "packets": "2", "bytes": 90}},
            {"set": {"name": "kernel_ports"}},
            "junk",
        ]
    }
    counters = parse_counters(sides, named)
    side = ("192.0.2.1", 5, 40000)
    assert counters.packets(side) == 5 and counters.bytes(side) == 700
    assert counters.packets("not_wireguard") == 2 and counters.bytes("not_wireguard") == 90
    assert set(counters.values) == {side, "not_wireguard"}
    assert counters.packets("broken") == 0 and counters.packets("absent") == 0
    assert parse_counters({"nftables": "nope"}).values == {}


def test_kernel_pair_equality_drives_the_diff() -> None:
    a = kernel_pairs([view(pair())])
    b = kernel_pairs([view(pair())])
    assert a == b and isinstance(next(iter(a.values())), KernelPair)


# --- the adapter's choice of path (nothing here touches nftables) -----------------------


def _core() -> Relay:
    config = RelayConfig("relay-1", 3480, (40000, 40001), bytes_per_second=5e5, burst_bytes=6e5)
    return Relay(config, [], secret=b"s" * 32)


async def test_userspace_and_refusals_choose_the_userspace_path(tmp_path: Path) -> None:
    off = tmp_path / "ip_forward"
    off.write_text("0\n")
    registry = CollectorRegistry()
    metrics = KernelMetrics(registry)
    for mode, host in (
        ("userspace", "198.51.100.1"),
        ("auto", "198.51.100.1"),
        ("auto", "127.0.0.1"),
    ):
        core = _core()
        path = await start_kernel_path(
            mode, core, host, clock=lambda: 0.0, metrics=metrics, ip_forward=off
        )
        assert path is None and core.on_change is None
    assert registry.get_sample_value("wiregate_relay_forward_path", {"path": "userspace"}) == 1


async def test_kernel_mode_refuses_to_start_when_not_permitted(tmp_path: Path) -> None:
    off = tmp_path / "ip_forward"
    off.write_text("0\n")
    metrics = KernelMetrics(CollectorRegistry())
    with pytest.raises(ConfigError, match=r"forward_path is kernel but net\.ipv4\.ip_forward is 0"):
        await start_kernel_path(
            "kernel", _core(), "198.51.100.1", clock=lambda: 0.0, metrics=metrics, ip_forward=off
        )
    with pytest.raises(ConfigError, match="listen on loopback"):
        await start_kernel_path("kernel", _core(), "127.0.0.1", clock=lambda: 0.0, metrics=metrics)
    assert kernel_refusal(tmp_path / "absent") is not None


def test_limits_follow_the_core_and_the_listen_address() -> None:
    limits = limits_for(_core(), "198.51.100.1")
    assert limits.relay_ports == (40000, 40001) and limits.source == "198.51.100.1"
    assert (limits.bytes_per_second, limits.burst_bytes) == (500_000, 600_000)
    assert limits_for(_core(), "0.0.0.0").source is None
    huge = RelayConfig("r", 3480, (40000, 40001), bytes_per_second=1e12, burst_bytes=1e11)
    capped = limits_for(Relay(huge, [], secret=b"s" * 32), "198.51.100.1")
    assert capped.burst_bytes == 9_000_000_000
    assert capped.bytes_per_second + capped.burst_bytes == 18_000_000_000
    assert limits_for(_core(), "::").source is None


def test_forward_path_setting() -> None:
    assert RelaySettings().forward_path == "auto"
    assert RelaySettings(forward_path="kernel").forward_path == "kernel"
    with pytest.raises(ValueError, match="forward_path"):
        RelaySettings(forward_path="fast")


def test_each_relay_id_has_its_own_table() -> None:
    assert table_name("r1") == "wiregate_relay_r1"
    assert table_name("relay_2") == "wiregate_relay_relay_2"
    dashed, dotted = table_name("r-1"), table_name("r.1")
    assert dashed != dotted and re.fullmatch(r"wiregate_relay_r_1_[0-9a-f]{8}", dashed)
    assert limits_for(_core(), "198.51.100.1").table == table_name("relay-1")


def test_the_kernel_never_gets_a_destination_the_one_rule_refuses() -> None:
    refused = ["169.254.169.254", "255.255.255.255", "240.0.0.1", "0.0.0.0", "224.0.0.1"]
    refused += ["::ffff:127.0.0.1", "64:ff9b::c000:20a"]
    for host in refused:
        assert kernel_pairs([view(pair(), second=(host, 51820))]) == {}, host
        assert kernel_pairs([view(pair(), first=(host, 51820))]) == {}, host
    assert kernel_pairs([view(pair(), second=("203.0.113.7", 0))]) == {}


def test_refusal_names_a_missing_net_admin_or_forwarding(tmp_path: Path) -> None:
    on, off = tmp_path / "on", tmp_path / "off"
    on.write_text("1\n")
    off.write_text("0\n")
    admin, plain = tmp_path / "admin", tmp_path / "plain"
    admin.write_text("Name:\tpython3\nCapEff:\t0000000000001000\n")
    plain.write_text("Name:\tpython3\nCapEff:\t0000000000000400\n")
    assert kernel_refusal(on, admin) is None
    assert kernel_refusal(on, plain) == "the relay lacks CAP_NET_ADMIN"
    assert kernel_refusal(off, admin) == "net.ipv4.ip_forward is 0 in the relay's network namespace"
    assert kernel_refusal(tmp_path / "absent", admin) == (
        f"cannot read {tmp_path / 'absent'}: No such file or directory"
    )


# --- the adapter against a recording nftables and conntrack (the lab runs the real ones) ----


class RecordingNft(Nft):
    """Scripts recorded; listings answered from ``sides`` counters; refusals on demand."""

    def __init__(self) -> None:  # no nftables needed
        self.scripts: list[str] = []
        self.sides: dict[tuple[str, int, int], int] = {}
        self.refuse_next = False

    def run(self, script: str) -> None:
        if self.refuse_next and "add element" in script:
            self.refuse_next = False
            raise NftError("nftables: Error: Could not process rule: No such file or directory")
        self.scripts.append(script)

    def query_json(self, command: str) -> dict[str, Any]:
        if "forwarded4" in command:
            elems = [
                {"elem": {"val": {"concat": list(k)}, "counter": {"packets": n, "bytes": n * 100}}}
                for k, n in self.sides.items()
            ]
            return {"nftables": [{"set": {"name": "forwarded4", "elem": elems}}]}
        return {"nftables": [{"counter": {"name": "unbound_source", "packets": 3, "bytes": 9}}]}


A_ADDR, B_ADDR = ("192.0.2.10", 51820), ("203.0.113.7", 41641)


async def bound_pair() -> tuple[KernelPath, RelayLab, RecordingNft, list[frozenset[int]]]:
    key, trusted = signer()
    lab = make_lab([trusted], idle_timeout=60.0)
    ticket_a, ticket_b = pair_tickets(key, node("dev-a"), node("dev-b"))
    nft, forgotten = RecordingNft(), []

    async def forget(ports: frozenset[int], address: str | None) -> None:
        assert address == "198.51.100.1"
        forgotten.append(ports)

    limits = limits_for(lab.relay, "198.51.100.1")
    metrics = KernelMetrics(CollectorRegistry())
    path = KernelPath(
        limits, lab.relay, clock=lambda: lab.now, metrics=metrics, nft=nft, forget=forget
    )
    await path.start()
    assert nft.scripts == [render_table(limits)] and forgotten == [frozenset(limits.relay_ports)]
    lab.bind(ticket_a, A_ADDR)
    lab.bind(ticket_b, B_ADDR)
    await path.reconcile()
    return path, lab, nft, forgotten


async def test_the_adapter_installs_bound_pairs_and_forgets_their_flows() -> None:
    path, _lab, nft, forgotten = await bound_pair()
    (inst,) = path.installed.values()
    ports = {side.relay_port for side in inst.pair.sides}
    assert "add element" in nft.scripts[-1] and forgotten[-1] == frozenset(ports)
    scripts = len(nft.scripts)
    await path.reconcile()  # nothing changed: no transaction
    assert len(nft.scripts) == scripts


async def test_kernel_traffic_keeps_a_pair_alive_and_silence_expires_it() -> None:
    path, lab, nft, forgotten = await bound_pair()
    (inst,) = path.installed.values()
    lab.now += 50
    nft.sides[inst.counter(0)] = 10  # a sent through the kernel
    await path.reconcile(expire=True)
    lab.now += 50  # 100 s after the bind, 50 s after the traffic: still alive
    await path.reconcile(expire=True)
    assert path.installed and lab.relay.allocations()
    lab.now += 11  # 61 s of silence
    await path.reconcile(expire=True)
    assert not path.installed and not lab.relay.allocations()
    assert "delete element" in nft.scripts[-1]
    assert forgotten[-1] == frozenset(side.relay_port for side in inst.pair.sides)


async def test_a_refused_update_rebuilds_the_table_and_installs_again() -> None:
    key, trusted = signer()
    path, lab, nft, forgotten = await bound_pair()
    assert len(path.installed) == 1
    ticket_c, ticket_d = pair_tickets(key, node("dev-c"), node("dev-d"))
    lab.relay.verify_keys = [trusted]
    lab.bind(ticket_c, ("192.0.2.20", 51820))
    nft.refuse_next = True
    lab.bind(ticket_d, ("192.0.2.21", 51820))
    await path.reconcile()
    limits = path.limits
    assert nft.scripts[-2] == render_table(limits)  # rebuilt ...
    assert len(path.installed) == 2  # ... with every pair installed again
    assert forgotten[-2] == frozenset(limits.relay_ports)
    await path.close()
    assert nft.scripts[-1] == render_remove_table(limits)


async def test_triggers_coalesce_and_a_timer_tick_is_never_lost() -> None:
    path, lab, nft, _ = await bound_pair()
    scripts = len(nft.scripts)
    lab.now += 61  # idle past the timeout
    path.changed()
    path.changed()  # while the first pass runs: one more pass, not one per call
    path.housekeeping()  # ... which carries the timer's expiry
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not path.installed:
            break
    assert not path.installed and not lab.relay.allocations()
    assert len(nft.scripts) == scripts + 1  # one removal, no other transaction
    await path.close()
    path.changed()  # after close: nothing
    assert nft.scripts[-1] == render_remove_table(path.limits)
