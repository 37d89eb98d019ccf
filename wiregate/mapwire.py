"""The map stream's wire format, both directions (pure: no I/O, no web framework).

The network map travels over the agent's WebSocket stream as JSON text frames:

``full``    ``{"type": "full", "version": V, "self": SELF, "peers": [PEER, ...]}``
``delta``   ``{"type": "delta", "base": B, "version": V, "self": SELF|null,
            "upsert": [PEER, ...], "remove": [device_id, ...]}``
            applies only on top of version ``B``; an agent at another version
            reconnects with ``?since=<its version>`` and gets a full map.
``sync``    ``{"type": "sync", "version": V}``: nothing changed since ``V``.
``revoked`` ``{"type": "revoked", "reason": "..."}``: this device was removed;
            the agent tears its interface down.

PEER is :func:`build_peer`, SELF is :func:`build_self`. Optional fields are sent
only when they say something, and readers ignore fields they do not know, so
older agents keep working: a PEER's ``"filter": ["tcp:5432", "icmp"]`` lists what
that peer may open on the receiving device (absent: everything; ``[]``: nothing,
only replies); SELF's ``"refused_routes"`` lists the device's advertised routes
the policy did not approve (its peers do not get them), and SELF's ``"dns"``,
``{"domain": "wg.internal", "zones": {"cluster.local": ["10.96.0.10"]}}``, names
the mesh domain the agent answers for and the split-DNS zones it forwards over
the tunnel (absent: the agent serves no names; see ``docs/names.md``); SELF's
``"pool": ["100.64.0.0/16", "fd7a:7767:6174::/64"]`` is the tunnel address pool,
which the agent routes as one prefix per family (absent: a route per peer). Pod identity
(``docs/policy.md``): a PEER's ``"pods_from": {"10.244.1.5": ["tcp:5432"]}`` lists
pods of that peer (a node) that may open these on the receiving device beyond the
peer's ``filter``; ``"pods_to": {"10.244.2.7": ["tcp:8080"]}`` lists the receiving
node's own pods that peer may open. Both are per viewer, absent when empty.

An agent sends
``{"type": "endpoints", "endpoints": ["192.0.2.1:51820", "[2001:db8::1]:51820"], "nat": "eim"}``
(``nat``, optional: the NAT type its netcheck measured, one of :data:`NAT_TYPES`;
``agent``, optional: ``{"version", "os"}`` of the agent, shown to admins;
``routes``, optional: the routes it advertises now, at most :data:`MAX_ROUTES`, which
replace those it enrolled with: a node's pod CIDRs and InternalIPs, a gateway node's
onward pod CIDRs, as they change),
when its candidate endpoints change, and ``{"type": "paths", ...}``, its path to
each peer (:mod:`wiregate.pathwire`); :func:`parse_agent_frame` reads either.

``build_*`` give a message's JSON form (dicts and lists), :func:`dumps` its text;
``parse_*`` read text (or, ``read_*``, an already decoded JSON value) into values
of :mod:`wiregate.model` and refuse anything else with a :class:`MapWireError`.
The ``encode_*`` functions write the gateway's text directly, from pre-encoded
fragments (a PEER is encoded once per change however many agents receive it);
their output is byte for byte ``dumps`` of the ``build_*`` form.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import json.encoder
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wiregate import net
from wiregate.errors import BadInput, RemoteError
from wiregate.model import Device, DnsConfig, NetMap, Peer, SelfView
from wiregate.pathwire import PathsReport, parse_paths
from wiregate.podwire import PodReport, parse_pods

__all__ = [
    "MAX_ENDPOINTS",
    "MAX_ROUTES",
    "NAT_TYPES",
    "AgentEndpoints",
    "AgentMessage",
    "Delta",
    "MalformedMessage",
    "MapMessage",
    "MapWireError",
    "NotJSON",
    "Revoked",
    "Sync",
    "UnknownMessage",
    "VersionGap",
    "apply_delta",
    "build_delta",
    "build_dns",
    "build_endpoints",
    "build_full",
    "build_message",
    "build_peer",
    "build_revoked",
    "build_self",
    "build_sync",
    "dumps",
    "encode_delta",
    "encode_delta_body",
    "encode_full",
    "encode_peer",
    "encode_revoked",
    "encode_self",
    "encode_sync",
    "filter_tail",
    "parse_agent_frame",
    "parse_agent_message",
    "parse_endpoint",
    "parse_map_message",
    "pods_field",
    "read_dns",
    "read_full",
    "read_map_message",
    "read_peer",
    "read_self",
    "with_filter",
    "with_pods",
]

MAX_ENDPOINTS = 32
MAX_ROUTES = 64  # routes an agent may advertise (as at enrollment)
NAT_TYPES = frozenset({"open", "eim", "symmetric", "udp-blocked", "unknown"})


# -- errors -------------------------------------------------------------------------


class MapWireError(BadInput):
    """A message that does not follow the map stream's wire format."""

    code = "bad_stream_message"


