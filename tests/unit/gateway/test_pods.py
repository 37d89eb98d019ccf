"""Pod identity at the gateway: the pod table's refusals, the per-viewer compilation and
the deltas one pod change causes (every delta applied gives the fresh full map)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from gateway.mapping.broker import Broker
from gateway.mapping.pods import PodTable
from identity.policy import Policy
from identity.policy_file import parse_policy
from lab.netmap_replay import device
from wiregate.errors import ConfigError
from wiregate.mapwire import Delta, apply_delta, parse_map_message
from wiregate.model import NetMap
from wiregate.podwire import Pod, PodReport
from wiregate.ports import canonical_ports, parse_port

LEDGER = {"namespace": "payments", "labels": {"app": "ledger"}}
DOC: dict[str, Any] = {
    "acls": [
        {"src": ["tag:node"], "dst": ["tag:node"]},
        {"src": [{"pods": LEDGER, "nodes": ["tag:node"]}], "dst": ["tag:db"],
         "ports": ["tcp:5432"]},
        {"src": ["tag:web"], "dst": [{"pods": {"namespace": "shop"}}], "ports": ["tcp:8080"]},
    ],
    "routes": [{"tags": ["tag:node"], "allow": ["10.244.0.0/16"]}],
}  # fmt: skip
N1, N2, DB, WEB = (
    device(1, ("tag:node",), routes=("10.244.1.0/24",)),
    device(2, ("tag:node",), routes=("10.244.2.0/24",)),
    device(3, ("tag:db",)),
    device(4, ("tag:web",)),
)


def pod(name: str, ip: str, namespace: str = "payments", **labels: str) -> Pod:
    return Pod(namespace, name, (ip,), "default", tuple(sorted(labels.items())))


def policy(doc: dict[str, Any] = DOC) -> Policy:
    return parse_policy(doc).policy


# -- the policy file --------------------------------------------------------------


def test_a_pod_source_is_a_pod_rule_and_peers_its_nodes() -> None:
    rules = policy()
    (out, inbound) = rules.pods
    assert out.outbound and out.devices == {"tag:db"} and out.opens() == ("tcp:5432",)
    assert out.pods.namespace == "payments" and out.pods.labels == (("app", "ledger"),)
    assert not inbound.outbound and inbound.devices == {"tag:web"}
    assert inbound.pods.nodes == {"*"}
    assert rules.may_peer({"tag:node"}, {"tag:db"})
    assert rules.reach(frozenset({"tag:db"}), frozenset({"tag:node"})) == ()  # node: nothing


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ({"pods": {}}, "at least one"),
        ({"pods": {"namespace": "Bad_NS"}}, "acls[0].src[0].pods.namespace"),
        ({"pods": {"labels": {"app": "not ok!"}}}, "acls[0].src[0].pods.labels"),
        ({"pods": {"namspace": "x"}}, "unknown field 'namspace'"),
        ({"pods": {"namespace": "x"}, "nodes": ["group:nope"]}, 'unknown group "nope"'),
        ({"pods": {"namespace": "x"}, "node": ["tag:a"]}, "unknown field 'node'"),
        ({"nodes": ["tag:a"]}, "missing 'pods'"),
    ],
)
def test_a_bad_pod_selector_is_refused_naming_the_place(entry: Any, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy({"acls": [{"src": [entry], "dst": ["tag:db"]}]})
    assert said in str(caught.value)


def test_pods_on_both_sides_are_refused() -> None:
    pods = {"pods": {"namespace": "x"}}
    with pytest.raises(ConfigError, match=r"acls\[0\]: pods on both sides"):
        parse_policy({"acls": [{"src": [pods], "dst": [pods]}]})


def test_tags_and_pods_on_one_side_make_both_rules() -> None:
    doc = {"acls": [{"src": ["tag:a", {"pods": {"namespace": "x"}}], "dst": ["tag:db"]}]}
    rules = policy(doc)
    assert rules.reach(frozenset({"tag:db"}), frozenset({"tag:a"})) is None
    assert len(rules.pods) == 1


# -- the pod table ----------------------------------------------------------------


def test_a_pod_outside_the_nodes_cidrs_is_refused_once() -> None:
    table = PodTable()
    stray = pod("stray", "10.244.2.9")
    report = PodReport(True, (pod("ok", "10.244.1.5"), stray))
    first = table.apply("n1", report, ["10.244.1.0/24"])
    assert [p.name for p, _ in first.refused] == ["stray"]
    assert [p.name for p in table.pods("n1")] == ["ok"]
    again = table.apply("n1", PodReport(False, (stray,)), ["10.244.1.0/24"])
    assert again.refused == () and again.changes == ()
    table.apply("n1", PodReport(True, (pod("ok", "10.244.1.5"),)), ["10.244.1.0/24"])
    later = table.apply("n1", PodReport(False, (stray,)), ["10.244.1.0/24"])
    assert [p.name for p, _ in later.refused] == ["stray"]  # a full report starts anew


def test_full_replaces_remove_forgets_and_a_shared_address_counts_for_neither() -> None:
    table, routes = PodTable(), ["10.244.1.0/24"]
    table.apply("n1", PodReport(True, (pod("a", "10.244.1.5"), pod("b", "10.244.1.6"))), routes)
    table.apply("n1", PodReport(True, (pod("b", "10.244.1.6"), pod("c", "10.244.1.7"))), routes)
    assert sorted(p.name for p in table.pods("n1")) == ["b", "c"]
    table.apply("n1", PodReport(False, remove=("payments/b",)), routes)
    shared = table.apply("n1", PodReport(False, (pod("d", "10.244.1.7"),)), routes)
    assert {p.name: p.ips for p in table.pods("n1")} == {"c": (), "d": ()}
    assert [(o and o.ips, n and n.ips) for o, n in shared.changes] == [
        (("10.244.1.7",), ()),
        (None, ()),
    ]
    let_go = table.apply("n1", PodReport(False, remove=("payments/c",)), routes)
    assert {p.name: p.ips for p in table.pods("n1")} == {"d": ("10.244.1.7",)}
    assert [(o and o.name, n and n.ips) for o, n in let_go.changes] == [
        ("c", None),
        ("d", ("10.244.1.7",)),
    ]
    table.recheck("n1", [])  # its routes went: the pod is set aside
    assert list(table.pods("n1")) == [] and "n1" in table
    table.recheck("n1", routes)  # and back
    assert [p.name for p in table.pods("n1")] == ["d"]
    assert [p.name for p, _ in table.drop("n1") if p is not None] == ["d"]
    assert "n1" not in table


# -- the maps ---------------------------------------------------------------------


class Fleet:
    """A broker with every device's agent holding its map, as the deltas leave it."""

    def __init__(self, *devices: Any, doc: dict[str, Any] = DOC) -> None:
        self.broker = Broker(policy(doc))
        self.broker.load(devices, 1)
        self.maps = {d.id: self.full(d.id) for d in devices}

    def full(self, device_id: str) -> NetMap:
        message = parse_map_message(self.broker._full(device_id))
        assert isinstance(message, NetMap)
        return message

    def pods(self, node: str, report: PodReport) -> dict[str, Delta]:
        self.broker.pods(node, report, self.broker.version + 1)
        return self.catch_up()

    def catch_up(self) -> dict[str, Delta]:
        """Apply every agent's new deltas; check each map equals a fresh full map."""
        told: dict[str, Delta] = {}
        for agent, current in list(self.maps.items()):
            log = self.broker._logs.get(agent)
            if log is None:
                del self.maps[agent]
                continue
            for item in log.since(current.version) or ():
                delta = parse_map_message(item.render())
                assert isinstance(delta, Delta)
                told[agent] = delta
                current = apply_delta(current, delta)
            fresh = self.full(agent)  # resets the agent's log to the broker's version
            assert current.peers == fresh.peers, agent
            self.maps[agent] = fresh
        return told


