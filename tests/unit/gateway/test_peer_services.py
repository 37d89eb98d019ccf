"""The pure core of the peer Services: devices in, Services and EndpointSlices out, a diff."""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cluster.peers import (
    LABEL_DEVICE,
    LABEL_MANAGED_BY,
    LABEL_SERVICE_NAME,
    LABEL_SLICE_MANAGED_BY,
    Create,
    Delete,
    Kind,
    Observed,
    Port,
    Replace,
    Selection,
    desired,
    observed,
    parse_port,
    plan,
    service_name,
)
from wiregate.model import Device, Identity

WHO = Identity("wiregate:enrollment-key", "key_1")
VMS = Selection()


def vm(name: str, n: int = 7, tags: tuple[str, ...] = ("tag:vm",), **kw: Any) -> Device:
    return Device(id=f"dev_{name}", name=name, public_key="k", identity=WHO,
                  ipv4=f"100.64.0.{n}", ipv6=f"fd7a:7767:6174::{n}", tags=tags, **kw)  # fmt: skip


def served(want_objects: dict[tuple[Kind, str], Any], version: int = 1) -> dict[Any, Observed]:
    """What the API returns after creating ``want_objects``: defaults filled in."""
    out = {}
    for (kind, name), body in want_objects.items():
        doc = copy.deepcopy(dict(body))
        doc["metadata"]["resourceVersion"] = str(version)
        doc["metadata"]["uid"] = f"uid-{name}"
        doc["metadata"]["labels"]["other.example/team"] = "db"  # someone else's label
        if kind is Kind.SERVICE:
            doc["spec"].update(clusterIPs=["None"], ipFamilyPolicy="RequireDualStack",
                               ipFamilies=["IPv4", "IPv6"], sessionAffinity="None")  # fmt: skip
        out[(kind, name)] = Observed(kind, name, str(version), doc)
    return out


def test_a_vm_gets_a_headless_service_and_a_slice_per_family() -> None:
    want = desired([vm("db-vm")], VMS)
    assert set(want.objects) == {
        (Kind.SERVICE, "db-vm"), (Kind.SLICE, "db-vm-ipv4"), (Kind.SLICE, "db-vm-ipv6")
    }  # fmt: skip
    svc = want.objects[(Kind.SERVICE, "db-vm")]
    assert svc["metadata"]["namespace"] == "wiregate-peers"
    assert svc["spec"] == {"type": "ClusterIP", "clusterIP": "None"}  # no selector, no ports
    assert svc["metadata"]["labels"] == {LABEL_MANAGED_BY: "wiregate", LABEL_DEVICE: "dev_db-vm"}
    v4 = want.objects[(Kind.SLICE, "db-vm-ipv4")]
    assert v4["addressType"] == "IPv4"
    assert v4["endpoints"] == [{"addresses": ["100.64.0.7"], "conditions": {"ready": True}}]
    assert v4["metadata"]["labels"][LABEL_SERVICE_NAME] == "db-vm"
    assert v4["metadata"]["labels"][LABEL_SLICE_MANAGED_BY] == "wiregate"
    v6 = want.objects[(Kind.SLICE, "db-vm-ipv6")]
    assert v6["addressType"] == "IPv6" and v6["endpoints"][0]["addresses"] == ["fd7a:7767:6174::7"]


def test_only_devices_with_the_tag_unless_the_tag_is_empty() -> None:
    devices = [vm("db-vm"), vm("node-a", 8, tags=("tag:node",))]
    assert {n for k, n in desired(devices, VMS).objects if k is Kind.SERVICE} == {"db-vm"}
    every = desired(devices, Selection(tag=""))
    assert {n for k, n in every.objects if k is Kind.SERVICE} == {"db-vm", "node-a"}


def test_a_device_without_an_ipv6_address_gets_one_slice() -> None:
    want = desired([replace(vm("db-vm"), ipv6="")], VMS)
    assert (Kind.SLICE, "db-vm-ipv6") not in want.objects
    assert (Kind.SLICE, "db-vm-ipv4") in want.objects


