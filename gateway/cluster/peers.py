"""Peer Services: the Kubernetes objects that give pods a name for each VM device.

For every selected device (one carrying the configured tag, or every device) the
cluster gets, in one namespace:

* a **headless, selector-less Service** named after the device
  (``db-vm.wiregate-peers.svc.cluster.local``), ``clusterIP: None``;
* one **EndpointSlice** per address family the device has (``db-vm-ipv4``,
  ``db-vm-ipv6``), labelled ``kubernetes.io/service-name: db-vm`` and
  ``endpointslice.kubernetes.io/managed-by: wiregate``, whose one endpoint is the
  device's tunnel address.

Cluster DNS answers the Service name with the tunnel addresses themselves (A and
AAAA), so pods connect straight to the VM through the node's tunnel: nothing is
proxied and no ClusterIP is allocated. The ports, if configured, become the
Service's and the slices' ports (and SRV records); without ports the Service is
still resolvable (headless Services may have none).

This module is pure: :func:`desired` turns devices into manifests,
:func:`observed` reads the objects listed from the API, and :func:`plan` compares
the two and returns the operations that make the cluster match. Only objects
carrying this controller's managed-by label are ever listed, replaced or deleted;
only the fields it owns are compared, so the API server's defaults (a port's
``targetPort``, the IP families) and other controllers' labels never cause churn.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from wiregate.model import Device
from wiregate.settings import GatewaySettings

__all__ = [
    "LABEL_DEVICE",
    "LABEL_MANAGED_BY",
    "LABEL_SERVICE_NAME",
    "LABEL_SLICE_MANAGED_BY",
    "MANAGED_BY",
    "Create",
    "Delete",
    "Desired",
    "Kind",
    "Observed",
    "Operation",
    "Port",
    "Replace",
    "Selection",
    "Skipped",
    "desired",
    "observed",
    "parse_port",
    "plan",
    "service_name",
]

MANAGED_BY = "wiregate"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_SLICE_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_DEVICE = "wiregate.io/device-id"
ANNOTATION_DEVICE_NAME = "wiregate.io/device-name"

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1035, as Services need
_PORT = re.compile(GatewaySettings.PEER_PORT)
_FAMILIES = (("IPv4", "ipv4"), ("IPv6", "ipv6"))


class Kind(StrEnum):
    """The two kinds of object the controller keeps."""

    SERVICE = "Service"
    SLICE = "EndpointSlice"


@dataclass(frozen=True, slots=True)
class Port:
    """One port of every peer Service: ``name`` (may be empty with a single port)."""

    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Selection:
    """Which devices get a Service, where, and with which ports."""

    namespace: str = "wiregate-peers"
    tag: str = "tag:vm"  # empty: every device
    ports: tuple[Port, ...] = ()

    def selects(self, device: Device) -> bool:
        return not self.tag or self.tag in device.tags


@dataclass(frozen=True, slots=True)
class Skipped:
    """A selected device that gets no Service, and why."""

    device_id: str
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Desired:
    """The objects that should exist, by (kind, name), and the devices left out."""

    objects: Mapping[tuple[Kind, str], Mapping[str, Any]]
    skipped: tuple[Skipped, ...] = ()


@dataclass(frozen=True, slots=True)
class Observed:
    """An object as the API returned it (carrying the managed-by label)."""

    kind: Kind
    name: str
    resource_version: str
    document: Mapping[str, Any] = field(compare=False)


@dataclass(frozen=True, slots=True)
class Create:
    kind: Kind
    name: str
    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Replace:
    """A PUT carrying the observed ``resourceVersion``: a concurrent write makes it 409."""

    kind: Kind
    name: str
    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Delete:
    kind: Kind
    name: str


Operation = Create | Replace | Delete


def parse_port(text: str) -> Port:
    """``[NAME:]PORT[/PROTOCOL]`` (``postgres:5432/TCP``, ``53/UDP``); ValueError if not."""
    found = _PORT.match(text.strip())
    port = int(found["port"]) if found else 0
    if found is None or not 0 < port < 65536:
        raise ValueError(
            f"{text!r} is not [NAME:]PORT[/TCP|UDP|SCTP] (a lower-case name, a port 1..65535)"
        )
    return Port(found["name"] or "", port, found["proto"] or "TCP")


def service_name(device_name: str) -> str | None:
    """The Service name of a device: its name in lower case, if that is a DNS label."""
    lowered = device_name.lower()
    return lowered if _DNS_LABEL.match(lowered) else None


# --------------------------------------------------------------------------- desired state


def desired(devices: Iterable[Device], selection: Selection) -> Desired:
    """The Services and EndpointSlices that ``devices`` call for.

    A device whose name is not a DNS label (a dot, an underscore, a leading digit) or
    whose name clashes with another's in lower case is skipped (and reported), never
    renamed: a made-up name could take another device's.
    """
    by_name: dict[str, list[Device]] = {}
    skipped: list[Skipped] = []
    for device in devices:
        if not selection.selects(device):
            continue
        name = service_name(device.name)
        if name is None:
            skipped.append(Skipped(device.id, device.name, "name is not a DNS label"))
        else:
            by_name.setdefault(name, []).append(device)
    objects: dict[tuple[Kind, str], Mapping[str, Any]] = {}
    for name, owners in sorted(by_name.items()):
        if len(owners) > 1:
            skipped += [Skipped(d.id, d.name, f"name clashes as {name!r}") for d in owners]
            continue
        objects[(Kind.SERVICE, name)] = _service(name, owners[0], selection)
        for family, slice_body in _slices(name, owners[0], selection):
            objects[(Kind.SLICE, f"{name}-{family.lower()}")] = slice_body
    return Desired(objects, tuple(sorted(skipped, key=lambda s: s.device_id)))


def _metadata(name: str, device: Device, namespace: str, **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEVICE: device.id, **labels},
        "annotations": {ANNOTATION_DEVICE_NAME: device.name},
    }


def _service(name: str, device: Device, selection: Selection) -> dict[str, Any]:
    ports = [{"name": p.name, "port": p.port, "protocol": p.protocol, "targetPort": p.port}
             for p in selection.ports]  # fmt: skip
    spec: dict[str, Any] = {"type": "ClusterIP", "clusterIP": "None"}
    if ports:
        spec["ports"] = ports
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, device, selection.namespace),
        "spec": spec,
    }


def _slices(name: str, device: Device, selection: Selection) -> list[tuple[str, dict[str, Any]]]:
    labels = {LABEL_SERVICE_NAME: name, LABEL_SLICE_MANAGED_BY: MANAGED_BY}
    out = []
    for family, attribute in _FAMILIES:
        address = getattr(device, attribute)
        if not address:
            continue
        body = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": _metadata(
                f"{name}-{family.lower()}", device, selection.namespace, **labels
            ),
            "addressType": family,
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
            "ports": [
                {"name": p.name, "port": p.port, "protocol": p.protocol} for p in selection.ports
            ],
        }
        out.append((family, body))
    return out


# --------------------------------------------------------------------------- observed state


def observed(kind: Kind, items: Iterable[Mapping[str, Any]]) -> dict[tuple[Kind, str], Observed]:
    """The listed objects of ``kind`` this controller manages, by (kind, name).

    The list was already filtered by label; an item without the label (a server that
    ignored the selector) is left out here too, so it is never touched.
    """
    found: dict[tuple[Kind, str], Observed] = {}
    for item in items:
        meta = item.get("metadata") or {}
        labels = meta.get("labels") or {}
        name = meta.get("name")
        if not isinstance(name, str) or labels.get(_managed_label(kind)) != MANAGED_BY:
            continue
        found[(kind, name)] = Observed(kind, name, str(meta.get("resourceVersion", "")), item)
    return found


def _managed_label(kind: Kind) -> str:
    return LABEL_MANAGED_BY if kind is Kind.SERVICE else LABEL_SLICE_MANAGED_BY


# --------------------------------------------------------------------------- the diff


def plan(want: Desired, have: Mapping[tuple[Kind, str], Observed]) -> list[Operation]:
    """The operations that turn ``have`` into ``want``: deletions first (a rename frees
    its old name; slices before their Service), then Services before their slices."""
    deletes: list[Operation] = [
        Delete(k, n) for (k, n) in sorted(have) if (k, n) not in want.objects
    ]
    writes: list[Operation] = []
    for key in sorted(want.objects, key=lambda kn: (kn[0] is Kind.SLICE, kn[1])):
        body = want.objects[key]
        current = have.get(key)
        if current is None:
            writes.append(Create(key[0], key[1], body))
        elif _immutable_differs(current, body):
            deletes.append(Delete(*key))
            writes.append(Create(key[0], key[1], body))
        elif owned(current.document) != owned(body):
            writes.append(Replace(key[0], key[1], merged(current.document, body)))
    return deletes + writes


def owned(document: Mapping[str, Any]) -> tuple[Any, ...]:
    """The fields of an object this controller sets, normalized for comparison."""
    meta = document.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    mine = (
        tuple(sorted((k, v) for k, v in labels.items() if k in _OWNED_LABELS)),
        annotations.get(ANNOTATION_DEVICE_NAME),
    )
    if document.get("kind") == "Service":
        spec = document.get("spec") or {}
        return (*mine, spec.get("type", "ClusterIP"), spec.get("clusterIP"),
                bool(spec.get("selector")), _ports(spec.get("ports")))  # fmt: skip
    endpoints = tuple(
        (tuple(e.get("addresses") or ()), (e.get("conditions") or {}).get("ready"))
        for e in document.get("endpoints") or ()
    )
    return (*mine, document.get("addressType"), endpoints, _ports(document.get("ports")))


_OWNED_LABELS = frozenset(
    {LABEL_MANAGED_BY, LABEL_SLICE_MANAGED_BY, LABEL_SERVICE_NAME, LABEL_DEVICE}
)


def _ports(ports: Any) -> tuple[tuple[str, Any, str], ...]:
    return tuple(
        sorted(
            (p.get("name") or "", p.get("port"), p.get("protocol") or "TCP") for p in ports or ()
        )
    )


def _immutable_differs(current: Observed, body: Mapping[str, Any]) -> bool:
    """Fields an update cannot change: a Service given a ClusterIP, a slice's family."""
    if current.kind is Kind.SERVICE:
        spec = current.document.get("spec") or {}
        return bool(spec.get("clusterIP") != body["spec"]["clusterIP"])
    return bool(current.document.get("addressType") != body["addressType"])


def merged(document: Mapping[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` (as observed, with its ``resourceVersion``) with the owned fields of
    ``body``: what the API server and others set is kept."""
    meta = dict(document.get("metadata") or {})
    want = body["metadata"]
    meta["labels"] = {**(meta.get("labels") or {}), **want["labels"]}
    meta["annotations"] = {**(meta.get("annotations") or {}), **want["annotations"]}
    out = {**document, "metadata": meta}
    if body["kind"] == "Service":
        spec = {**(document.get("spec") or {}), "type": "ClusterIP"}
        spec.pop("selector", None)
        spec["ports"] = body["spec"].get("ports", [])
        out["spec"] = spec
    else:
        out["endpoints"] = body["endpoints"]
        out["ports"] = body["ports"]
    return out
