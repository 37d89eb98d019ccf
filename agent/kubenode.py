"""Kubernetes node integration: what this node's Node object says the agent should advertise.

The agent on a cluster node (``kubernetes = true``, ``NODE_NAME`` from the downward
API) reads its own Node with the official ``kubernetes`` client and turns it into:

* routes: ``spec.podCIDRs`` (``spec.podCIDR`` on old clusters), so that VMs and other
  nodes reach this node's pods through its tunnel;
* endpoint candidates: ``wiregate.io/force-endpoint`` if set (and then only that),
  else every ``InternalIP`` with the WireGuard port;
* ``wiregate.io/persistent-keepalive`` (seconds) and ``wiregate.io/location``.

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
from typing import Any

from wiregate.clock import Clock
from wiregate.errors import (
    BadInput,
    ConfigError,
    Forbidden,
    NotFound,
    Unavailable,
    WiregateError,
)
from wiregate.logging import get_logger
from wiregate.settings import AgentSettings

__all__ = [
    "ANNOTATION_FORCE_ENDPOINT",
    "ANNOTATION_KEEPALIVE",
    "ANNOTATION_LOCATION",
    "NodeFacts",
    "NodeSource",
    "advertised_endpoints",
    "advertised_routes",
    "node_facts",
    "read_node",
]

log = get_logger("agent.kubenode")

ANNOTATION_LOCATION = "wiregate.io/location"
ANNOTATION_FORCE_ENDPOINT = "wiregate.io/force-endpoint"
ANNOTATION_KEEPALIVE = "wiregate.io/persistent-keepalive"
REFRESH_SECONDS = 300.0  # pod CIDRs never change and addresses rarely: the API is spared
REQUEST_TIMEOUT = 10.0
_LOCATION = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")

Reader = Callable[[str, Path | None], Mapping[str, Any]]


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


def _hostport(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


# --------------------------------------------------------------------------- the client layer


def read_node(node_name: str, kubeconfig: Path | None) -> Mapping[str, Any]:
    """GET this node's Node with the official client; the JSON document as it came."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException
    from urllib3.exceptions import HTTPError

    try:
        if kubeconfig is not None:
            api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        else:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            api = client.ApiClient(configuration)
    except (ConfigException, OSError) as exc:
        where = kubeconfig or "the in-cluster ServiceAccount"
        raise ConfigError(
            f"no Kubernetes client configuration from {where}: {exc}",
            hint="run in a pod with a ServiceAccount, or set kubeconfig",
        ) from exc
    try:
        # Without preloading, the raw urllib3 response (typed as the model): its JSON as sent.
        response: Any = client.CoreV1Api(api).read_node(
            node_name, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
        )
        document = json.loads(response.data)
    except ApiException as exc:
        raise _api_error(exc.status, node_name) from exc
    except (HTTPError, OSError) as exc:
        raise Unavailable(f"Kubernetes API unreachable: {exc}") from exc
    except ValueError as exc:
        raise BadInput(f"the Kubernetes API answered with no JSON: {exc}") from exc
    finally:
        api.close()
    if not isinstance(document, dict) or document.get("kind") not in (None, "Node"):
        raise BadInput("the Kubernetes API did not answer with a Node object")
    return document


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
    """The routes the agent enrolls with: its pod CIDRs when ``kubernetes`` is on, else none."""
    if not settings.kubernetes:
        return []
    return (await _source(settings).facts()).routes()


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
