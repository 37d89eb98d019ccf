"""The agent's cluster routes in the rendered manifests: every mode advertises the
Service CIDR (inside the routes the shipped policy approves) and the nodes' own
addresses (``host_traffic`` nonstrict), gateway mode turns ``kube_gateway`` on with
"list" on nodes, and mesh mode does neither."""

from __future__ import annotations

import ipaddress
import json

import yaml

from lab.manifests import ROOT, container, env_of, find, render
from wiregate.settings import AgentSettings


def _agent_settings(target: str) -> AgentSettings:
    env = env_of(container(find(render(target), "DaemonSet", "wiregate-agent"), "agent"))
    values = {
        k: v["value"]
        for k, v in env.items()
        if k.startswith(("WIREGATE_KUBE", "WIREGATE_HOST_TRAFFIC")) and "value" in v
    }
    return AgentSettings(
        kube_service_cidrs=json.loads(values.get("WIREGATE_KUBE_SERVICE_CIDRS", "[]")),
        kube_gateway=values.get("WIREGATE_KUBE_GATEWAY", "false") == "true",
        host_traffic=values.get("WIREGATE_HOST_TRAFFIC", "off"),
    )


def _node_verbs(target: str) -> list[str]:
    role = find(render(target), "ClusterRole", "wiregate-agent")
    (rule,) = [r for r in role["rules"] if "nodes" in r["resources"]]
    return sorted(rule["verbs"])


def test_every_mode_advertises_the_service_cidr_the_policy_approves() -> None:
    policy = yaml.safe_load((ROOT / "components/agent/policy.yaml").read_text())
    (rule,) = [r for r in policy["routes"] if "tag:node" in r["tags"]]
    allowed = [ipaddress.ip_network(a) for a in rule["allow"]]
    for target in ("overlays/mesh", "overlays/gateway-mode"):
        cidrs = _agent_settings(target).kube_service_cidrs
        assert cidrs == ["10.96.0.0/12"]
        for cidr in cidrs:
            net = ipaddress.ip_network(cidr)
            assert any(net.version == a.version and net.subnet_of(a) for a in allowed)  # type: ignore[arg-type]


def test_gateway_mode_routes_every_nodes_pods_and_may_list_nodes() -> None:
    assert _agent_settings("overlays/gateway-mode").kube_gateway is True
    assert _node_verbs("overlays/gateway-mode") == ["get", "list"]


def test_every_mode_keeps_the_nodes_own_traffic_in_the_tunnel_non_strictly() -> None:
    for target in ("overlays/mesh", "overlays/gateway-mode"):
        assert _agent_settings(target).host_traffic == "nonstrict"


def test_mesh_mode_advertises_only_each_nodes_own_pods() -> None:
    assert _agent_settings("overlays/mesh").kube_gateway is False
    assert _node_verbs("overlays/mesh") == ["get"]
