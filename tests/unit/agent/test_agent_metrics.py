"""The agent's metrics: its status document translated on scrape, served over HTTP."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from prometheus_client import generate_latest

from agent.dataplane.facade import ApplyResult
from agent.metrics import (
    PATHS,
    AgentCollector,
    ApplyCounters,
    metrics_registry,
    parse_nft_counter,
    read_firewall_drops,
    serve_metrics,
)
from lab.agent_status import NOW, status_document
from lab.metrics_text import Samples, parse, scrape, value
from wiregate.errors import ConfigError, DataPlaneError
from wiregate.model import NetMap
from wiregate.net import parse_hostport
from wiregate.settings import AgentSettings


def collect(doc: dict[str, Any]) -> Samples:
    registry = metrics_registry(lambda: doc)
    return parse(generate_latest(registry).decode())


def test_peers_are_counted_by_path() -> None:
    samples = collect(status_document())
    counts = {p: value(samples, "wiregate_agent_peers", path=p) for p in PATHS}
    assert counts == {"direct": 1, "relayed": 1, "probing": 1, "failed": 0, "unknown": 1}
    assert value(samples, "wiregate_agent_peer_path", peer="b", peer_id="dev-b", path="relayed")


def test_handshake_age_per_peer_and_infinity_without_one() -> None:
    collector = AgentCollector(status_document, clock=lambda: NOW)
    ages = {
        s.labels["peer"]: s.value
        for family in collector.collect()
        if family.name == "wiregate_agent_peer_handshake_age_seconds"
        for s in family.samples
    }
    assert ages["a"] == pytest.approx(10.0)
    assert ages["b"] == pytest.approx(200.0)
    assert math.isinf(ages["c"]) and math.isinf(ages["d"])


def test_gateway_apply_and_transfer_figures() -> None:
    s = collect(status_document())
    assert value(s, "wiregate_agent_gateway_connected") == 1
    assert value(s, "wiregate_agent_gateway_reconnects_total") == 2
    assert value(s, "wiregate_agent_map_version") == 42
    assert value(s, "wiregate_agent_last_sync_timestamp_seconds") == NOW - 3
    assert value(s, "wiregate_agent_peer_receive_bytes_total", peer="a", peer_id="dev-a") == 100
    assert value(s, "wiregate_agent_peer_transmit_bytes_total", peer="a", peer_id="dev-a") == 200
    assert value(s, "wiregate_agent_applies_total") == 5
    assert value(s, "wiregate_agent_apply_failures_total") == 1
    assert value(s, "wiregate_agent_apply_writes_total") == 12
    assert value(s, "wiregate_agent_peers_refused") == 1
    assert value(s, "wiregate_agent_key_rotated_timestamp_seconds") == NOW
    assert value(s, "wiregate_agent_key_expiry_timestamp_seconds") == NOW + 86_400
    assert value(s, "wiregate_agent_nat_info", nat_type="eim") == 1
    assert value(s, "wiregate_agent_pmtu_probes_lost_total") == 1
    info = {"device": "me", "device_id": "dev-me", "interface": "wg0", "backend": "userspace"}
    assert value(s, "wiregate_agent_info", **info) == 1
    assert value(s, "wiregate_agent_firewall_dropped_packets_total") == 7
    assert value(s, "wiregate_agent_firewall_dropped_bytes_total") == 420


def test_a_fresh_agent_without_map_or_gateway_still_scrapes() -> None:
    s = collect({"device": {"public_key": "k"}, "gateway": {}, "peers": []})
    assert value(s, "wiregate_agent_gateway_connected") == 0
    assert value(s, "wiregate_agent_map_version") == 0
    assert value(s, "wiregate_agent_peers", path="direct") == 0
    assert ("wiregate_agent_key_expiry_timestamp_seconds", frozenset()) not in s
    assert ("wiregate_agent_firewall_dropped_packets_total", frozenset()) not in s


NFT_OUTPUT = (
    '{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, '
    '{"counter": {"family": "inet", "name": "dropped", "table": "wiregate", "handle": 1, '
    '"packets": 3, "bytes": 180}}]}'
)


def test_firewall_drops_are_read_from_nft_json() -> None:
    asked: list[str] = []

    def nft(command: str) -> Mapping[str, Any] | None:
        asked.append(command)
        return cast(Mapping[str, Any], json.loads(NFT_OUTPUT))

    assert read_firewall_drops(nft) == {"packets": 3, "bytes": 180}
    assert asked == ["list counter inet wiregate dropped"]
    assert read_firewall_drops(lambda _command: None) is None  # no nftables, or no table
    assert parse_nft_counter(NFT_OUTPUT) == {"packets": 3, "bytes": 180}
    assert parse_nft_counter("not json") is None
    assert parse_nft_counter('{"nftables": [{"metainfo": {}}]}') is None


def test_apply_counters_count_runs_failures_and_writes() -> None:
    counters = ApplyCounters()
    results = iter([ApplyResult(3, (), 1), DataPlaneError("link gone"), ApplyResult(0, (), 1)])

    def apply(_netmap: NetMap) -> ApplyResult:
        outcome = next(results)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    counted = counters.wrap(apply)
    netmap = cast(NetMap, None)  # the wrapped apply never looks at it
    counted(netmap)
    with pytest.raises(DataPlaneError):
        counted(netmap)
    counted(netmap)
    assert counters.to_dict() == {"applies": 3, "apply_failures": 1, "apply_writes": 3}


@dataclass
class _Rotation:
    last_rotation: float | None = None


@dataclass
class FakeAgent:
    """What ``serve_metrics`` reads of the daemon: settings, data plane, rotation, status."""

    settings: AgentSettings
    document: dict[str, Any]
    dataplane: None = None
    rotation: _Rotation = field(default_factory=_Rotation)

    def status(self) -> dict[str, Any]:
        return self.document


async def test_served_over_http_on_metrics_listen() -> None:
    agent = FakeAgent(AgentSettings(metrics_listen="127.0.0.1:0"), status_document())
    runner = await serve_metrics(agent)
    assert runner is not None
    try:
        host, port = runner.addresses[0][:2]
        samples = parse(await scrape(f"http://{host}:{port}/metrics"))
    finally:
        await runner.cleanup()
    assert value(samples, "wiregate_agent_peers", path="relayed") == 1
    assert value(samples, "wiregate_agent_applies_total") == 0  # no data plane: no applies
    assert any(name == "process_cpu_seconds_total" for name, _ in samples)


async def test_a_busy_metrics_port_is_a_configuration_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        agent = FakeAgent(AgentSettings(metrics_listen=f"127.0.0.1:{port}"), status_document())
        with pytest.raises(ConfigError, match="cannot serve metrics"):
            await serve_metrics(agent)


async def test_no_listener_unless_configured() -> None:
    assert await serve_metrics(FakeAgent(AgentSettings(), status_document())) is None


def test_the_daemonset_serves_agent_metrics_on_the_node_address() -> None:
    from lab.manifests import container, env_of, find, render

    agent = container(find(render("overlays/mesh"), "DaemonSet", "wiregate-agent"), "agent")
    env = env_of(agent)
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    listen = env["WIREGATE_METRICS_LISTEN"]["value"]
    assert listen == "$(POD_IP):9092"  # never 0.0.0.0 on the host network
    assert parse_hostport(listen.replace("$(POD_IP)", "10.0.0.5")) == ("10.0.0.5", 9092)
    assert {"name": "metrics", "containerPort": 9092, "protocol": "TCP"} in agent["ports"]


def test_host_traffic_destinations_by_state_and_fallbacks() -> None:
    host = {"mode": "nonstrict", "fallbacks": 3,
            "counts": {"encrypted": 2, "held": 0, "clear": 1, "exempt": 1}}  # fmt: skip
    s = collect({"device": {"public_key": "k"}, "gateway": {}, "peers": [], "host_traffic": host})
    assert value(s, "wiregate_agent_host_destinations", state="encrypted") == 2
    assert value(s, "wiregate_agent_host_destinations", state="clear") == 1
    assert value(s, "wiregate_agent_host_fallbacks_total") == 3
    off = collect({"device": {}, "gateway": {}, "peers": [], "host_traffic": {"mode": "off"}})
    assert ("wiregate_agent_host_fallbacks_total", frozenset()) not in off


def test_pods_reported_with_kubernetes_only() -> None:
    pods = {"reported": 12, "messages": 3, "lists": 2, "refused": False}
    s = collect({"device": {"public_key": "k"}, "gateway": {}, "peers": [], "pods": pods})
    assert value(s, "wiregate_agent_pods_reported") == 12
    assert value(s, "wiregate_agent_pod_messages_total") == 3
    assert value(s, "wiregate_agent_pod_lists_total") == 2
    off = collect({"device": {}, "gateway": {}, "peers": [], "pods": None})
    assert ("wiregate_agent_pods_reported", frozenset()) not in off
