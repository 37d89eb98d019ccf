"""The whole gateway with ``peer_services`` on, against the stand-in Kubernetes API:
enrolling a VM makes its Service and EndpointSlices, renaming moves them, revoking
removes them, all through the real ``kubernetes`` client."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.cluster import PEER_SERVICES
from lab.api_client import AUTH, ClientFactory, create_key, enroll, make_settings
from lab.kubeapi import OBJECTS, Objects, kube_api_app, write_kubeconfig
from wiregate.errors import ConfigError

TOKEN = "gateway-sa-token-0123456789"
NS = "wiregate-peers"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[tuple[Objects, Path]]:
    app = kube_api_app({}, token=TOKEN, namespaces=[NS])
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield app[OBJECTS], write_kubeconfig(tmp_path / "kc", f"http://127.0.0.1:{port}", TOKEN)
    await runner.cleanup()


async def until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"not within {timeout} s: {what}")


def addresses(objects: Objects, name: str) -> list[Any]:
    return [s["endpoints"][0]["addresses"][0] for s in objects.of("endpointslices", NS).values()
            if s["metadata"]["labels"]["kubernetes.io/service-name"] == name]  # fmt: skip


async def test_enroll_rename_revoke_reach_the_cluster(
    aiohttp_client: ClientFactory, tmp_path: Path, kube: tuple[Objects, Path]
) -> None:
    objects, kubeconfig = kube
    settings = make_settings(tmp_path, peer_services=True, peer_services_kubeconfig=kubeconfig,
                             peer_services_ports=["pg:5432/TCP"])  # fmt: skip
    client = await aiohttp_client(create_app(settings))
    secret = (await create_key(client, tags=["tag:vm"]))["secret"]
    resp = await enroll(client, secret, name="db-vm")
    assert resp.status == 201, await resp.text()
    device = (await resp.json())["device"]

    await until(lambda: list(objects.of("services", NS)) == ["db-vm"], "the Service")
    await until(lambda: len(addresses(objects, "db-vm")) == 2, "both slices")
    assert sorted(addresses(objects, "db-vm")) == sorted(device["addresses"])
    svc = objects.of("services", NS)["db-vm"]
    assert svc["spec"]["ports"][0]["port"] == 5432 and svc["spec"]["clusterIP"] == "None"
    assert client.app[PEER_SERVICES].status()["leader"] is True
    fqdn = "db-vm.wiregate-peers.svc.cluster.local"  # what cluster DNS would answer
    assert sorted(objects.dns_records()) == sorted((fqdn, a) for a in device["addresses"])

    renamed = await client.patch(f"/api/v1/devices/{device['id']}", json={"name": "pg-vm"},
                                 headers=AUTH)  # fmt: skip
    assert renamed.status == 200, await renamed.text()
    await until(lambda: list(objects.of("services", NS)) == ["pg-vm"], "the renamed Service")
    await until(lambda: len(addresses(objects, "pg-vm")) == 2, "the renamed slices")
    assert sorted(objects.of("endpointslices", NS)) == ["pg-vm-ipv4", "pg-vm-ipv6"]

    gone = await client.delete(f"/api/v1/devices/{device['id']}", headers=AUTH)
    assert gone.status == 204
    await until(lambda: not objects.items, "everything deleted")


async def test_without_a_cluster_configuration_the_gateway_refuses_to_start(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, peer_services=True,
                             peer_services_kubeconfig=tmp_path / "missing")  # fmt: skip
    with pytest.raises(ConfigError, match="peer_services: no Kubernetes client configuration"):
        await aiohttp_client(create_app(settings))
