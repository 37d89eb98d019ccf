"""Kubernetes node integration: what this node's Node object says the agent should advertise.

The agent on a cluster node (``kubernetes = true``, ``NODE_NAME`` from the downward
API) reads its own Node with the official ``kubernetes`` client and turns it into:

* routes: ``spec.podCIDRs`` (``spec.podCIDR`` on old clusters), so that VMs and other
  nodes reach this node's pods through its tunnel;
* endpoint candidates: ``wiregate.io/force-endpoint`` if set (and then only that),
  else every ``InternalIP`` with the WireGuard port;
* ``wiregate.io/persistent-keepalive`` (seconds) and ``wiregate.io/location``.

Two settings add routes every device reaches the cluster through:

* ``kube_service_cidrs``: the cluster's Service CIDR(s), so that devices reach
  ClusterIPs through this node, whose kube-proxy (or CNI) translates them. Every
  node advertises the same prefix; the gateway lets one carry it and keeps the
  others standing by (docs/architecture.md, "Services both ways").
* ``kube_gateway`` (gateway mode): the pod CIDRs of every Node that runs no agent
  (no ``wiregate.io/gateway=true`` label), read from the NodeList, so that devices
  reach every node's pods through this one, which forwards onward on the cluster
  network.

Traffic from the tunnel that the node sends on to another node's pods is
masqueraded (:func:`forwarding_ruleset`), so that the reply comes back through this
node: the other node has no route to the tunnel addresses.

:func:`node_facts` is pure: a Node document (the API's JSON) in, :class:`NodeFacts`
out, every malformed field refused with the field named. :func:`read_node` is the
thin client layer (one GET, errors mapped onto the error tree) and
:class:`NodeSource` caches the facts, keeping the last good ones when a refresh fails.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from wiregate.clock import Clock
from wiregate.errors import (
    BadInput,
    ConfigError,
    Forbidden,
    NotFound,
    Unavailable,
    WiregateError,
)
from wiregate.kubeclient import api_client
from wiregate.logging import get_logger
from wiregate.settings import AgentSettings

__all__ = [
    "ANNOTATION_FORCE_ENDPOINT",
    "ANNOTATION_KEEPALIVE",
    "ANNOTATION_LOCATION",
    "FORWARD_TABLE",
    "LABEL_GATEWAY",
    "NodeFacts",
    "NodeSource",
    "advertised_endpoints",
    "advertised_routes",
    "apply_forwarding",
    "cluster_pod_cidrs",
    "dns_pod_sources",
    "forwarding_ruleset",
    "list_nodes",
    "node_facts",
    "read_node",
    "service_cidrs",
]

log = get_logger("agent.kubenode")

ANNOTATION_LOCATION = "wiregate.io/location"
ANNOTATION_FORCE_ENDPOINT = "wiregate.io/force-endpoint"
ANNOTATION_KEEPALIVE = "wiregate.io/persistent-keepalive"
LABEL_GATEWAY = "wiregate.io/gateway"  # gateway mode: the nodes that run an agent
FORWARD_TABLE = "wiregate-kube"  # table inet: masquerade of tunnel traffic sent onward
FORWARD_CT_MARK = 0x57470000  # conntrack mark bits of connections that came in from the tunnel
REFRESH_SECONDS = 300.0  # pod CIDRs never change and addresses rarely: the API is spared
REQUEST_TIMEOUT = 10.0
_LOCATION = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")

Reader = Callable[[str, Path | None], Mapping[str, Any]]


class NftRunner(Protocol):
    """What :func:`apply_forwarding` uses of :class:`wiregate.nft.Nft`."""

    def run(self, script: str) -> None: ...


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the agent takes from its Node object."""

    name: str
    pod_cidrs: tuple[str, ...]
    internal_ips: tuple[str, ...]
    location: str | None = None
    force_endpoint: str | None = None  # "ip:port" or "[ip6]:port"
    persistent_keepalive: int | None = None  # seconds, 0: off

    def routes(self) -> list[str]:
        """The routes to advertise: this node's pod CIDRs."""
        return list(self.pod_cidrs)

    def endpoints(self, port: int) -> list[str]:
        """Endpoint candidates: the forced endpoint alone, else each InternalIP at ``port``."""
        if self.force_endpoint is not None:
            return [self.force_endpoint]
        return [_hostport(ipaddress.ip_address(ip), port) for ip in self.internal_ips]


