"""The peer Services controller through the real ``kubernetes`` client, against the
stand-in API server (lab/kubeapi.py): creates, updates, deletes, drift, 409 and 403."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from gateway.cluster.kubeclient import connect
from gateway.cluster.peers import LABEL_MANAGED_BY, LABEL_SLICE_MANAGED_BY, Selection, desired
from gateway.cluster.runner import PeerServices
from gateway.store import EnrollRequest, KeySpec, Store
from gateway.store.records import DeviceRecord
from gateway.store.replication import ChangeKind, ChangeRow
from lab.fakes import FakeClock, new_key
from lab.kubeapi import OBJECTS, REQUESTS, Objects, kube_api_app, write_kubeconfig
from wiregate.errors import ConfigError, Forbidden, Unavailable
from wiregate.model import Device, Identity

TOKEN = "peer-services-token-0123456789"
NS = "wiregate-peers"
WHO = Identity("wiregate:enrollment-key", "key_1")


def vm(name: str, n: int = 7, tags: tuple[str, ...] = ("tag:vm",)) -> Device:
    return Device(id=f"dev_{name}", name=name, public_key="k", identity=WHO,
                  ipv4=f"100.64.0.{n}", ipv6=f"fd7a:7767:6174::{n}", tags=tags)  # fmt: skip


class Devices:
    """The store as the controller reads it: devices, a change feed, the lease."""

    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}
        self.version = 0
        self.changes: list[ChangeRow] = []
        self.lease = True

    def upsert(self, device: Device) -> None:
        self.version += 1
        self.devices[device.id] = device
        self.changes.append(ChangeRow(self.version, ChangeKind.UPSERT, device.id, None))

    def remove(self, device_id: str) -> None:
        self.version += 1
        del self.devices[device_id]
        self.changes.append(ChangeRow(self.version, ChangeKind.REMOVE, device_id, "revoked"))

    def pods(self, device_id: str) -> None:
        self.version += 1
        self.changes.append(ChangeRow(self.version, ChangeKind.PODS, device_id, None))

    async def map_version(self) -> int:
        return self.version

    async def list_devices(self) -> list[DeviceRecord]:
        return [DeviceRecord(d) for d in self.devices.values()]

    async def changes_since(
        self, version: int
    ) -> tuple[int, list[tuple[ChangeRow, DeviceRecord | None]]] | None:
        rows = [c for c in self.changes if c.version > version]
        found = [(c, self._record(c.device_id) if c.kind is ChangeKind.UPSERT else None)
                 for c in rows]  # fmt: skip
        return self.version, found

    def _record(self, device_id: str) -> DeviceRecord | None:
        device = self.devices.get(device_id)
        return None if device is None else DeviceRecord(device)

    async def take_lease(self, name: str, holder: str, ttl: float) -> bool:
        assert name == "peer-services"
        return self.lease


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[web.Application, Path]]:
    app = kube_api_app({}, token=TOKEN, namespaces=[NS, "elsewhere"])
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield app, write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}", TOKEN)
    await runner.cleanup()


class Rig:
    def __init__(self, app: web.Application, kubeconfig: Path, **selection: Any) -> None:
        self.app = app
        self.objects: Objects = app[OBJECTS]
        self.devices = Devices()
        self.clock = FakeClock(0.0)
        self.controller = PeerServices(
            self.devices, Selection(**selection), lambda: connect(kubeconfig, NS),
            map_version=lambda: self.devices.version, holder="replica-a", resync=300.0,
            clock=self.clock,
        )  # fmt: skip

    async def step(self) -> bool:
        self.clock.advance(1.0)
        return await self.controller.step()

    def names(self, resource: str = "services") -> list[str]:
        return list(self.objects.of(resource, NS))

    def slice_address(self, name: str) -> list[str]:
        return self.objects.of("endpointslices", NS)[name]["endpoints"][0]["addresses"]  # type: ignore[no-any-return]

    def calls(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"].rsplit("/", 1)[-1]) for r in self.app[REQUESTS]]


@pytest.fixture
async def rig(api: tuple[web.Application, Path]) -> AsyncIterator[Rig]:
    made = Rig(*api)
    yield made
    made.controller.close()


async def test_enrollment_creates_the_service_and_its_slices(rig: Rig) -> None:
    assert await rig.step()  # the first round is a full resync of nothing
    rig.devices.upsert(vm("db-vm"))
    rig.devices.upsert(vm("node-a", 8, tags=("tag:node",)))  # not selected
    assert await rig.step()
    assert rig.names() == ["db-vm"]
    assert rig.names("endpointslices") == ["db-vm-ipv4", "db-vm-ipv6"]
    svc = rig.objects.of("services", NS)["db-vm"]
    assert svc["spec"]["clusterIP"] == "None" and "selector" not in svc["spec"]
    assert svc["metadata"]["labels"][LABEL_MANAGED_BY] == "wiregate"
    assert rig.slice_address("db-vm-ipv4") == ["100.64.0.7"]
    assert rig.slice_address("db-vm-ipv6") == ["fd7a:7767:6174::7"]
    v6 = rig.objects.of("endpointslices", NS)["db-vm-ipv6"]
    assert v6["metadata"]["labels"]["kubernetes.io/service-name"] == "db-vm"
    assert v6["metadata"]["labels"][LABEL_SLICE_MANAGED_BY] == "wiregate"
    assert rig.app[REQUESTS][0]["headers"]["Authorization"] == f"Bearer {TOKEN}"
    before = len(rig.objects.writes)
    assert not await rig.step()  # nothing changed: no request at all
    assert len(rig.objects.writes) == before


async def test_readdress_and_rename_update_and_replace(rig: Rig) -> None:
    rig.devices.upsert(vm("db-vm", 7))
    await rig.step()
    rig.devices.upsert(vm("db-vm", 9))  # new addresses, same name
    rig.objects.writes.clear()
    await rig.step()
    assert rig.objects.writes == [("PUT", "endpointslices", "db-vm-ipv4"),
                                  ("PUT", "endpointslices", "db-vm-ipv6")]  # fmt: skip
    assert rig.slice_address("db-vm-ipv4") == ["100.64.0.9"]
    rig.devices.upsert(
        replace(vm("db-vm", 9), name="pg-vm")
    )  # the same device id  # PATCH /api/v1/devices/{id}
    await rig.step()
    assert rig.names() == ["pg-vm"]
    assert rig.names("endpointslices") == ["pg-vm-ipv4", "pg-vm-ipv6"]
    assert rig.slice_address("pg-vm-ipv6") == ["fd7a:7767:6174::9"]


async def test_revocation_deletes(rig: Rig) -> None:
    rig.devices.upsert(vm("db-vm", 7))
    rig.devices.upsert(vm("web", 8))
    await rig.step()
    rig.devices.remove("dev_db-vm")
    await rig.step()
    assert rig.names() == ["web"]
    assert rig.names("endpointslices") == ["web-ipv4", "web-ipv6"]


async def test_a_nodes_pods_change_leaves_its_service_alone(rig: Rig) -> None:
    rig.devices.upsert(vm("node-1", 7))
    await rig.step()
    rig.devices.pods("dev_node-1")  # the feed has no device row for it
    await rig.step()
    assert rig.names() == ["node-1"]


async def test_a_full_resync_fixes_drift_and_touches_only_its_own_objects(rig: Rig) -> None:
    rig.devices.upsert(vm("db-vm", 7))
    rig.devices.upsert(vm("web", 8))
    await rig.step()
    objects = rig.objects
    del objects.items[("services", NS, "db-vm")]  # deleted by hand
    web_svc = objects.of("services", NS)["web"]
    web_svc["spec"]["selector"] = {"app": "web"}  # the built-in controller would take over
    objects.put("services", NS, web_svc)
    v4 = objects.of("endpointslices", NS)["db-vm-ipv4"]
    v4["endpoints"] = [{"addresses": ["10.0.0.66"], "conditions": {"ready": True}}]
    objects.put("endpointslices", NS, v4)  # edited by hand
    ours = {LABEL_MANAGED_BY: "wiregate"}
    stale: dict[str, Any] = {"metadata": {"name": "gone-vm", "labels": ours},
                             "spec": {"clusterIP": "None"}}  # fmt: skip
    objects.put("services", NS, stale)  # a device removed while no replica was leader
    foreign = {"metadata": {"name": "postgres"}, "spec": {"clusterIP": "None"}}
    objects.put("services", NS, foreign)  # the user's own: never touched
    objects.put("services", "elsewhere", {**stale, "metadata": {**stale["metadata"]}})
    assert not await rig.step()  # no device change: the drift waits for the resync
    rig.clock.advance(300.0)
    assert await rig.step()
    assert rig.names() == ["db-vm", "postgres", "web"]
    assert rig.slice_address("db-vm-ipv4") == ["100.64.0.7"]
    web_spec = objects.of("services", NS)["web"]["spec"]
    assert "selector" not in web_spec and web_spec["ipFamilies"] == ["IPv4", "IPv6"]  # kept
    assert list(objects.of("services", "elsewhere")) == ["gone-vm"]  # another namespace
    assert (
        objects.of("services", NS)["postgres"]["metadata"]["resourceVersion"]
        == foreign["metadata"]["resourceVersion"]
    )


async def test_a_concurrent_write_is_a_409_then_a_retry_without_duplicates(rig: Rig) -> None:
    rig.devices.upsert(vm("db-vm", 7))
    await rig.step()
    # another writer changes the slice after the controller read it: its copy is stale
    v4 = rig.objects.of("endpointslices", NS)["db-vm-ipv4"]
    v4["metadata"]["labels"]["team.example/owner"] = "dba"
    rig.objects.put("endpointslices", NS, v4)
    rig.devices.upsert(vm("db-vm", 9))
    rig.app[REQUESTS].clear()
    rig.objects.writes.clear()
    assert await rig.step()
    assert rig.calls() == [("PUT", "db-vm-ipv4"), ("GET", "db-vm-ipv4"), ("PUT", "db-vm-ipv4"),
                           ("PUT", "db-vm-ipv6")]  # fmt: skip
    assert rig.controller.last_error is None
    slices = rig.objects.of("endpointslices", NS)
    assert list(slices) == ["db-vm-ipv4", "db-vm-ipv6"]
    assert slices["db-vm-ipv4"]["endpoints"][0]["addresses"] == ["100.64.0.9"]
    assert slices["db-vm-ipv4"]["metadata"]["labels"]["team.example/owner"] == "dba"  # kept


async def test_a_create_racing_another_replica_is_a_409_and_no_duplicate(rig: Rig) -> None:
    await rig.step()  # listed: nothing there
    rig.devices.upsert(vm("db-vm", 7))
    # another replica (which took the lease meanwhile) wrote the same objects
    for (kind, _name), body in desired([vm("db-vm", 7)], Selection()).objects.items():
        resource = "services" if kind == "Service" else "endpointslices"
        rig.objects.put(resource, NS, {**body, "metadata": dict(body["metadata"])})
    rig.app[REQUESTS].clear()
    rig.objects.writes.clear()
    await rig.step()
    assert [c for c in rig.calls() if c[0] == "POST"] == [("POST", "services")] + [
        ("POST", "endpointslices")
    ] * 2
    assert rig.objects.writes == []  # all three were there already, as wanted
    assert rig.names() == ["db-vm"] and len(rig.names("endpointslices")) == 2
    assert rig.controller.last_error is None


async def test_a_name_taken_by_someone_else_is_left_alone(rig: Rig) -> None:
    theirs = rig.objects.put("services", NS, {"metadata": {"name": "db-vm"},
                                              "spec": {"clusterIP": "None"}})  # fmt: skip
    version = theirs["metadata"]["resourceVersion"]
    rig.devices.upsert(vm("db-vm", 7))
    await rig.step()
    assert rig.objects.of("services", NS)["db-vm"]["metadata"]["resourceVersion"] == version
    assert rig.names("endpointslices") == []  # no slices attached to someone else's Service
    assert REGISTRY.get_sample_value("wiregate_peer_services_name_taken_total") >= 1  # type: ignore[operator]


async def test_missing_rbac_is_reported_and_backed_off(rig: Rig) -> None:
    rig.objects.forbidden.add(NS)
    rig.devices.upsert(vm("db-vm", 7))
    assert await rig.step()
    error = rig.controller.last_error
    assert isinstance(error, Forbidden)
    assert "may not manage services in namespace 'wiregate-peers' (403)" in error.message
    assert error.hint is not None and "components/peer-services" in error.hint
    assert rig.controller.status()["forbidden"] is True
    assert REGISTRY.get_sample_value("wiregate_peer_services_forbidden") == 1
    rig.app[REQUESTS].clear()
    assert not await rig.step()  # backing off: no request
    assert rig.app[REQUESTS] == []
    rig.objects.forbidden.clear()
    rig.clock.advance(60.0)
    assert await rig.step()
    assert rig.names() == ["db-vm"]
    assert rig.controller.last_error is None
    assert REGISTRY.get_sample_value("wiregate_peer_services_forbidden") == 0


async def test_a_replica_without_the_lease_does_nothing(rig: Rig) -> None:
    rig.devices.lease = False
    rig.devices.upsert(vm("db-vm", 7))
    assert not await rig.step()
    assert rig.app[REQUESTS] == []
    assert rig.controller.status()["leader"] is False


async def test_no_cluster_configuration_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="peer_services: no Kubernetes client configuration"):
        connect(tmp_path / "missing", NS)


async def test_lists_follow_continue_tokens(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.cluster.kubeclient.PAGE", 2)
    for i, name in enumerate(("a-vm", "b-vm", "c-vm")):
        rig.devices.upsert(vm(name, 10 + i))
    await rig.step()
    rig.clock.advance(300.0)
    rig.app[REQUESTS].clear()
    assert await rig.step()  # a full resync: 6 slices listed 2 at a time, nothing written
    lists = [r["path"] for r in rig.app[REQUESTS] if r["method"] == "GET"]
    assert lists.count(f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices") == 3
    assert all(r["method"] == "GET" for r in rig.app[REQUESTS])


async def test_a_server_error_is_retried_after_a_back_off(rig: Rig) -> None:
    rig.objects.faults.append(("POST", "endpointslices", 500))
    rig.devices.upsert(vm("db-vm", 7))
    assert await rig.step()
    assert isinstance(rig.controller.last_error, Unavailable)
    assert "answered 500 for EndpointSlice 'db-vm-ipv4'" in rig.controller.last_error.message
    assert REGISTRY.get_sample_value("wiregate_peer_services_failing") == 1
    rig.clock.advance(10.0)
    assert await rig.step()  # a full resync: the Service is there, the slices are added
    assert rig.names() == ["db-vm"] and len(rig.names("endpointslices")) == 2
    assert REGISTRY.get_sample_value("wiregate_peer_services_failing") == 0


async def test_an_unexpected_fault_is_a_failed_round_not_a_crash(
    api: tuple[web.Application, Path],
) -> None:
    def broken() -> Any:
        raise RuntimeError("no client today")

    devices = Devices()
    devices.upsert(vm("db-vm", 7))
    controller = PeerServices(devices, Selection(), broken, map_version=lambda: devices.version,
                              holder="a", clock=FakeClock(0.0))  # fmt: skip
    assert await controller.step()
    assert controller.status()["error"] == (
        "peer Services round failed: RuntimeError('no client today')"
    )


async def test_one_replica_holds_the_duty_and_another_takes_over(
    api: tuple[web.Application, Path], tmp_path: Path
) -> None:
    """Two controllers on one real store: the ``peer-services`` lease picks one."""
    app, kubeconfig = api
    clock = FakeClock(1_800_000_000.0)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}", clock=clock)
    try:
        _, secret = await store.create_key(KeySpec(tags=("tag:vm",), reusable=True))
        enrolled = await store.enroll(secret, EnrollRequest(new_key(), "db-vm"))
        version = [await store.map_version()]
        a, b = (PeerServices(store, Selection(), lambda: connect(kubeconfig, NS),
                             map_version=lambda: version[0], holder=holder, clock=clock)
                for holder in ("replica-a", "replica-b"))  # fmt: skip
        assert await a.step()
        assert list(app[OBJECTS].of("services", NS)) == ["db-vm"]
        app[REQUESTS].clear()
        assert not await b.step()  # a holds the lease
        assert app[REQUESTS] == [] and b.status()["leader"] is False
        clock.advance(31.0)  # a stopped renewing: the lease ran out
        await store.delete_device(enrolled.record.device.id)
        version[0] = await store.map_version()
        assert await b.step()  # b takes over with a full resync and deletes
        assert b.status()["leader"] is True
        assert app[OBJECTS].items == {}
        assert not await a.step()  # a is back, but b holds the lease now
        a.close()
        b.close()
    finally:
        await store.close()
