"""agent.kubenode: Node documents to facts (pure), and the real ``kubernetes``
client against recorded API responses served by a local HTTP server."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent import kubenode
from agent.kubenode import NodeFacts, NodeSource, node_facts, read_node
from lab.fakes import FakeClock
from lab.kubeapi import REQUESTS, kube_api_app, recorded, write_kubeconfig
from wiregate.errors import (
    BadInput,
    ConfigError,
    Forbidden,
    NotFound,
    Unavailable,
    WiregateError,
)
from wiregate.settings import AgentSettings

TOKEN = "recorded-sa-token"  # a test credential for the stand-in API server
KIND: dict[str, Any] = json.loads(recorded("node-kind-worker.json"))
GKE: dict[str, Any] = json.loads(recorded("node-gke.json"))


# --------------------------------------------------------------------------- the pure core


def test_a_kind_node() -> None:
    facts = node_facts(KIND, 51820)
    assert facts == NodeFacts(
        name="kind-worker",
        pod_cidrs=("10.244.1.0/24", "fd00:10:244:1::/64"),
        internal_ips=("172.18.0.3", "fc00:f853:ccd:e793::3"),
        location="eu-west-1a",
        force_endpoint=None,
        persistent_keepalive=25,
    )
    assert facts.routes() == ["10.244.1.0/24", "fd00:10:244:1::/64"]
    assert facts.endpoints(51820) == ["172.18.0.3:51820", "[fc00:f853:ccd:e793::3]:51820"]


def test_a_gke_node_with_only_pod_cidr_and_a_forced_endpoint() -> None:
    facts = node_facts(GKE, 51820)
    assert facts.pod_cidrs == ("10.8.3.0/24",)  # spec.podCIDR: no podCIDRs on this node
    assert facts.internal_ips == ("10.132.0.41",)  # ExternalIP and names are not InternalIP
    assert facts.endpoints(51820) == ["34.76.10.20:51821"]  # forced: only that one
    assert facts.location is None and facts.persistent_keepalive is None


def test_a_node_without_pod_cidrs_advertises_no_routes() -> None:
    node = copy.deepcopy(KIND)
    del node["spec"]["podCIDR"], node["spec"]["podCIDRs"]
    assert node_facts(node, 51820).routes() == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("198.51.100.7", "198.51.100.7:51820"),
        ("198.51.100.7:4500", "198.51.100.7:4500"),
        ("2001:db8::7", "[2001:db8::7]:51820"),
        ("[2001:db8::7]:4500", "[2001:db8::7]:4500"),
        ("[2001:db8::7]", "[2001:db8::7]:51820"),
        (" 198.51.100.7 ", "198.51.100.7:51820"),
    ],
)
def test_force_endpoint_forms(value: str, expected: str) -> None:
    node = _annotated(kubenode.ANNOTATION_FORCE_ENDPOINT, value)
    assert node_facts(node, 51820).force_endpoint == expected


def _annotated(name: str, value: str) -> dict[str, Any]:
    node = copy.deepcopy(KIND)
    node["metadata"]["annotations"][name] = value
    return node


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    node = copy.deepcopy(KIND)
    target = node
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return node


BAD_NODES: dict[str, tuple[Mapping[str, Any], str]] = {
    "cidr not a cidr": (_with(("spec", "podCIDRs"), ["10.244.1.0/33"]), "is not a CIDR"),
    "cidr host bits": (_with(("spec", "podCIDRs"), ["10.244.1.7/24"]), "zero host bits"),
    "cidr default": (_with(("spec", "podCIDRs"), ["0.0.0.0/0"]), "is a default route"),
    "cidrs not a list": (_with(("spec", "podCIDRs"), "10.244.1.0/24"), "is not a list"),
    "cidr not a string": (_with(("spec", "podCIDRs"), [42]), "is not a CIDR"),
    "internal ip": (_with(("status", "addresses"), [{"type": "InternalIP", "address": "x"}]),
                    "InternalIP 'x' is not an address"),
    "keepalive word": (_annotated(kubenode.ANNOTATION_KEEPALIVE, "often"),
                       "persistent-keepalive='often'"),
    "keepalive negative": (_annotated(kubenode.ANNOTATION_KEEPALIVE, "-5"), "not a number"),
    "keepalive huge": (_annotated(kubenode.ANNOTATION_KEEPALIVE, "70000"), "not a number"),
    "location upper": (_annotated(kubenode.ANNOTATION_LOCATION, "EU West"), "not a location"),
    "location long": (_annotated(kubenode.ANNOTATION_LOCATION, "a" * 64), "not a location"),
    "endpoint hostname": (_annotated(kubenode.ANNOTATION_FORCE_ENDPOINT, "node1.example:51820"),
                          "is not IP[:PORT]"),
    "endpoint port 0": (_annotated(kubenode.ANNOTATION_FORCE_ENDPOINT, "198.51.100.7:0"),
                        "is not IP[:PORT]"),
    "endpoint port big": (_annotated(kubenode.ANNOTATION_FORCE_ENDPOINT, "198.51.100.7:99999"),
                          "is not IP[:PORT]"),
    "endpoint junk": (_annotated(kubenode.ANNOTATION_FORCE_ENDPOINT, "[2001:db8::1]x"),
                      "is not IP[:PORT]"),
    "endpoint unspecified": (_annotated(kubenode.ANNOTATION_FORCE_ENDPOINT, "0.0.0.0"),
                             "is not IP[:PORT]"),
    "no name": (_with(("metadata", "name"), ""), "metadata.name is missing"),
    "spec not object": (_with(("spec",), []), "spec is not an object"),
    "annotation not string": (_with(("metadata", "annotations"), {"a": 1}), "to strings"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_NODES))
def test_malformed_nodes_are_refused_naming_the_field(case: str) -> None:
    node, message = BAD_NODES[case]
    with pytest.raises(BadInput) as caught:
        node_facts(node, 51820)
    assert message in caught.value.message


# --------------------------------------------------------------------------- the client layer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[web.Application, Path]]:
    """The stand-in API server on loopback and a kubeconfig pointing at it."""
    nodes = {"kind-worker": recorded("node-kind-worker.json"),
             "gke-prod-default-pool-3f1e2d4c-x7k2": recorded("node-gke.json")}  # fmt: skip
    app = kube_api_app(nodes, token=TOKEN, errors={"locked-node": 403, "sick-node": 500})
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}", TOKEN)
    yield app, kubeconfig
    await runner.cleanup()


async def test_the_client_reads_the_node(api: tuple[web.Application, Path]) -> None:
    app, kubeconfig = api
    document = await asyncio.to_thread(read_node, "kind-worker", kubeconfig)
    assert document == KIND
    (request,) = app[REQUESTS]
    assert request["path"] == "/api/v1/nodes/kind-worker"
    assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert request["headers"]["Accept"] == "application/json"


async def test_a_missing_node_is_not_found_with_a_hint(api: tuple[web.Application, Path]) -> None:
    with pytest.raises(NotFound) as caught:
        await asyncio.to_thread(read_node, "no-such-node", api[1])
    assert "no Node named 'no-such-node'" in caught.value.message
    assert caught.value.hint is not None and "NODE_NAME" in caught.value.hint


async def test_missing_rbac_is_forbidden_with_a_hint(api: tuple[web.Application, Path]) -> None:
    with pytest.raises(Forbidden) as caught:
        await asyncio.to_thread(read_node, "locked-node", api[1])
    assert caught.value.hint is not None and "get on nodes" in caught.value.hint


async def test_a_wrong_token_is_a_config_error(
    api: tuple[web.Application, Path], tmp_path: Path
) -> None:
    server = json.loads(api[1].read_text())["clusters"][0]["cluster"]["server"]
    wrong = write_kubeconfig(tmp_path / "wrong", server, "not-the-token")
    with pytest.raises(ConfigError, match="refused the agent's credentials"):
        await asyncio.to_thread(read_node, "kind-worker", wrong)  # not the gateway's 401


async def test_a_server_error_is_unavailable(api: tuple[web.Application, Path]) -> None:
    with pytest.raises(Unavailable, match="answered 500"):
        await asyncio.to_thread(read_node, "sick-node", api[1])


async def test_an_unreachable_api_is_unavailable(tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kc", f"http://127.0.0.1:{_free_port()}", TOKEN)
    with pytest.raises(Unavailable, match="unreachable"):
        await asyncio.to_thread(read_node, "kind-worker", kubeconfig)


def test_outside_a_cluster_without_kubeconfig_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="in-cluster ServiceAccount"):
        read_node("kind-worker", None)


def test_a_broken_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "kc"
    broken.write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(ConfigError):
        read_node("kind-worker", broken)


# --------------------------------------------------------------------------- the cache


class Reader:
    """Hands out documents (or raises errors) in order, counting the reads."""

    def __init__(self, *answers: Mapping[str, Any] | WiregateError) -> None:
        self.answers = list(answers)
        self.reads = 0

    def __call__(self, name: str, kubeconfig: Path | None) -> Mapping[str, Any]:
        answer = self.answers[min(self.reads, len(self.answers) - 1)]
        self.reads += 1
        if isinstance(answer, WiregateError):
            raise answer
        return answer


async def test_facts_are_cached_then_refreshed() -> None:
    clock, reader = FakeClock(1000.0), Reader(KIND, _annotated(kubenode.ANNOTATION_KEEPALIVE, "10"))
    source = NodeSource("kind-worker", None, 51820, reader=reader, clock=clock, refresh=300)
    assert (await source.facts()).persistent_keepalive == 25
    clock.now += 299
    assert (await source.facts()).persistent_keepalive == 25 and reader.reads == 1
    clock.now += 2
    assert (await source.facts()).persistent_keepalive == 10 and reader.reads == 2


async def test_a_failed_refresh_keeps_the_last_facts() -> None:
    clock = FakeClock(1000.0)
    reader = Reader(KIND, Unavailable("api down"), _annotated(kubenode.ANNOTATION_KEEPALIVE, "x"))
    source = NodeSource("kind-worker", None, 51820, reader=reader, clock=clock, refresh=10)
    first = await source.facts()
    clock.now += 11
    assert await source.facts() == first  # API down
    clock.now += 11
    assert await source.facts() == first  # a malformed annotation appeared
    assert reader.reads == 3


async def test_a_first_read_failure_is_raised() -> None:
    source = NodeSource(
        "kind-worker", None, 51820, reader=Reader(Forbidden("no")), clock=FakeClock(1000.0)
    )
    with pytest.raises(Forbidden):
        await source.facts()


def test_the_node_name_is_required() -> None:
    with pytest.raises(ConfigError) as caught:
        NodeSource("", None, 51820)
    assert caught.value.hint is not None and "NODE_NAME" in caught.value.hint


# --------------------------------------------------------------------------- what the agent uses


async def test_nothing_is_advertised_when_off(tmp_path: Path) -> None:
    settings = AgentSettings(state_dir=tmp_path, node_name="kind-worker")
    assert await kubenode.advertised_routes(settings) == []
    assert await kubenode.advertised_endpoints(settings) == []


async def test_routes_and_endpoints_from_the_api(api: tuple[web.Application, Path]) -> None:
    app, kubeconfig = api
    settings = AgentSettings(kubernetes=True, node_name="kind-worker", kubeconfig=kubeconfig,
                             listen_port=51900)  # fmt: skip
    assert await kubenode.advertised_routes(settings) == ["10.244.1.0/24", "fd00:10:244:1::/64"]
    assert await kubenode.advertised_endpoints(settings) == [
        "172.18.0.3:51900",
        "[fc00:f853:ccd:e793::3]:51900",
    ]
    assert len(app[REQUESTS]) == 1  # one read serves both


async def test_the_nodes_pod_cidrs_may_ask_for_names_when_asked_for(
    api: tuple[web.Application, Path],
) -> None:
    """``dns_allow_pods``: the Node's pod CIDRs; off, or the Node unreadable: none."""
    kubeconfig = api[1]
    on = AgentSettings(kubernetes=True, node_name="kind-worker", kubeconfig=kubeconfig,
                       dns_allow_pods=True)  # fmt: skip
    assert await kubenode.dns_pod_sources(on) == ("10.244.1.0/24", "fd00:10:244:1::/64")
    off = AgentSettings(kubernetes=True, node_name="kind-worker", kubeconfig=kubeconfig)
    assert await kubenode.dns_pod_sources(off) == ()
    locked = AgentSettings(kubernetes=True, node_name="locked-node", kubeconfig=kubeconfig,
                           dns_allow_pods=True)  # fmt: skip
    assert await kubenode.dns_pod_sources(locked) == ()


def test_node_name_comes_from_the_downward_api_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "kind-worker")
    monkeypatch.setenv("WIREGATE_KUBERNETES", "true")
    settings = AgentSettings()
    assert settings.node_name == "kind-worker" and settings.kubernetes


async def test_an_unreadable_node_costs_endpoints_a_warning_only(
    api: tuple[web.Application, Path],
) -> None:
    settings = AgentSettings(kubernetes=True, node_name="locked-node", kubeconfig=api[1])
    assert await kubenode.advertised_endpoints(settings) == []
    with pytest.raises(Forbidden):  # enrolling without its routes would be wrong: refused
        await kubenode.advertised_routes(settings)


def test_the_agent_daemonset_turns_node_integration_on() -> None:
    from lab.manifests import container, env_of, find, render

    docs = render("overlays/mesh")
    env = env_of(container(find(docs, "DaemonSet", "wiregate-agent"), "agent"))
    assert env["WIREGATE_KUBERNETES"]["value"] == "true"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    settings = AgentSettings.model_validate(
        {"kubernetes": env["WIREGATE_KUBERNETES"]["value"], "node_name": "n"}
    )
    assert settings.kubernetes is True
    role = find(docs, "ClusterRole", "wiregate-agent")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    ]