# --------------------------------------------------------------------------- the pure core


def node_facts(node: Mapping[str, Any], listen_port: int) -> NodeFacts:
    """The facts in a Node document; :class:`BadInput` naming the field that is wrong."""
    metadata = _mapping(node.get("metadata"), "metadata")
    spec = _mapping(node.get("spec"), "spec")
    status = _mapping(node.get("status"), "status")
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    if not all(isinstance(v, str) for v in annotations.values()):
        raise BadInput("Node metadata.annotations must map names to strings")
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise BadInput("Node metadata.name is missing")
    return NodeFacts(
        name=name,
        pod_cidrs=_pod_cidrs(spec),
        internal_ips=_internal_ips(status),
        location=_location(annotations.get(ANNOTATION_LOCATION)),
        force_endpoint=_force_endpoint(annotations.get(ANNOTATION_FORCE_ENDPOINT), listen_port),
        persistent_keepalive=_keepalive(annotations.get(ANNOTATION_KEEPALIVE)),
    )


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadInput(f"Node {where} is not an object")
    return value


def _pod_cidrs(spec: Mapping[str, Any]) -> tuple[str, ...]:
    raw = spec.get("podCIDRs")
    if raw is None:
        raw = [spec["podCIDR"]] if spec.get("podCIDR") else []
    if not isinstance(raw, list):
        raise BadInput("Node spec.podCIDRs is not a list")
    cidrs: list[str] = []
    for item in raw:
        try:
            if not isinstance(item, str):
                raise TypeError(item)
            net = ipaddress.ip_network(item, strict=True)
        except (TypeError, ValueError):
            raise BadInput(
                f"Node spec.podCIDRs entry {item!r} is not a CIDR with zero host bits"
            ) from None
        if net.prefixlen == 0:
            raise BadInput(f"Node spec.podCIDRs entry {item!r} is a default route")
        if str(net) not in cidrs:
            cidrs.append(str(net))
    return tuple(cidrs)


def _internal_ips(status: Mapping[str, Any]) -> tuple[str, ...]:
    addresses = status.get("addresses") or []
    if not isinstance(addresses, list):
        raise BadInput("Node status.addresses is not a list")
    found: list[str] = []
    for entry in addresses:
        if not isinstance(entry, Mapping) or entry.get("type") != "InternalIP":
            continue
        try:
            ip = ipaddress.ip_address(entry.get("address", ""))
        except ValueError:
            raise BadInput(f"Node InternalIP {entry.get('address')!r} is not an address") from None
        if str(ip) not in found:
            found.append(str(ip))
    return tuple(found)


def _location(value: str | None) -> str | None:
    if value is None:
        return None
    if not _LOCATION.match(value):
        raise BadInput(
            f"annotation {ANNOTATION_LOCATION}={value!r} is not a location name",
            hint="1-63 lower-case letters, digits, '-' and '.', starting and ending alphanumeric",
        )
    return value


def _force_endpoint(value: str | None, port: int) -> str | None:
    """``IP``, ``IPv4:PORT`` or ``[IPv6]:PORT``; the port defaults to ``port``."""
    if value is None:
        return None
    host, port_text = _split_endpoint(value.strip())
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    valid_port = port_text == "" or (port_text.isascii() and port_text.isdigit())
    chosen = int(port_text) if port_text and valid_port else port
    if ip is None or not valid_port or not 0 < chosen < 65536 or ip.is_unspecified:
        raise BadInput(
            f"annotation {ANNOTATION_FORCE_ENDPOINT}={value!r} is not IP[:PORT]",
            hint="an IPv4 or IPv6 address ([v6]:port with a port), no host names",
        )
    return _hostport(ip, chosen)


