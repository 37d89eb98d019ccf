"""The mesh domain as DNS records, and the answer to one query (pure: no socket, no clock).

:func:`build_zone` turns an agent's map (:class:`~wiregate.model.NetMap`, whose
peers are already the ones the policy lets this device peer with) and the map's
``dns`` settings into a :class:`Zone`: ``NAME.DOMAIN`` → the device's tunnel
addresses (A and AAAA), each tunnel address → its name (PTR), the SOA of the
domain and the split-DNS zones with their nameservers.

:class:`Responder` answers a query's wire bytes: a :class:`Reply` (bytes to send
back) for the mesh domain and the tunnel addresses' reverse names, a
:class:`Forward` for everything else (to a split zone's nameservers, or to the
host's upstream resolver), None for what gets no answer (responses, runts). The
asyncio adapter is :mod:`agent.dns.server`; the wire format is dnspython's.

A device's DNS label is its name lower-cased with ``.`` and ``_`` turned into
``-`` (:func:`dns_label`); a name that does not make a label, and every device of
a label two devices would share, is left out: a name never resolves to the wrong
device.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.SOA
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.reversename
import dns.rrset

from wiregate.model import DnsConfig, NetMap
from wiregate.net import destination_refusal

__all__ = [
    "CACHE_LIMIT",
    "TTL",
    "Forward",
    "Host",
    "Reply",
    "Responder",
    "Zone",
    "build_zone",
    "dns_label",
    "zone_content",
]

TTL = 10  # seconds: a rename or a revocation is seen by resolvers within this
CACHE_LIMIT = 4096  # answers kept by query bytes; the cache starts over past this
UDP_PAYLOAD = 1232  # our EDNS payload size (the DNS flag day's recommendation)

_IN = dns.rdataclass.IN
_A, _AAAA, _PTR, _SOA, _ANY = (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.PTR,
                               dns.rdatatype.SOA, dns.rdatatype.ANY)  # fmt: skip
_REVERSE = (dns.name.from_text("in-addr.arpa."), dns.name.from_text("ip6.arpa."))
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def dns_label(name: str) -> str | None:
    """The DNS label of a device name (``DB_1.eu`` → ``db-1-eu``), or None if none fits."""
    label = name.strip().lower().replace(".", "-").replace("_", "-")
    return label if _LABEL.match(label) else None


@dataclass(frozen=True, slots=True)
class Host:
    """One device's records: its tunnel addresses, IPv4 and IPv6."""

    label: str
    v4: tuple[str, ...] = ()
    v6: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Zone:
    """The records of the mesh domain, the reverse names and the split-DNS zones."""

    origin: dns.name.Name
    serial: int
    hosts: Mapping[str, Host] = field(default_factory=dict)  # by label (lower case)
    reverse: Mapping[str, str] = field(default_factory=dict)  # address -> label
    zones: tuple[tuple[dns.name.Name, tuple[str, ...]], ...] = ()  # longest first
    left_out: tuple[str, ...] = ()  # device names that make no label, or share one

    def soa(self) -> dns.rrset.RRset:
        """The domain's SOA; its minimum (the negative-answer TTL, RFC 2308) is :data:`TTL`."""
        rdata = dns.rdtypes.ANY.SOA.SOA(  # type: ignore[no-untyped-call]
            _IN, _SOA, dns.name.Name(("ns", *self.origin.labels)),
            dns.name.Name(("hostmaster", *self.origin.labels)),
            self.serial, 3600, 600, 86400, TTL,
        )  # fmt: skip
        return dns.rrset.from_rdata(self.origin, TTL, rdata)

    def host(self, qname: dns.name.Name) -> Host | None:
        """The device ``qname`` (under the origin) names, or None."""
        labels = qname.labels
        if len(labels) != len(self.origin.labels) + 1:
            return None
        return self.hosts.get(labels[0].decode("ascii", "replace").lower())

    def pointer(self, qname: dns.name.Name) -> dns.name.Name | None:
        """The name a reverse name (``in-addr.arpa``/``ip6.arpa``) of a tunnel address
        points to, or None."""
        if not qname.is_subdomain(_REVERSE[0]) and not qname.is_subdomain(_REVERSE[1]):
            return None
        try:
            address = str(ipaddress.ip_address(dns.reversename.to_address(qname)))
        except (dns.exception.DNSException, ValueError):
            return None
        label = self.reverse.get(address)
        return None if label is None else dns.name.Name((label, *self.origin.labels))

    def split_zone(self, qname: dns.name.Name) -> tuple[str, ...] | None:
        """The nameservers of the longest split zone holding ``qname``, or None."""
        for zone, servers in self.zones:
            if qname.is_subdomain(zone):
                return servers
        return None