class NotJSON(MapWireError):
    """The text of a message is not a JSON document."""

    code = "not_json"


class UnknownMessage(MapWireError):
    """A JSON document that is not a message of a type this side reads."""

    code = "unknown_message"


class MalformedMessage(MapWireError):
    """A message of a known type with a field missing or of the wrong kind."""

    code = "malformed_message"


class VersionGap(RemoteError):
    """A ``delta`` whose base is not the version of the map it is applied to."""

    code = "version_gap"


# -- messages as values -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delta:
    """A ``delta`` message: what changed in one agent's map from ``base`` to ``version``.

    ``self_view`` is None when the agent's own view did not change.
    """

    base: int
    version: int
    self_view: SelfView | None = None
    upsert: tuple[Peer, ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Sync:
    """A ``sync`` message: nothing changed since ``version``."""

    version: int


@dataclass(frozen=True, slots=True)
class Revoked:
    """A ``revoked`` message: the receiving device was removed."""

    reason: str = ""


MapMessage = NetMap | Delta | Sync | Revoked


@dataclass(frozen=True, slots=True)
class AgentEndpoints:
    """An agent's endpoint candidates and, when measured, its NAT type."""

    endpoints: list[str]
    nat: str | None = None
    routes: tuple[str, ...] | None = None  # the routes it advertises now (None: not said)
    agent: tuple[str, str] | None = None  # (agent version, operating system), if said


AgentMessage = AgentEndpoints | PathsReport | PodReport


# -- building (gateway to agent) ----------------------------------------------------


def build_peer(peer: Peer) -> dict[str, Any]:
    """The PEER form of ``peer``."""
    wire: dict[str, Any] = {
        "id": peer.id,
        "name": peer.name,
        "public_key": peer.public_key,
        "addresses": list(peer.addresses),
        "allowed_ips": list(peer.allowed_ips),
        "endpoints": list(peer.endpoints),
        "keepalive": peer.keepalive,
        "tags": list(peer.tags),
    }
    if peer.nat is not None:
        wire["nat"] = peer.nat
    if peer.filter is not None:
        wire["filter"] = list(peer.filter)
    if peer.pods_from:
        wire["pods_from"] = {address: list(rule) for address, rule in peer.pods_from}
    if peer.pods_to:
        wire["pods_to"] = {address: list(rule) for address, rule in peer.pods_to}
    return wire


def build_self(view: SelfView) -> dict[str, Any]:
    """The SELF form of ``view``."""
    wire: dict[str, Any] = {
        "id": view.id,
        "name": view.name,
        "public_key": view.public_key,
        "addresses": list(view.addresses),
        "tags": list(view.tags),
    }
    if view.refused_routes:
        wire["refused_routes"] = list(view.refused_routes)
    if view.expires_at is not None:
        wire["expires_at"] = view.expires_at
    if view.previous_public_key is not None:
        wire["previous_public_key"] = view.previous_public_key
    if view.dns is not None:
        wire["dns"] = build_dns(view.dns)
    if view.pool:
        wire["pool"] = list(view.pool)
    return wire


def build_dns(dns: DnsConfig) -> dict[str, Any]:
    """The ``dns`` form of SELF: the mesh domain and the split-DNS zones."""
    return {"domain": dns.domain, "zones": {zone: list(servers) for zone, servers in dns.zones}}


def build_full(netmap: NetMap) -> dict[str, Any]:
    """The ``full`` message carrying ``netmap``."""
    return {
        "type": "full",
        "version": netmap.version,
        "self": build_self(netmap.self_view),
        "peers": [build_peer(p) for p in netmap.peers.values()],
    }


def build_delta(delta: Delta) -> dict[str, Any]:
    """The ``delta`` message carrying ``delta``."""
    return {
        "type": "delta",
        "base": delta.base,
        "version": delta.version,
        "self": None if delta.self_view is None else build_self(delta.self_view),
        "upsert": [build_peer(p) for p in delta.upsert],
        "remove": list(delta.remove),
    }


def build_sync(version: int) -> dict[str, Any]:
    """The ``sync`` message: nothing changed since ``version``."""
    return {"type": "sync", "version": version}


def build_revoked(reason: str) -> dict[str, Any]:
    """The ``revoked`` message telling a device it was removed."""
    return {"type": "revoked", "reason": reason}


def build_message(message: MapMessage) -> dict[str, Any]:
    """The JSON form of any gateway-to-agent message."""
    if isinstance(message, NetMap):
        return build_full(message)
    if isinstance(message, Delta):
        return build_delta(message)
    if isinstance(message, Sync):
        return build_sync(message.version)
    return build_revoked(message.reason)


# -- parsing (what an agent receives) ----------------------------------------------


def parse_map_message(text: str | bytes) -> MapMessage:
    """The message in a text frame of the map stream, or raise :class:`MapWireError`."""
    return read_map_message(_decode(text))


def read_map_message(data: object) -> MapMessage:
    """The message of an already decoded JSON value, or raise :class:`MapWireError`."""
    if not isinstance(data, dict):
        raise UnknownMessage("a message is a JSON object")
    kind = data.get("type")
    if kind == "full":
        return read_full(data)
    if kind == "delta":
        return _read_delta(data)
    if kind == "sync":
        return Sync(_int(data, "version"))
    if kind == "revoked":
        reason = data.get("reason")
        return Revoked("" if reason is None else _str_value(reason, "reason"))
    raise UnknownMessage(f"unknown message type {_shown(kind)}")


def read_full(data: object) -> NetMap:
    """The map of a ``full`` message's JSON form (its ``type`` is not checked)."""
    doc = _object(data, "full message")
    peers = (read_peer(p) for p in _list(doc, "peers", required=True))
    return NetMap(
        version=_int(doc, "version"),
        self_view=read_self(doc.get("self")),
        peers={p.id: p for p in peers},
    )


def read_peer(data: object) -> Peer:
    """The :class:`Peer` of a PEER, or raise :class:`MalformedMessage`."""
    doc = _object(data, "peer")
    keepalive = doc.get("keepalive")
    if keepalive is not None and (type(keepalive) is not int):
        raise MalformedMessage("peer keepalive: expected an integer or null")
    return Peer(
        id=_str(doc, "id"),
        name=_str(doc, "name"),
        public_key=_str(doc, "public_key"),
        addresses=_strs(doc, "addresses", required=True),
        allowed_ips=_strs(doc, "allowed_ips", required=True),
        endpoints=_strs(doc, "endpoints"),
        keepalive=keepalive,
        tags=_strs(doc, "tags"),
        filter=None if doc.get("filter") is None else _strs(doc, "filter"),
        nat=_optional_str(doc, "nat"),
        pods_from=_pod_rules(doc, "pods_from"),
        pods_to=_pod_rules(doc, "pods_to"),
    )


def _pod_rules(doc: Mapping[str, Any], key: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``{"10.244.1.5": ["tcp:5432"], ...}`` (absent: none), sorted by address; each key
    a single IPv4 or IPv6 address in its normal form."""
    raw = doc.get(key)
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise MalformedMessage(f"peer {key}: expected an object")
    rules = []
    for address, rule in raw.items():
        try:
            normal = str(ipaddress.ip_address(address))
        except ValueError:
            raise MalformedMessage(f"peer {key}: {address!r} is not an IP address") from None
        if normal != address:
            raise MalformedMessage(f"peer {key}: {address!r} is not in normal form ({normal})")
        rules.append((address, _strs({key: rule}, key, required=True)))
    return tuple(sorted(rules))


def read_self(data: object) -> SelfView:
    """The :class:`SelfView` of a SELF, or raise :class:`MalformedMessage`."""
    doc = _object(data, "self")
    expires_at = doc.get("expires_at")
    if expires_at is not None and type(expires_at) not in (int, float):
        raise MalformedMessage("self expires_at: expected a number or null")
    return SelfView(
        id=_str(doc, "id"),
        name=_str(doc, "name"),
        public_key=_str(doc, "public_key"),
        addresses=_strs(doc, "addresses", required=True),
        tags=_strs(doc, "tags"),
        expires_at=None if expires_at is None else float(expires_at),
        previous_public_key=_optional_str(doc, "previous_public_key"),
        refused_routes=_strs(doc, "refused_routes"),
        dns=None if doc.get("dns") is None else read_dns(doc["dns"]),
        pool=_strs(doc, "pool"),
    )


def read_dns(data: object) -> DnsConfig:
    """The :class:`DnsConfig` of SELF's ``dns``, or raise :class:`MalformedMessage`.

    Only the shape is checked here; what the names and addresses mean is the
    agent's DNS server's to judge (:mod:`agent.dns.zone`).
    """
    doc = _object(data, "dns")
    zones = doc.get("zones")
    if zones is None:
        zones = {}
    if not isinstance(zones, dict):
        raise MalformedMessage("dns zones: expected an object")
    pairs = ((_str_value(zone, "dns zones"), _strs(zones, zone, required=True)) for zone in zones)
    return DnsConfig(domain=_str(doc, "domain"), zones=tuple(sorted(pairs)))


def _read_delta(doc: dict[str, Any]) -> Delta:
    own = doc.get("self")
    return Delta(
        base=_int(doc, "base"),
        version=_int(doc, "version"),
        self_view=None if own is None else read_self(own),
        upsert=tuple(read_peer(p) for p in _list(doc, "upsert")),
        remove=_strs(doc, "remove"),
    )


def apply_delta(current: NetMap, delta: Delta) -> NetMap:
    """``current`` with ``delta`` applied; :class:`VersionGap` unless it is at ``delta.base``."""
    if delta.base != current.version:
        raise VersionGap(f"delta base {delta.base} does not follow version {current.version}")
    peers = dict(current.peers)
    for device_id in delta.remove:
        peers.pop(device_id, None)
    for peer in delta.upsert:
        peers[peer.id] = peer
    self_view = current.self_view if delta.self_view is None else delta.self_view
    return NetMap(version=delta.version, self_view=self_view, peers=peers)


def _decode(text: str | bytes) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can read
        raise NotJSON("message is not JSON") from None


def _shown(value: object) -> str:
    plain = value is None or isinstance(value, str | int | float)
    return repr(value) if plain else type(value).__name__


def _object(data: object, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise MalformedMessage(f"{what}: expected an object")
    return data


def _int(doc: Mapping[str, Any], key: str) -> int:
    value = doc.get(key)
    if type(value) is not int:
        raise MalformedMessage(f"{key}: expected an integer")
    return value


def _str_value(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise MalformedMessage(f"{key}: expected a string")
    return value


def _str(doc: Mapping[str, Any], key: str) -> str:
    return _str_value(doc.get(key), key)


def _optional_str(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return None if value is None else _str_value(value, key)


def _list(doc: Mapping[str, Any], key: str, *, required: bool = False) -> list[Any]:
    value = doc.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise MalformedMessage(f"{key}: expected a list")
    return value


def _strs(doc: Mapping[str, Any], key: str, *, required: bool = False) -> tuple[str, ...]:
    return tuple(_str_value(item, key) for item in _list(doc, key, required=required))


# -- encoding text directly (the gateway's fast path) ------------------------------

_ENCODER = json.JSONEncoder(separators=(",", ":"))


def dumps(obj: Any) -> str:
    """Compact JSON text, as sent on the stream."""
    return _ENCODER.encode(obj)


_string: Callable[[str], str] = json.encoder.encode_basestring_ascii  # what _ENCODER uses


def _strings(items: Iterable[str]) -> str:
    return ",".join(map(_string, items))


def encode_peer(device: Device) -> str:
    """The PEER text of ``device``, equal to ``dumps(build_peer(device.to_peer()))``.

    Written directly from the device's fields, one escape per string, without
    building the :class:`Peer` and its dict (tested byte for byte against them).
    """
    try:
        keepalive = device.keepalive
        if keepalive is None:
            alive = "null"
        elif type(keepalive) is int:
            alive = int.__repr__(keepalive)
        else:
            alive = dumps(keepalive)
        addresses = f"{_string(f'{device.ipv4}/32')},{_string(f'{device.ipv6}/128')}"
        allowed = f"{addresses},{_strings(device.routes)}" if device.routes else addresses
        return (
            f'{{"id":{_string(device.id)},"name":{_string(device.name)},'
            f'"public_key":{_string(device.public_key)},'
            f'"addresses":[{addresses}],"allowed_ips":[{allowed}],'
            f'"endpoints":[{_strings(device.endpoints)}],"keepalive":{alive},'
            f'"tags":[{_strings(device.tags)}]'
            + ("}" if device.nat is None else f',"nat":{_string(device.nat)}}}')
        )
    except TypeError:  # a field that is not a str after all: let the encoder decide
        return dumps(build_peer(device.to_peer()))


def encode_self(view: SelfView) -> str:
    """The SELF text of ``view``."""
    return dumps(build_self(view))


@functools.lru_cache(maxsize=4096)
def filter_tail(rule: tuple[str, ...]) -> str:
    """What replaces a PEER text's closing ``}`` to add ``"filter": rule``."""
    return f',"filter":[{_strings(rule)}]}}'


def with_filter(text: str, rule: tuple[str, ...]) -> str:
    """A PEER text with ``"filter"`` appended (``"filter"`` is a PEER's last field)."""
    return text[:-1] + filter_tail(rule)


def pods_field(key: str, rules: Iterable[tuple[str, tuple[str, ...]]]) -> str:
    """``,"pods_from":{...}`` (``key``) for a PEER text, ``rules`` sorted by address;
    empty when there are none (the field is then absent)."""
    body = ",".join(f"{_string(address)}:[{_strings(rule)}]" for address, rule in rules)
    return f",{_string(key)}:{{{body}}}" if body else ""


def with_pods(text: str, pods_from: str, pods_to: str) -> str:
    """A PEER text (filtered or not) with :func:`pods_field` texts appended (``pods_from``
    then ``pods_to``, a PEER's last fields)."""
    if not pods_from and not pods_to:
        return text
    return f"{text[:-1]}{pods_from}{pods_to}}}"


def encode_full(version: int, self_text: str, peer_texts: Iterable[str]) -> str:
    """A ``full`` message from its SELF text and its PEER texts."""
    head = f'{{"type":"full","version":{version},"self":{self_text}'
    return f'{head},"peers":[{",".join(peer_texts)}]}}'


def encode_delta_body(peer_texts: Iterable[str], remove: Sequence[str]) -> str:
    """The tail of a ``delta`` message (upsert and remove), shared by agents with one update."""
    return f'"upsert":[{",".join(peer_texts)}],"remove":{dumps(list(remove))}}}'


def encode_delta(base: int, version: int, self_text: str | None, body: str) -> str:
    """A whole ``delta`` message: a per-agent head joined to a body of :func:`encode_delta_body`."""
    own = "null" if self_text is None else self_text
    return f'{{"type":"delta","base":{base},"version":{version},"self":{own},{body}'


def encode_sync(version: int) -> str:
    """The text of :func:`build_sync`."""
    return dumps(build_sync(version))


def encode_revoked(reason: str) -> str:
    """The text of :func:`build_revoked`."""
    return dumps(build_revoked(reason))


# -- what an agent sends ------------------------------------------------------------


def build_endpoints(
    endpoints: Sequence[str],
    nat: str | None = None,
    routes: Sequence[str] | None = None,
    agent: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The ``endpoints`` message an agent sends (``nat`` left out when not measured,
    ``routes`` and ``agent``, its version and operating system, when not said)."""
    message: dict[str, Any] = {"type": "endpoints", "endpoints": list(endpoints)}
    if nat is not None:
        message["nat"] = nat
    if routes is not None:
        message["routes"] = list(routes)
    if agent is not None:
        message["agent"] = {"version": agent[0], "os": agent[1]}
    return message


def parse_agent_message(text: str | bytes) -> AgentEndpoints:
    """The content of an agent's ``endpoints`` message, or raise :class:`BadInput`
    (a :class:`MapWireError` for the message, plain for a malformed endpoint).

    A well-formed endpoint at an address no peer may be sent to
    (:func:`wiregate.net.destination_refusal`: loopback, metadata, 6to4 wrapping
    them, ...) is left out of the result: the report is kept, that address never
    reaches a peer.

    The WebSocket adapter reads only text frames; any other frame is refused there.
    """
    msg = _decode(text)
    if not isinstance(msg, dict) or msg.get("type") != "endpoints":
        raise UnknownMessage("expected a message of type 'endpoints'")
    endpoints = msg.get("endpoints")
    if not isinstance(endpoints, list) or len(endpoints) > MAX_ENDPOINTS:
        raise MalformedMessage(f"endpoints: expected a list of at most {MAX_ENDPOINTS} 'ip:port'")
    nat = msg.get("nat")
    if nat is not None and (not isinstance(nat, str) or nat not in NAT_TYPES):
        raise MalformedMessage(f"nat: expected one of {', '.join(sorted(NAT_TYPES))}")
    routes = msg.get("routes")
    if routes is not None and (
        not isinstance(routes, list)
        or len(routes) > MAX_ROUTES
        or not all(isinstance(r, str) and len(r) <= 64 for r in routes)
    ):
        raise MalformedMessage(f"routes: expected a list of at most {MAX_ROUTES} CIDRs")
    parsed = [_endpoint_form(e) for e in endpoints]
    usable = (str(e) for e in parsed if e.ip is not None and net.destination_refusal(e.ip) is None)
    return AgentEndpoints(
        list(dict.fromkeys(usable)),
        nat,
        None if routes is None else tuple(routes),
        _agent_info(msg.get("agent")),
    )


def _agent_info(doc: object) -> tuple[str, str] | None:
    """``{"version": ≤ 64, "os": ≤ 128}``, printable ASCII (None: not said)."""
    if doc is None:
        return None
    if not isinstance(doc, dict) or set(doc) != {"version", "os"}:
        raise MalformedMessage('agent: expected {"version", "os"}')
    version, os_name = doc["version"], doc["os"]
    for value, limit in ((version, 64), (os_name, 128)):
        if not (isinstance(value, str) and 0 < len(value) <= limit and _printable(value)):
            raise MalformedMessage(f"agent: version and os are printable text, at most {limit}")
    return version, os_name


def _printable(text: str) -> bool:
    return text.isascii() and text.isprintable()


def parse_agent_frame(text: str | bytes) -> AgentMessage:
    """Any message an agent sends: ``paths`` (:func:`wiregate.pathwire.read_paths`),
    ``pods`` (:func:`wiregate.podwire.parse_pods`), else as :func:`parse_agent_message`."""
    msg = _decode(text)
    if isinstance(msg, dict) and msg.get("type") == "paths":
        return parse_paths(text)  # read again: repeated keys and NaN refused
    if isinstance(msg, dict) and msg.get("type") == "pods":
        return parse_pods(text)
    return parse_agent_message(text)


def _endpoint_form(text: Any) -> net.Endpoint:
    """An endpoint that is well formed (BadInput otherwise), whatever its address."""
    return net.parse_endpoint(text, allow_names=False, from_peer=False, error=BadInput)


def parse_endpoint(text: Any) -> str:
    """Normalize ``ip:port`` / ``[ipv6]:port``, or raise :class:`BadInput`: malformed, or an
    address no peer may be sent to (:func:`wiregate.net.destination_refusal`)."""
    return str(net.parse_endpoint(text, allow_names=False, from_peer=True, error=BadInput))