def _split_endpoint(text: str) -> tuple[str, str]:
    """``[v6]:port`` / ``[v6]`` / ``v4:port`` / a bare address, to (host, port text)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest.removeprefix(":") if rest.startswith(":") else rest or ""
    if text.count(":") == 1:
        host, _, port_text = text.partition(":")
        return host, port_text
    return text, ""


def _keepalive(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip().removesuffix("s")
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise BadInput(
            f"annotation {ANNOTATION_KEEPALIVE}={value!r} is not a number of seconds",
            hint="0 (off) to 65535, e.g. 25",
        )
    return int(text)


def cluster_pod_cidrs(node_list: Mapping[str, Any], own: str) -> tuple[str, ...]:
    """The pod CIDRs of the Nodes in a NodeList that run no agent (gateway mode).

    A Node labelled ``wiregate.io/gateway=true`` runs an agent that advertises its own
    pod CIDRs; ``own`` (this node) is left out too: its own come from :func:`node_facts`.
    """
    items = node_list.get("items")
    if not isinstance(items, list):
        raise BadInput("NodeList items is not a list")
    found: list[str] = []
    for item in items:
        if not isinstance(item, Mapping):
            raise BadInput("NodeList item is not an object")
        metadata = _mapping(item.get("metadata"), "metadata")
        labels = _mapping(metadata.get("labels"), "metadata.labels")
        if metadata.get("name") == own or labels.get(LABEL_GATEWAY) == "true":
            continue
        try:
            cidrs = _pod_cidrs(_mapping(item.get("spec"), "spec"))
        except BadInput as exc:
            raise BadInput(f"{exc.message} (Node {metadata.get('name')!r})") from None
        found.extend(c for c in cidrs if c not in found)
    return tuple(found)


def service_cidrs(texts: list[str]) -> tuple[str, ...]:
    """The ``kube_service_cidrs`` setting, canonical; :class:`ConfigError` naming a bad one."""
    out: list[str] = []
    for text in texts:
        try:
            net = ipaddress.ip_network(text.strip(), strict=True)
        except ValueError:
            net = None
        if net is None or net.prefixlen == 0:
            raise ConfigError(
                f"kube_service_cidrs entry {text!r} is not a CIDR with zero host bits",
                hint="the kube-apiserver's --service-cluster-ip-range, e.g. 10.96.0.0/12",
            )
        if str(net) not in out:
            out.append(str(net))
    return tuple(out)


def forwarding_ruleset(
    interface: str, own_pods: tuple[str, ...], onward: tuple[str, ...], services: bool
) -> str:
    """nftables script: (re)create ``table inet wiregate-kube`` (empty script: delete it).

    Connections that come in from ``interface`` are marked; they are masqueraded when
    the node sends them on to ``onward`` pod CIDRs on the cluster network (gateway
    mode), and, with ``services``, when a Service translation (DNAT) sent them to a pod
    outside ``own_pods`` (any interface): the reply then comes back through this node,
    which undoes both translations.
    """
    head = f"table inet {FORWARD_TABLE}\ndelete table inet {FORWARD_TABLE}\n"
    if not onward and not services:
        return head
    mark = f"ct mark and {FORWARD_CT_MARK:#x} == {FORWARD_CT_MARK:#x}"
    rules: list[str] = []
    for family in ("ip", "ip6"):
        own = _family_set(own_pods, family)
        to = _family_set(onward, family)
        if to:
            rules.append(f'{mark} oifname != "{interface}" {family} daddr {to} masquerade')
        if services:
            skip = f"{family} daddr != {own} " if own else ""
            rules.append(f"{mark} meta nfproto {_NFPROTO[family]} ct status dnat {skip}masquerade")
    lines = [
        f"table inet {FORWARD_TABLE} {{",
        "  chain from_tunnel {",
        "    type filter hook prerouting priority mangle; policy accept;",
        f'    iifname "{interface}" ct state new ct mark set ct mark or {FORWARD_CT_MARK:#x}',
        "  }",
        "  chain onward {",
        "    type nat hook postrouting priority srcnat + 10; policy accept;",
        *(f"    {r}" for r in rules),
        "  }",
        "}",
    ]
    return head + "\n".join(lines) + "\n"


_NFPROTO = {"ip": "ipv4", "ip6": "ipv6"}


def _family_set(cidrs: tuple[str, ...], family: str) -> str:
    version = 4 if family == "ip" else 6
    chosen = [c for c in cidrs if ipaddress.ip_network(c).version == version]
    return "{ " + ", ".join(chosen) + " }" if chosen else ""


def _hostport(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


# --------------------------------------------------------------------------- the client layer


def read_node(node_name: str, kubeconfig: Path | None) -> Mapping[str, Any]:
    """GET this node's Node with the official client; the JSON document as it came."""
    document = _get(
        kubeconfig,
        lambda core: core.read_node(
            node_name, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
        ),
        lambda status: _api_error(status, node_name),
    )
    if document.get("kind") not in (None, "Node"):
        raise BadInput("the Kubernetes API did not answer with a Node object")
    return document


