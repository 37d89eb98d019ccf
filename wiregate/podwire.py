"""The ``pods`` message: a node agent's report of the pods scheduled on its node (pure codec).

A node agent sends, on its map stream, next to ``endpoints`` and ``paths``::

    {"type": "pods", "full": true,
     "upsert": [{"namespace": "payments", "name": "billing-7d9f",
                 "ips": ["10.244.1.5", "fd00:10:244:1::5"],
                 "service_account": "billing", "labels": {"app": "ledger"}}, ...],
     "remove": []}

``full: true`` replaces everything the gateway holds for this node with ``upsert``
(``remove`` is then empty); ``full: false`` adds or replaces the pods in ``upsert`` and
forgets those in ``remove`` (``"namespace/name"`` keys). A pod is known by
``namespace/name``; ``ips`` are its pod IPs (normal form, at most one per family, none
while it has no IP yet), ``labels`` only the labels the node reports (the agent's
``pod_labels`` setting selects which; the policy can match no others). A message
carries at most :data:`MAX_PODS` pods; an agent with more sends a ``full`` message and
then deltas. Every field is required and nothing else is read: unknown fields,
duplicate pods, names Kubernetes would refuse are refused with a :class:`PodReportError`
naming the field.

Whether the node may claim an IP (it must lie in the node's own pod CIDRs) is the
gateway's decision, not this codec's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from wiregate import strictjson
from wiregate.errors import BadInput
from wiregate.strictjson import StrictJSONError

__all__ = [
    "MAX_LABELS",
    "MAX_PODS",
    "Pod",
    "PodReport",
    "PodReportError",
    "build_pods",
    "parse_pods",
    "pod_key",
    "read_pods",
]

MAX_PODS: Final = 1000
MAX_LABELS: Final = 32
_FIELDS: Final = frozenset({"namespace", "name", "ips", "service_account", "labels"})
_MESSAGE: Final = frozenset({"type", "full", "upsert", "remove"})
_LABEL: Final = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_DNS_LABEL: Final = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN: Final = re.compile(
    r"(?=.{1,253}$)[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
)


class PodReportError(BadInput):
    """A ``pods`` message that is not well formed (the message names the field)."""


@dataclass(frozen=True, slots=True)
class Pod:
    """One pod as its node reports it."""

    namespace: str
    name: str
    ips: tuple[str, ...]
    service_account: str
    labels: tuple[tuple[str, str], ...] = ()  # sorted by key

    @property
    def key(self) -> str:
        return pod_key(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class PodReport:
    """A ``pods`` message: everything (``full``) or a change."""

    full: bool
    upsert: tuple[Pod, ...] = ()
    remove: tuple[str, ...] = field(default=())


def pod_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def build_pods(
    full: bool, upsert: Iterable[Pod] = (), remove: Iterable[str] = ()
) -> dict[str, Any]:
    """The JSON form of a ``pods`` message."""
    return {
        "type": "pods",
        "full": full,
        "upsert": [
            {
                "namespace": p.namespace,
                "name": p.name,
                "ips": list(p.ips),
                "service_account": p.service_account,
                "labels": dict(p.labels),
            }
            for p in upsert
        ],
        "remove": list(remove),
    }


def parse_pods(text: str | bytes) -> PodReport:
    """A ``pods`` message's text; repeated keys and non-finite numbers are refused."""
    try:
        doc = strictjson.loads(text)
    except StrictJSONError as exc:
        raise PodReportError(f"pods: not strict JSON: {exc}") from None
    return read_pods(doc)


def read_pods(doc: Any) -> PodReport:
    """A decoded ``pods`` message, or :class:`PodReportError` naming the field."""
    if not isinstance(doc, dict) or doc.get("type") != "pods":
        raise PodReportError('pods: expected an object with type "pods"')
    extra = sorted(set(doc) - _MESSAGE)
    if extra:
        raise PodReportError(f"pods: unknown field {extra[0]!r}")
    full = doc.get("full")
    if type(full) is not bool:
        raise PodReportError("pods.full: expected true or false")
    upsert, remove = doc.get("upsert"), doc.get("remove")
    if not isinstance(upsert, list) or not isinstance(remove, list):
        raise PodReportError("pods: upsert and remove must be lists")
    if len(upsert) + len(remove) > MAX_PODS:
        raise PodReportError(f"pods: more than {MAX_PODS} pods in one message")
    if full and remove:
        raise PodReportError("pods.remove: must be empty in a full message")
    pods = tuple(_pod(item, f"pods.upsert[{i}]") for i, item in enumerate(upsert))
    gone = tuple(_key(item, f"pods.remove[{i}]") for i, item in enumerate(remove))
    seen = [p.key for p in pods] + list(gone)
    if len(set(seen)) != len(seen):
        raise PodReportError("pods: a pod is named twice")
    return PodReport(full, pods, gone)


def _pod(item: Any, where: str) -> Pod:
    if not isinstance(item, dict):
        raise PodReportError(f"{where}: expected an object")
    if set(item) != _FIELDS:
        odd = sorted(set(item) ^ _FIELDS)[0]
        raise PodReportError(f"{where}.{odd}: " + ("unknown field" if odd in item else "missing"))
    namespace = _name(item["namespace"], f"{where}.namespace", _DNS_LABEL)
    name = _name(item["name"], f"{where}.name", _DNS_SUBDOMAIN)
    account = _name(item["service_account"], f"{where}.service_account", _DNS_SUBDOMAIN)
    ips = item["ips"]
    if not isinstance(ips, list) or len(ips) > 2:
        raise PodReportError(f"{where}.ips: expected a list of at most two addresses")
    parsed = [_ip(ip, f"{where}.ips") for ip in ips]
    if len({ipaddress.ip_address(ip).version for ip in parsed}) != len(parsed):
        raise PodReportError(f"{where}.ips: at most one address per family")
    return Pod(namespace, name, tuple(parsed), account, _labels(item["labels"], where))


def _key(item: Any, where: str) -> str:
    if not isinstance(item, str) or item.count("/") != 1:
        raise PodReportError(f'{where}: expected "namespace/name"')
    namespace, name = item.split("/")
    return pod_key(_name(namespace, where, _DNS_LABEL), _name(name, where, _DNS_SUBDOMAIN))


def _name(value: Any, where: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise PodReportError(f"{where}: not a valid Kubernetes name")
    return value


def _ip(value: Any, where: str) -> str:
    try:
        normal = str(ipaddress.ip_address(value))
    except ValueError:
        raise PodReportError(f"{where}: {value!r} is not an IP address") from None
    if normal != value:
        raise PodReportError(f"{where}: {value!r} is not in normal form ({normal})")
    return normal


def _labels(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or len(value) > MAX_LABELS:
        raise PodReportError(f"{where}.labels: expected an object of at most {MAX_LABELS}")
    for key, text in value.items():
        prefix, _, name = key.rpartition("/")
        if (
            not name
            or not _LABEL.fullmatch(name)
            or len(name) > 63
            or (prefix and not _DNS_SUBDOMAIN.fullmatch(prefix))
        ):
            raise PodReportError(f"{where}.labels: {key!r} is not a valid label key")
        if not isinstance(text, str) or len(text) > 63 or not _LABEL.fullmatch(text):
            raise PodReportError(f"{where}.labels[{key!r}]: not a valid label value")
    return tuple(sorted(value.items()))