def test_one_pod_change_upserts_the_node_for_its_viewers_only() -> None:
    fleet = Fleet(N1, N2, DB, WEB)
    told = fleet.pods("d1", PodReport(True, (pod("ledger-1", "10.244.1.5", app="ledger"),)))
    assert set(told) == {"d3"}
    assert told["d3"].upsert[0].id == "d1" and not told["d3"].remove
    assert told["d3"].upsert[0].pods_from == (("10.244.1.5", ("tcp:5432",)),)
    assert fleet.maps["d4"].peers.get("d1") is None or not fleet.maps["d4"].peers["d1"].pods_from


def test_a_pod_destination_upserts_the_allowed_peers_in_the_nodes_map() -> None:
    fleet = Fleet(N1, N2, DB, WEB)
    told = fleet.pods("d2", PodReport(True, (pod("shop-1", "10.244.2.8", "shop"),)))
    assert set(told) == {"d2"}
    (web,) = told["d2"].upsert
    assert web.id == "d4" and web.pods_to == (("10.244.2.8", ("tcp:8080",)),)


def test_relabel_delete_and_refusal_keep_every_map_exact() -> None:
    fleet = Fleet(N1, N2, DB, WEB)
    ledger = pod("ledger-1", "10.244.1.5", app="ledger")
    fleet.pods("d1", PodReport(True, (ledger, pod("shop-1", "10.244.1.6", "shop"))))
    told = fleet.pods("d1", PodReport(False, (replace(ledger, labels=(("app", "other"),)),)))
    assert set(told) == {"d3"} and told["d3"].upsert[0].pods_from == ()
    fleet.pods("d1", PodReport(False, (ledger,)))
    refused = REGISTRY.get_sample_value("wiregate_pods_refused_total", {"reason": "outside"})
    told = fleet.pods("d1", PodReport(False, (pod("ledger-2", "10.244.2.5", app="ledger"),)))
    assert told == {}  # another node's address: refused, counted
    after = REGISTRY.get_sample_value("wiregate_pods_refused_total", {"reason": "outside"})
    assert after == (refused or 0) + 1
    told = fleet.pods("d1", PodReport(False, remove=("shop/shop-1",)))
    assert set(told) == {"d1"} and told["d1"].upsert[0].pods_to == ()