def list_nodes(kubeconfig: Path | None) -> Mapping[str, Any]:
    """LIST the cluster's Nodes (gateway mode); the NodeList JSON as it came."""
    document = _get(
        kubeconfig,
        lambda core: core.list_node(_preload_content=False, _request_timeout=REQUEST_TIMEOUT),
        _list_error,
    )
    if document.get("kind") not in (None, "NodeList"):
        raise BadInput("the Kubernetes API did not answer with a NodeList")
    return document


def _get(
    kubeconfig: Path | None, call: Callable[[Any], Any], error: Callable[[int], WiregateError]
) -> dict[str, Any]:
    """One request with the official client: the JSON object it answered, errors mapped."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    api = api_client(kubeconfig)
    try:
        # Without preloading, the raw urllib3 response (typed as the model): its JSON as sent.
        document = json.loads(call(client.CoreV1Api(api)).data)
    except ApiException as exc:
        raise error(exc.status) from exc
    except (HTTPError, OSError) as exc:
        raise Unavailable(f"Kubernetes API unreachable: {exc}") from exc
    except ValueError as exc:
        raise BadInput(f"the Kubernetes API answered with no JSON: {exc}") from exc
    finally:
        api.close()
    if not isinstance(document, dict):
        raise BadInput("the Kubernetes API did not answer with an object")
    return document


def _list_error(status: int) -> WiregateError:
    if status == 403:
        return Forbidden(
            "the agent may not list Nodes (403), which gateway mode needs",
            hint="give the agent's ClusterRole list on nodes "
            "(deploy/kubernetes/components/gateway-mode)",
        )
    if status == 401:
        return _api_error(status, "")
    return Unavailable(f"the Kubernetes API answered {status} to the Node list")


def _api_error(status: int, node_name: str) -> WiregateError:
    if status == 401:  # not Unauthorized: that one means the *gateway* dropped this device
        return ConfigError(
            "the Kubernetes API refused the agent's credentials (401)",
            hint="check the ServiceAccount token, or the user in kubeconfig",
        )
    if status == 403:
        return Forbidden(
            f"the agent may not read Node {node_name!r} (403)",
            hint="bind a ClusterRole with get on nodes to the agent's ServiceAccount "
            "(deploy/kubernetes/components/agent)",
        )
    if status == 404:
        return NotFound(
            f"there is no Node named {node_name!r} (404)",
            hint="set NODE_NAME from the downward API: fieldRef spec.nodeName",
        )
    return Unavailable(f"the Kubernetes API answered {status} for Node {node_name!r}")


class NodeSource:
    """This node's facts, read at most every ``refresh`` seconds; the last good ones kept."""

    def __init__(
        self,
        node_name: str,
        kubeconfig: Path | None,
        listen_port: int,
        *,
        reader: Reader = read_node,
        clock: Clock = time.monotonic,
        refresh: float = REFRESH_SECONDS,
    ) -> None:
        if not node_name:
            raise ConfigError(
                "kubernetes = true needs the node's name",
                hint="set NODE_NAME from the downward API (fieldRef spec.nodeName)",
            )
        self.node_name = node_name
        self._kubeconfig = kubeconfig
        self._port = listen_port
        self._reader = reader
        self._clock = clock
        self._refresh = refresh
        self._facts: NodeFacts | None = None
        self._read_at = 0.0

    async def facts(self) -> NodeFacts:
        """Fresh facts, or the last good ones (with a warning) when a refresh fails."""
        now = self._clock()
        if self._facts is not None and now - self._read_at < self._refresh:
            return self._facts
        try:
            document = await asyncio.to_thread(self._reader, self.node_name, self._kubeconfig)
            facts = node_facts(document, self._port)
        except WiregateError as exc:
            if self._facts is None:
                raise
            log.warning("node refresh failed; last facts kept", node=self.node_name,
                        error=exc.message)  # fmt: skip
            self._read_at = now
            return self._facts
        if facts != self._facts:
            log.info("node facts", node=facts.name, pod_cidrs=list(facts.pod_cidrs),
                     internal_ips=list(facts.internal_ips), location=facts.location,
                     force_endpoint=facts.force_endpoint,
                     persistent_keepalive=facts.persistent_keepalive)  # fmt: skip
        self._facts, self._read_at = facts, now
        return facts


