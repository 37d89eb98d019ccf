"""Service CIDRs and gateway mode: what a node advertises beyond its own pods, and the
masquerade of tunnel traffic it sends onward (pure parts, and the real client against
the served NodeList)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent import kubenode
from agent.kubenode import cluster_pod_cidrs, forwarding_ruleset, list_nodes, service_cidrs
from lab.cluster import cluster_api_app
from lab.kubeapi import recorded, write_kubeconfig
from wiregate.errors import BadInput, ConfigError
from wiregate.settings import AgentSettings

TOKEN = "cluster-token"


def _node(name: str, cidrs: list[str], labels: dict[str, str] | None = None) -> dict[str, Any]:
    doc = json.loads(recorded("node-kind-worker.json"))
    doc["metadata"]["name"] = name
    doc["metadata"]["labels"] = {**doc["metadata"].get("labels", {}), **(labels or {})}
    doc["spec"]["podCIDRs"] = cidrs
    doc["spec"].pop("podCIDR", None)
    return dict(doc)


GATEWAY = {"wiregate.io/gateway": "true"}
NODES = {
    "gw-a": _node("gw-a", ["10.244.0.0/24", "fd00:10:244::/64"], GATEWAY),
    "gw-b": _node("gw-b", ["10.244.1.0/24"], GATEWAY),
    "w-1": _node("w-1", ["10.244.2.0/24", "fd00:10:244:2::/64"]),
    "w-2": _node("w-2", ["10.244.3.0/24"]),
    "w-3": _node("w-3", []),  # not yet given a pod CIDR
}


def test_gateway_mode_routes_the_pods_of_every_node_without_an_agent() -> None:
    listing = {"kind": "NodeList", "items": list(NODES.values())}
    assert cluster_pod_cidrs(listing, "gw-a") == (
        "10.244.2.0/24", "fd00:10:244:2::/64", "10.244.3.0/24",
    )  # fmt: skip
    # the other gateway node advertises its own: nobody else carries it
    assert "10.244.1.0/24" not in cluster_pod_cidrs(listing, "gw-a")
    assert cluster_pod_cidrs({"items": []}, "gw-a") == ()


@pytest.mark.parametrize(
    ("listing", "message"),
    [
        ({"kind": "NodeList"}, "NodeList items is not a list"),
        ({"items": ["x"]}, "NodeList item is not an object"),
        ({"items": [_node("w-9", ["10.244.9.1/24"])]}, "'w-9'"),
        ({"items": [{"metadata": {"labels": "x"}}]}, "metadata.labels is not an object"),
    ],
)
def test_a_malformed_node_list_is_refused(listing: dict[str, Any], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        cluster_pod_cidrs(listing, "gw-a")


def test_service_cidrs_are_checked_and_canonical() -> None:
    assert service_cidrs([" 10.96.0.0/12", "fd00:96::/108", "10.96.0.0/12"]) == (
        "10.96.0.0/12", "fd00:96::/108",
    )  # fmt: skip
    for bad in ("10.96.0.1/12", "0.0.0.0/0", "cluster"):
        with pytest.raises(ConfigError, match="kube_service_cidrs entry"):
            service_cidrs([bad])


def test_the_forwarding_table_masquerades_only_what_goes_onward() -> None:
    script = forwarding_ruleset(
        "wg0", ("10.244.0.0/24", "fd00:10:244::/64"), ("10.244.2.0/24", "10.244.3.0/24"), True
    )
    assert script.startswith("table inet wiregate-kube\ndelete table inet wiregate-kube\n")
    assert 'iifname "wg0" ct state new ct mark set ct mark or 0x57470000' in script
    mark = "ct mark and 0x57470000 == 0x57470000"
    assert f'{mark} oifname != "wg0" ip daddr {{ 10.244.2.0/24, 10.244.3.0/24 }} masquerade' in (
        script
    )
    # a Service translated to a pod elsewhere (even through the tunnel) comes back here
    assert (
        f"{mark} meta nfproto ipv4 ct status dnat ip daddr != {{ 10.244.0.0/24 }} masquerade"
        in (script)
    )
    assert "ip6 daddr != { fd00:10:244::/64 }" in script
    assert "ip6 daddr {" not in script  # no IPv6 onward prefixes: no rule for them


def test_without_onward_routes_or_services_the_table_is_removed() -> None:
    script = forwarding_ruleset("wg0", ("10.244.0.0/24",), (), False)
    assert script == "table inet wiregate-kube\ndelete table inet wiregate-kube\n"


# --------------------------------------------------------------------------- the real client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Path]:
    nodes = {name: json.dumps(doc).encode() for name, doc in NODES.items()}
    runner = web.AppRunner(cluster_api_app(nodes, token=TOKEN))
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}", TOKEN)
    await runner.cleanup()


async def test_a_gateway_node_advertises_its_pods_services_and_the_others_pods(
    api: Path,
) -> None:
    settings = AgentSettings(kubernetes=True, node_name="gw-a", kubeconfig=api,
                             kube_gateway=True, kube_service_cidrs=["10.96.0.0/12"])  # fmt: skip
    assert await kubenode.advertised_routes(settings) == [
        "10.244.0.0/24", "fd00:10:244::/64", "10.96.0.0/12",
        "10.244.2.0/24", "fd00:10:244:2::/64", "10.244.3.0/24",
    ]  # fmt: skip
    mesh = AgentSettings(kubernetes=True, node_name="w-1", kubeconfig=api,
                         kube_service_cidrs=["10.96.0.0/12"])  # fmt: skip
    assert await kubenode.advertised_routes(mesh) == [
        "10.244.2.0/24", "fd00:10:244:2::/64", "10.96.0.0/12",
    ]  # fmt: skip


class RecordingNft:
    def __init__(self) -> None:
        self.scripts: list[str] = []

    def run(self, script: str) -> None:
        self.scripts.append(script)


async def test_apply_forwarding_installs_the_onward_masquerade(api: Path) -> None:
    nft = RecordingNft()
    settings = AgentSettings(kubernetes=True, node_name="gw-b", kubeconfig=api,
                             kube_gateway=True, interface="wg9")  # fmt: skip
    await kubenode.apply_forwarding(settings, nft)
    (script,) = nft.scripts
    assert 'oifname != "wg9" ip daddr { 10.244.2.0/24, 10.244.3.0/24 } masquerade' in script
    assert "ct status dnat" not in script  # no Service CIDR configured


async def test_a_refused_node_list_leaves_the_table_and_warns(tmp_path: Path) -> None:
    nft = RecordingNft()
    kubeconfig = write_kubeconfig(tmp_path / "k", f"http://127.0.0.1:{_free_port()}", TOKEN)
    settings = AgentSettings(kubernetes=True, node_name="gone", kubeconfig=kubeconfig,
                             kube_gateway=True)  # fmt: skip
    await kubenode.apply_forwarding(settings, nft)  # no raise: fail static
    assert nft.scripts == []


async def test_the_client_lists_nodes_and_maps_a_bad_token(api: Path, tmp_path: Path) -> None:
    import asyncio

    listing = await asyncio.to_thread(list_nodes, api)
    assert [i["metadata"]["name"] for i in listing["items"]] == list(NODES)
    server = json.loads(api.read_text())["clusters"][0]["cluster"]["server"]
    wrong = write_kubeconfig(tmp_path / "wrong", server, "not-the-token")
    with pytest.raises(ConfigError, match="401"):
        await asyncio.to_thread(list_nodes, wrong)


async def test_a_list_without_rbac_is_forbidden_with_the_component_named(tmp_path: Path) -> None:
    import asyncio

    from wiregate.errors import Forbidden

    async def forbidden(_: web.Request) -> web.Response:
        return web.json_response(json.loads(recorded("status-403.json")), status=403)

    app = web.Application()
    app.router.add_get("/api/v1/nodes", forbidden)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        kubeconfig = write_kubeconfig(tmp_path / "k", f"http://127.0.0.1:{port}", TOKEN)
        with pytest.raises(Forbidden, match="may not list Nodes") as caught:
            await asyncio.to_thread(list_nodes, kubeconfig)
        assert caught.value.hint is not None and "gateway-mode" in caught.value.hint
    finally:
        await runner.cleanup()