def test_device_and_policy_changes_carry_the_pod_rules_along() -> None:
    fleet = Fleet(N1, N2, DB, WEB)
    fleet.pods("d1", PodReport(True, (pod("ledger-1", "10.244.1.5", app="ledger"),)))
    broker = fleet.broker
    broker.upsert(replace(DB, tags=("tag:web",)), broker.version + 1)  # db is a web now
    assert fleet.catch_up()["d3"].upsert
    broker.upsert(replace(DB, tags=("tag:db",)), broker.version + 1)
    fleet.catch_up()
    assert fleet.maps["d3"].peers["d1"].pods_from
    broker.upsert(replace(N1, routes=("10.244.9.0/24",)), broker.version + 1)  # pods outside
    fleet.catch_up()
    assert not fleet.maps["d3"].peers["d1"].pods_from
    fleet.pods("d1", PodReport(True, (pod("ledger-1", "10.244.9.5", app="ledger"),)))
    ports = dict(DOC, acls=[*DOC["acls"][:1], dict(DOC["acls"][1], ports=["tcp:5433"])])
    broker.set_policy(policy(ports), broker.version + 1)
    fleet.catch_up()
    assert fleet.maps["d3"].peers["d1"].pods_from == (("10.244.9.5", ("tcp:5433",)),)


def test_pods_refused_as_another_nodes_are_taken_once_it_lets_the_cidr_go() -> None:
    twin = replace(N2, routes=N1.routes)  # the same pod CIDR: N1, placed first, keeps it
    fleet = Fleet(N1, twin, DB, WEB)
    told = fleet.pods("d2", PodReport(True, (pod("ledger-1", "10.244.1.5", app="ledger"),)))
    assert told == {} and fleet.broker._state.shown_routes("d2") == ()
    fleet.broker.remove("d1", fleet.broker.version + 1)
    fleet.catch_up()
    assert fleet.maps["d3"].peers["d2"].pods_from == (("10.244.1.5", ("tcp:5432",)),)


def test_a_removed_node_takes_its_pods_along() -> None:
    fleet = Fleet(N1, N2, DB, WEB)
    fleet.pods("d1", PodReport(True, (pod("ledger-1", "10.244.1.5", app="ledger"),)))
    fleet.broker.remove("d1", fleet.broker.version + 1)
    assert "d1" not in fleet.broker._pods.table
    told = fleet.catch_up()
    assert told["d3"].remove == ("d1",)


# -- any sequence of changes: every map as a naive compilation says ----------------