def zone_content(netmap: NetMap) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """What the zone of ``netmap`` is made of (names and addresses): equal contents give
    equal zones, so an unchanged content needs no new zone."""
    own = netmap.self_view
    return ((own.name, own.addresses),
            *((p.name, p.addresses) for p in netmap.peers.values()))  # fmt: skip


def build_zone(netmap: NetMap, config: DnsConfig, *, serial: int | None = None) -> Zone:
    """The :class:`Zone` of ``netmap`` (this device and its peers) under ``config``;
    ``serial`` (default: the map's version) is the SOA's."""
    origin = _absolute(config.domain)
    named: dict[str, list[tuple[str, Iterable[str]]]] = {}
    for name, addresses in zone_content(netmap):
        named.setdefault(dns_label(name) or "", []).append((name, addresses))
    hosts: dict[str, Host] = {}
    reverse: dict[str, str] = {}
    left_out: list[str] = []
    for label, devices in sorted(named.items()):
        if not label or len(devices) > 1:
            left_out.extend(name for name, _ in devices)
            continue
        host = hosts[label] = _host(label, devices[0][1])
        reverse.update(dict.fromkeys(host.v4 + host.v6, label))
    version = netmap.version if serial is None else serial
    return Zone(origin, version & 0xFFFFFFFF, hosts, reverse,
                _split_zones(config, origin), tuple(sorted(left_out)))  # fmt: skip


def _absolute(domain: str) -> dns.name.Name:
    return dns.name.from_text(domain.lower().rstrip(".") + ".")


def _host(label: str, addresses: Iterable[str]) -> Host:
    v4: list[str] = []
    v6: list[str] = []
    for cidr in addresses:
        try:
            ip = ipaddress.ip_address(cidr.split("/", 1)[0])
        except ValueError:
            continue
        (v4 if ip.version == 4 else v6).append(str(ip))
    return Host(label, tuple(v4), tuple(v6))


def _split_zones(
    config: DnsConfig, origin: dns.name.Name
) -> tuple[tuple[dns.name.Name, tuple[str, ...]], ...]:
    """The usable split zones: valid names beside the mesh domain, servers one may send to."""
    zones: list[tuple[dns.name.Name, tuple[str, ...]]] = []
    for text, servers in config.zones:
        try:
            zone = _absolute(text)
            usable = tuple(s for s in servers if _nameserver(s))
        except (dns.exception.DNSException, ValueError):
            continue
        if usable and not zone.is_subdomain(origin) and not origin.is_subdomain(zone):
            zones.append((zone, usable))
    return tuple(sorted(zones, key=lambda z: -len(z[0].labels)))


def _nameserver(text: str) -> bool:
    ip = ipaddress.ip_address(text)
    return destination_refusal(ip) is None


# -- answering -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """Wire bytes to send back to the asker."""

    wire: bytes


@dataclass(frozen=True, slots=True)
class Forward:
    """A query this server does not answer itself: ask ``servers`` (None: the host's
    upstream resolver) and relay their answer; ``fail`` is the SERVFAIL to send if
    none answers."""

    query: dns.message.Message
    servers: tuple[str, ...] | None
    fail: bytes


Outcome = Reply | Forward | None