_sources: dict[tuple[str, Path | None, int], NodeSource] = {}


def _source(settings: AgentSettings) -> NodeSource:
    key = (settings.node_name, settings.kubeconfig, settings.listen_port)
    if key not in _sources:
        _sources[key] = NodeSource(*key)
    return _sources[key]


async def advertised_routes(settings: AgentSettings) -> list[str]:
    """The routes the agent enrolls with when ``kubernetes`` is on (else none): its pod
    CIDRs, the Service CIDRs, and in gateway mode the other Nodes' pod CIDRs."""
    if not settings.kubernetes:
        return []
    own, onward = await _pod_routes(settings)
    return list(dict.fromkeys([*own, *service_cidrs(settings.kube_service_cidrs), *onward]))


async def _pod_routes(settings: AgentSettings) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(this node's pod CIDRs, the pod CIDRs it routes onward to in gateway mode)."""
    facts = await _source(settings).facts()
    if not settings.kube_gateway:
        return facts.pod_cidrs, ()
    document = await asyncio.to_thread(list_nodes, settings.kubeconfig)
    onward = cluster_pod_cidrs(document, facts.name)
    return facts.pod_cidrs, tuple(c for c in onward if c not in facts.pod_cidrs)


async def apply_forwarding(settings: AgentSettings, nft: NftRunner | None = None) -> None:
    """Install (or remove) the masquerade of tunnel traffic sent onward
    (:func:`forwarding_ruleset`); nothing when ``kubernetes`` is off. A Node or NodeList
    that cannot be read, or nftables refusing, costs a warning: the last table stays."""
    if not settings.kubernetes:
        return
    services = bool(service_cidrs(settings.kube_service_cidrs))
    try:
        own, onward = await _pod_routes(settings)
        script = forwarding_ruleset(settings.interface, own, onward, services)
        if nft is None:
            from wiregate.nft import Nft

            nft = Nft()
        await asyncio.to_thread(nft.run, script)
    except WiregateError as exc:  # fail static: the table of the last start stays
        log.warning("cluster forwarding not updated", error=exc.message, hint=exc.hint)
        return
    log.info("cluster forwarding", onward=list(onward), services=services)


async def dns_pod_sources(settings: AgentSettings) -> tuple[str, ...]:
    """This node's pod CIDRs, when they may ask the names server (``kubernetes`` and
    ``dns_allow_pods``); none otherwise, or (with a warning) when the Node cannot be read."""
    if not (settings.kubernetes and settings.dns_allow_pods):
        return ()
    try:
        return (await _source(settings).facts()).pod_cidrs
    except WiregateError as exc:
        log.warning("pods not let ask for names", error=exc.message, hint=exc.hint)
        return ()


async def advertised_endpoints(settings: AgentSettings) -> list[str]:
    """Endpoint candidates from the Node (before any discovered ones); none when off.

    Never raises: the discovered candidates still work without these, so a Node that
    cannot be read costs a warning, not the map stream.
    """
    if not settings.kubernetes:
        return []
    try:
        return (await _source(settings).facts()).endpoints(settings.listen_port)
    except WiregateError as exc:
        log.warning("no endpoint candidates from the Node", error=exc.message, hint=exc.hint)
        return []
