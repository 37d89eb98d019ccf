"""The dns component: pods resolve the mesh domain through the node agents.

The Service keeps each node's CoreDNS on its own node's agent, the agents listen on
the node's InternalIP and answer their node's pods, and the Corefile snippet forwards
the mesh domain to the Service's address."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lab.manifests import ROOT, Doc, container, env_of, find
from tests.deploy.test_kubernetes_manifests import render_site, valid_site
from wiregate.settings import AgentSettings


def _site(tmp_path: Path) -> list[Doc]:
    return render_site(tmp_path, ["agent", "dns"])


def test_the_service_is_local_to_each_node_and_selects_the_agents(tmp_path: Path) -> None:
    docs = valid_site(tmp_path, ["agent", "dns"])
    svc = find(docs, "Service", "wiregate-dns")["spec"]
    ds = find(docs, "DaemonSet", "wiregate-agent")
    assert svc["internalTrafficPolicy"] == "Local"
    assert svc["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert {(p["protocol"], p["port"], p["targetPort"]) for p in svc["ports"]} == {
        ("UDP", 53, 53),
        ("TCP", 53, 53),
    }
    snippet = (ROOT / "components" / "dns" / "Corefile.snippet").read_text()
    assert re.search(rf"^wg\.internal:53 {{.*forward \. {svc['clusterIP']}\n", snippet,
                     re.M | re.S)  # fmt: skip


def test_the_agents_listen_on_the_node_and_answer_its_pods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = container(find(_site(tmp_path), "DaemonSet", "wiregate-agent"), "agent")
    env = env_of(agent)
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    names = list(env)
    assert names.index("HOST_IP") < names.index("WIREGATE_DNS_LISTEN")  # $(HOST_IP) expands
    assert "NET_BIND_SERVICE" in agent["securityContext"]["capabilities"]["add"]
    listen = env["WIREGATE_DNS_LISTEN"]["value"].replace("$(HOST_IP)", "172.18.0.3")
    monkeypatch.setenv("WIREGATE_DNS_LISTEN", listen)  # as the kubelet expands it
    monkeypatch.setenv("WIREGATE_DNS_ALLOW_PODS", env["WIREGATE_DNS_ALLOW_PODS"]["value"])
    settings = AgentSettings()
    assert settings.dns_listen == ["172.18.0.3"] and settings.dns_allow_pods