class Responder:
    """Answers queries from one :class:`Zone`; identical queries (but for their id)
    get the same answer from a bounded cache of wire bytes."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self._cache: dict[bytes, bytes] = {}

    def respond(self, data: bytes, *, max_size: int | None = None) -> Outcome:
        """The outcome of the query ``data`` (``max_size``: a TCP answer's limit, else UDP's)."""
        key = data[2:] if max_size is None else b"T" + data[2:]
        hit = self._cache.get(key)
        if hit is not None:
            return Reply(data[:2] + hit)
        outcome = self._respond(data, max_size)
        if isinstance(outcome, Reply) and len(data) >= 12:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = outcome.wire[2:]
        return outcome

    def _respond(self, data: bytes, max_size: int | None) -> Outcome:
        if len(data) < 12 or data[2] & 0x80:  # a runt, or a response: never answered
            return None
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return Reply(_header_only(data, dns.rcode.FORMERR))
        if query.opcode() != dns.opcode.QUERY:
            return Reply(_header_only(data, dns.rcode.NOTIMP))
        if len(query.question) != 1:
            return Reply(_header_only(data, dns.rcode.FORMERR))
        return self._question(query, max_size)

    def _question(self, query: dns.message.Message, max_size: int | None) -> Outcome:
        question = query.question[0]
        qname = question.name
        zone = self.zone
        if qname.is_subdomain(zone.origin):
            if question.rdclass != _IN:
                return _reply(query, dns.rcode.REFUSED, max_size)
            return self._mesh(query, qname, question.rdtype, max_size)
        target = zone.pointer(qname) if question.rdtype in (_PTR, _ANY) else None
        if target is not None and question.rdclass == _IN:
            ptr = dns.rdtypes.ANY.PTR.PTR(_IN, _PTR, target)  # type: ignore[no-untyped-call]
            answer = dns.rrset.from_rdata(qname, TTL, ptr)
            return _reply(query, dns.rcode.NOERROR, max_size, answer=[answer])
        servers = zone.split_zone(qname)
        return Forward(query, servers, _reply(query, dns.rcode.SERVFAIL, max_size).wire)

    def _mesh(
        self, query: dns.message.Message, qname: dns.name.Name, rdtype: int,
        max_size: int | None,
    ) -> Reply:  # fmt: skip
        zone = self.zone
        soa = zone.soa()
        if qname == zone.origin:
            if rdtype in (_SOA, _ANY):
                return _reply(query, dns.rcode.NOERROR, max_size, answer=[_named(soa, qname)])
            return _reply(query, dns.rcode.NOERROR, max_size, authority=[soa])
        host = zone.host(qname)
        if host is None:
            return _reply(query, dns.rcode.NXDOMAIN, max_size, authority=[soa])
        answer = [r for r in _records(host, qname, rdtype) if r]
        if not answer:
            return _reply(query, dns.rcode.NOERROR, max_size, authority=[soa])
        return _reply(query, dns.rcode.NOERROR, max_size, answer=answer)


def _records(host: Host, qname: dns.name.Name, rdtype: int) -> list[dns.rrset.RRset]:
    out: list[dns.rrset.RRset] = []
    if rdtype in (_A, _ANY) and host.v4:
        v4 = [dns.rdtypes.IN.A.A(_IN, _A, a) for a in host.v4]  # type: ignore[no-untyped-call]
        out.append(dns.rrset.from_rdata_list(qname, TTL, v4))
    if rdtype in (_AAAA, _ANY) and host.v6:
        v6 = [dns.rdtypes.IN.AAAA.AAAA(_IN, _AAAA, a) for a in host.v6]  # type: ignore[no-untyped-call]
        out.append(dns.rrset.from_rdata_list(qname, TTL, v6))
    return out


def _named(rrset: dns.rrset.RRset, name: dns.name.Name) -> dns.rrset.RRset:
    """``rrset`` owned by ``name`` as the asker spelled it (0x20 case echoed)."""
    return dns.rrset.from_rdata_list(name, rrset.ttl, list(rrset))


def _reply(
    query: dns.message.Message,
    rcode: dns.rcode.Rcode,
    max_size: int | None,
    *,
    answer: Iterable[dns.rrset.RRset] = (),
    authority: Iterable[dns.rrset.RRset] = (),
) -> Reply:
    response = dns.message.make_response(query, our_payload=UDP_PAYLOAD)
    response.flags |= dns.flags.RA
    if answer or authority or rcode == dns.rcode.NXDOMAIN:
        response.flags |= dns.flags.AA  # the mesh domain and the tunnel reverse names are ours
    response.set_rcode(rcode)
    response.answer.extend(answer)
    response.authority.extend(authority)
    if max_size is None:
        max_size = max(512, query.payload) if query.edns >= 0 else 512
    limit = min(max_size, 65535)
    try:
        return Reply(response.to_wire(max_size=limit))
    except dns.exception.TooBig:  # the asker retries over TCP
        response.answer.clear()
        response.authority.clear()
        response.flags |= dns.flags.TC
        return Reply(response.to_wire(max_size=limit))


def _header_only(data: bytes, rcode: int) -> bytes:
    """A bare response header to an unreadable query: its id and opcode, ``rcode``."""
    flags = (0x80 | (data[2] & 0x79)) << 8 | 0x80 | rcode  # QR, opcode and RD kept; RA
    return data[:2] + flags.to_bytes(2, "big") + bytes(8)