def test_ports_go_on_the_service_and_the_slices() -> None:
    sel = Selection(namespace="peers", ports=(Port("postgres", 5432), Port("dns", 53, "UDP")))
    want = desired([vm("db-vm")], sel)
    svc = want.objects[(Kind.SERVICE, "db-vm")]
    assert svc["spec"]["ports"] == [
        {"name": "postgres", "port": 5432, "protocol": "TCP", "targetPort": 5432},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
    ]
    assert want.objects[(Kind.SLICE, "db-vm-ipv4")]["ports"] == [
        {"name": "postgres", "port": 5432, "protocol": "TCP"},
        {"name": "dns", "port": 53, "protocol": "UDP"},
    ]
    assert svc["metadata"]["namespace"] == "peers"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("db-vm", "db-vm"), ("DB-VM", "db-vm"), ("db.vm", None), ("db_vm", None), ("1db", None),
     ("db-", None), ("a" * 63, "a" * 63)],
)  # fmt: skip
def test_service_names(name: str, expected: str | None) -> None:
    assert service_name(name) == expected


def test_devices_whose_names_are_not_dns_labels_or_clash_are_skipped_and_reported() -> None:
    want = desired([vm("db.vm", 1), vm("Web", 2), vm("web", 3), vm("ok", 4)], VMS)
    assert {n for k, n in want.objects if k is Kind.SERVICE} == {"ok"}
    assert [(s.name, s.reason) for s in want.skipped] == [
        ("Web", "name clashes as 'web'"),
        ("db.vm", "name is not a DNS label"),
        ("web", "name clashes as 'web'"),
    ]


@pytest.mark.parametrize(
    ("text", "port"),
    [("5432", Port("", 5432)), ("postgres:5432/TCP", Port("postgres", 5432)),
     ("dns:53/UDP", Port("dns", 53, "UDP")), ("9/SCTP", Port("", 9, "SCTP"))],
)  # fmt: skip
def test_ports_parse(text: str, port: Port) -> None:
    assert parse_port(text) == port


@pytest.mark.parametrize("text", ["0", "65536", "Postgres:5432", "x:", "5432/tcp", "a_b:1", ""])
def test_bad_ports_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"\[NAME:\]PORT"):
        parse_port(text)


# -- the diff -------------------------------------------------------------------------


def test_nothing_observed_creates_services_before_slices() -> None:
    ops = plan(desired([vm("db-vm")], VMS), {})
    assert [(type(o), o.kind, o.name) for o in ops] == [
        (Create, Kind.SERVICE, "db-vm"),
        (Create, Kind.SLICE, "db-vm-ipv4"),
        (Create, Kind.SLICE, "db-vm-ipv6"),
    ]


def test_in_step_is_no_operation_despite_server_defaults_and_foreign_labels() -> None:
    want = desired([vm("db-vm")], Selection(ports=(Port("pg", 5432),)))
    have = served(dict(want.objects))
    svc = have[(Kind.SERVICE, "db-vm")].document
    del svc["spec"]["ports"][0]["targetPort"]  # the defaults as the server reports them
    assert plan(want, have) == []


def test_a_readdress_replaces_the_slices_keeping_the_server_fields() -> None:
    want = desired([vm("db-vm", 7)], VMS)
    have = served(dict(want.objects), version=41)
    ops = plan(desired([vm("db-vm", 9)], VMS), have)
    assert [(type(o), o.name) for o in ops] == [(Replace, "db-vm-ipv4"), (Replace, "db-vm-ipv6")]
    body = ops[0].body  # type: ignore[union-attr]
    assert body["endpoints"][0]["addresses"] == ["100.64.0.9"]
    assert body["metadata"]["resourceVersion"] == "41"  # optimistic concurrency
    assert body["metadata"]["uid"] == "uid-db-vm-ipv4"
    assert body["metadata"]["labels"]["other.example/team"] == "db"  # not ours: kept


def test_a_rename_deletes_the_old_names_then_creates_the_new() -> None:
    have = served(dict(desired([vm("db-vm")], VMS).objects))
    renamed = replace(vm("db-vm"), name="pg-vm")
    ops = plan(desired([renamed], VMS), have)
    assert [(type(o).__name__, o.name) for o in ops] == [
        ("Delete", "db-vm-ipv4"), ("Delete", "db-vm-ipv6"), ("Delete", "db-vm"),
        ("Create", "pg-vm"), ("Create", "pg-vm-ipv4"), ("Create", "pg-vm-ipv6"),
    ]  # fmt: skip


def test_a_removed_device_is_deleted() -> None:
    have = served(dict(desired([vm("db-vm"), vm("web", 8)], VMS).objects))
    ops = plan(desired([vm("web", 8)], VMS), have)
    assert ops == [Delete(Kind.SLICE, "db-vm-ipv4"), Delete(Kind.SLICE, "db-vm-ipv6"),
                   Delete(Kind.SERVICE, "db-vm")]  # fmt: skip