NAMESPACES, APPS = ["payments", "shop"], ["ledger", "web"]
TAG_CHOICES = [("tag:node",), ("tag:edge",), ("tag:db",), ("tag:web",), ("tag:db", "tag:node")]
POLICIES = [
    DOC,
    {
        "acls": [
            {"src": ["*"], "dst": ["tag:node"], "ports": ["icmp"]},
            {"src": [{"pods": {"labels": {"app": "web"}}}], "dst": ["tag:db", "tag:web"]},
            {"src": ["tag:db"], "dst": [{"pods": {"namespace": "payments"},
                                         "nodes": ["tag:node"]}], "ports": ["tcp:1-9"]},
            {"src": ["tag:web"], "dst": [{"pods": {"labels": {"app": "ledger"}}}],
             "ports": ["udp:53"]},
        ],
        "routes": [{"tags": ["tag:node", "tag:edge"], "allow": ["10.244.0.0/16"]}],
    },
]  # fmt: skip
ops = st.one_of(
    st.tuples(
        st.just("pods"),
        st.integers(1, 2),
        st.booleans(),
        st.lists(
            st.tuples(st.integers(0, 4), st.integers(1, 6), st.integers(0, 1), st.integers(0, 1)),
            max_size=4,
        ),
        st.lists(st.integers(0, 4), max_size=2),
    ),
    st.tuples(st.just("tags"), st.integers(1, 4), st.sampled_from(TAG_CHOICES)),
    st.tuples(st.just("routes"), st.integers(1, 2), st.integers(1, 2)),  # own /24 or another
    st.tuples(st.just("policy"), st.integers(0, len(POLICIES) - 1)),
    st.tuples(st.just("remove"), st.integers(1, 4)),
)


def expected(broker: Broker, viewer: str, peer: str) -> tuple[Any, Any]:
    """``(pods_from, pods_to)`` of ``peer`` in ``viewer``'s map, compiled naively."""
    state, rules = broker._state, broker.policy.pods

    def side(node: str, other: str, outbound: bool) -> tuple[tuple[str, Any], ...]:
        out: dict[str, set[str]] = {}
        for p in broker._pods.table.pods(node):
            for r in rules:
                if r.outbound is outbound and r.pods.matches(
                    p.namespace, p.service_account, dict(p.labels), state.group_of(node)
                ) and ("*" in r.devices or r.devices & state.group_of(other)):  # fmt: skip
                    for ip in p.ips:
                        out.setdefault(ip, set()).update(r.opens())
        return tuple(sorted((ip, canonical(f)) for ip, f in out.items()))

    return side(peer, viewer, True), side(viewer, peer, False)


def canonical(specs: set[str]) -> tuple[str, ...]:
    return canonical_ports(parse_port(s) for s in specs)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=12))
def test_any_changes_leave_every_map_as_compiled_naively(script: list[Any]) -> None:
    fleet = Fleet(N1, N2, DB, WEB)
    devices = {d.id: d for d in (N1, N2, DB, WEB)}
    reported: dict[str, dict[str, Pod]] = {}  # what the store holds: every pod as reported
    broker = fleet.broker
    for op in script:
        kind, *args = op
        if kind == "pods":
            node, full, upsert, remove = args
            pods = {f"p{n}": Pod(NAMESPACES[ns], f"p{n}", (f"10.244.{node}.{ip}",), "sa",
                                 (("app", APPS[app]),)) for n, ip, ns, app in upsert}  # fmt: skip
            gone = [f"{ns}/p{n}" for ns in NAMESPACES for n in remove if f"p{n}" not in pods]
            report = PodReport(
                full, tuple(pods.values()), () if full else tuple(dict.fromkeys(gone))
            )
            fleet.pods(f"d{node}", report)
            if f"d{node}" in broker:
                held = reported.setdefault(f"d{node}", {})
                if full:
                    held.clear()
                for key in report.remove:
                    held.pop(key, None)
                held.update((p.key, p) for p in report.upsert)
            continue
        if kind == "policy":
            broker.set_policy(policy(POLICIES[args[0]]), broker.version + 1)
        elif kind == "remove":
            broker.remove(f"d{args[0]}", broker.version + 1)
            reported.pop(f"d{args[0]}", None)
        else:
            d = devices[f"d{args[0]}"]
            if kind == "tags":
                d = replace(d, tags=args[1])
            elif d.routes:
                d = replace(d, routes=(f"10.244.{args[0] * (1 if args[1] == 1 else 10)}.0/24",))
            devices[d.id] = d
            broker.upsert(d, broker.version + 1)
            if d.id not in fleet.maps:
                fleet.maps[d.id] = fleet.full(d.id)
        fleet.catch_up()
    for viewer, current in fleet.maps.items():
        for pid, peer in current.peers.items():
            assert (peer.pods_from, peer.pods_to) == expected(broker, viewer, pid), (viewer, pid)
    reloaded = Broker(broker.policy)  # a gateway starting now, from what the store holds
    reloaded.load([d for d in devices.values() if d.id in broker], broker.version,
                  pods={n: list(held.values()) for n, held in reported.items()})  # fmt: skip
    for viewer, current in fleet.maps.items():
        fresh = parse_map_message(reloaded._full(viewer))
        assert isinstance(fresh, NetMap) and fresh.peers == current.peers, viewer