def test_drift_is_fixed() -> None:
    want = desired([vm("db-vm")], VMS)
    have = served(dict(want.objects))
    doc = cast(dict[str, Any], have[(Kind.SLICE, "db-vm-ipv4")].document)
    doc["endpoints"] = [{"addresses": ["10.0.0.66"], "conditions": {"ready": True}}]
    svc = have[(Kind.SERVICE, "db-vm")].document
    svc["spec"]["selector"] = {"app": "hijack"}  # a selector would let another controller in
    ops = plan(want, have)
    assert [(type(o), o.name) for o in ops] == [(Replace, "db-vm"), (Replace, "db-vm-ipv4")]
    assert "selector" not in ops[0].body["spec"]  # type: ignore[union-attr]


def test_a_service_given_a_cluster_ip_is_recreated() -> None:
    want = desired([vm("db-vm")], VMS)
    have = served(dict(want.objects))
    have[(Kind.SERVICE, "db-vm")].document["spec"]["clusterIP"] = "10.96.0.12"
    ops = plan(want, have)
    body = want.objects[(Kind.SERVICE, "db-vm")]
    assert ops == [Delete(Kind.SERVICE, "db-vm"), Create(Kind.SERVICE, "db-vm", body)]


def test_observed_keeps_only_objects_with_the_managed_by_label() -> None:
    mine = {"metadata": {"name": "a", "resourceVersion": "3",
                         "labels": {LABEL_SLICE_MANAGED_BY: "wiregate"}}}  # fmt: skip
    builtin = "endpointslice-controller.k8s.io"
    theirs = {"metadata": {"name": "b", "labels": {LABEL_SLICE_MANAGED_BY: builtin}}}
    unlabelled = {"metadata": {"name": "c"}}
    found = observed(Kind.SLICE, [mine, theirs, unlabelled])
    assert list(found) == [(Kind.SLICE, "a")] and found[(Kind.SLICE, "a")].resource_version == "3"
    # a Service is recognised by the common managed-by label, not the slice one
    assert observed(Kind.SERVICE, [mine]) == {}


names = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)


@given(st.dictionaries(names, st.integers(1, 250), max_size=6),
       st.dictionaries(names, st.integers(1, 250), max_size=6))  # fmt: skip
def test_applying_the_plan_converges(before: dict[str, int], after: dict[str, int]) -> None:
    """Whatever was there, the plan's operations leave exactly the desired objects, and a
    second plan is empty."""
    have = served(dict(desired([vm(n, i) for n, i in before.items()], VMS).objects))
    want = desired([vm(n, i) for n, i in after.items()], VMS)
    state = dict(have)
    for op in plan(want, have):
        if isinstance(op, Delete):
            del state[(op.kind, op.name)]
        else:
            assert isinstance(op, Create) or (op.kind, op.name) in state
            state.update(served({(op.kind, op.name): op.body}, version=2))
    assert set(state) == set(want.objects)
    assert plan(want, state) == []


# -- settings ---------------------------------------------------------------------------


def test_settings_default_off_and_choose_the_selection() -> None:
    from gateway.cluster.runner import selection_of
    from wiregate.settings import GatewaySettings

    assert GatewaySettings().peer_services is False
    settings = GatewaySettings(peer_services_namespace="peers", peer_services_tag="",
                               peer_services_ports=["pg:5432", "dns:53/UDP"])  # fmt: skip
    assert selection_of(settings) == Selection(
        "peers", "", (Port("pg", 5432), Port("dns", 53, "UDP"))
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("peer_services_namespace", "Wiregate_Peers", "namespace name"),
     ("peer_services_ports", ["pg:99999"], "not [NAME:]PORT"),
     ("peer_services_ports", ["5432", "53/UDP"], "each needs a NAME"),
     ("peer_services_ports", ["a:1", "a:2"], "names repeat"),
     ("peer_services_resync", 1.0, "greater than or equal to 5")],
)  # fmt: skip
def test_bad_settings_are_refused(field: str, value: object, message: str) -> None:
    from pydantic import ValidationError

    from wiregate.settings import GatewaySettings

    with pytest.raises(ValidationError, match=re.escape(message)):
        GatewaySettings.model_validate({field: value})
