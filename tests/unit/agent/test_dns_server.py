"""The DNS server's asyncio adapter (agent/dns/server.py) and the agent's names service
(agent/dns/service.py), on loopback sockets with a stand-in for the upstream nameservers."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from agent.dns.server import DnsServer
from agent.dns.service import Names
from agent.dns.zone import build_zone
from wiregate.model import DnsConfig, NetMap, Peer, SelfView
from wiregate.settings import AgentSettings

ZONES = (("cluster.local", ("10.96.0.10",)),)


def free_port() -> int:
    """A port free for UDP and for TCP (the server listens on both: a port free for UDP
    alone may be some TCP connection's local port)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free for both UDP and TCP")


NAMES = DnsConfig("wg.internal", ZONES)


def netmap(dns_config: DnsConfig | None = NAMES) -> NetMap:
    own = SelfView("self", "web", "k", ("127.0.0.1/32",), dns=dns_config)
    db = Peer("p", "db", "k2", ("100.64.0.2/32", "fd7a::2/128"), ("100.64.0.2/32",))
    return NetMap(3, own, {"p": db})


class Upstreams:
    """Records what was forwarded where; answers ``answer`` (None: nobody answers)."""

    def __init__(self, answer: bool = True) -> None:
        self.asked: list[tuple[str, tuple[str, ...], bool]] = []
        self.answer = answer

    async def __call__(
        self, query: dns.message.Message, servers: Sequence[str], tcp: bool
    ) -> bytes | None:
        self.asked.append((query.question[0].name.to_text(), tuple(servers), tcp))
        if not self.answer:
            return None
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()


async def query(name: str, port: int, *, tcp: bool = False, source: str | None = None,
                timeout: float = 2.0) -> dns.message.Message:  # fmt: skip
    q = dns.message.make_query(name, "A")
    if tcp:
        return await dns.asyncquery.tcp(q, "127.0.0.1", port=port, timeout=timeout)
    return await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=timeout, source=source)


async def test_answers_over_udp_and_tcp_and_forwards_the_rest() -> None:
    port, upstreams = free_port(), Upstreams()
    server = DnsServer(port=port, forward=upstreams, upstreams=("192.0.2.53",))
    await server.listen(["127.0.0.1"])
    server.set_zone(build_zone(netmap(), DnsConfig("wg.internal", ZONES)))
    try:
        udp = await query("db.wg.internal", port)
        tcp = await query("DB.wg.internal", port, tcp=True)
        assert [r.address for r in udp.answer[0]] == ["100.64.0.2"]
        assert [r.address for r in tcp.answer[0]] == ["100.64.0.2"]
        assert dns.rcode.to_text((await query("api.cluster.local", port)).rcode()) == "NXDOMAIN"
        await query("example.com", port, tcp=True)
        assert upstreams.asked == [
            ("api.cluster.local.", ("10.96.0.10",), False),
            ("example.com.", ("192.0.2.53",), True),
        ]
        doc = server.to_dict()
        assert doc["answered"] == 2 and doc["forwarded"] == 2 and doc["names"] == 2
    finally:
        await server.close()


async def test_no_upstream_answer_is_servfail() -> None:
    port = free_port()
    server = DnsServer(port=port, forward=Upstreams(answer=False), upstreams=("192.0.2.53",))
    await server.listen(["127.0.0.1"])
    server.set_zone(build_zone(netmap(), DnsConfig("wg.internal")))
    try:
        assert dns.rcode.to_text((await query("example.com", port)).rcode()) == "SERVFAIL"
        server.upstreams = ()  # no upstream known at all
        assert dns.rcode.to_text((await query("example.org", port)).rcode()) == "SERVFAIL"
    finally:
        await server.close()


async def test_only_this_host_and_allowed_sources_are_answered() -> None:
    port = free_port()
    server = DnsServer(port=port)
    await server.listen(["127.0.0.1"])
    server.set_zone(build_zone(netmap(), DnsConfig("wg.internal")))
    try:
        with pytest.raises(dns.exception.Timeout):
            await query("db.wg.internal", port, source="127.0.0.9", timeout=0.5)
        assert server.counts["refused_source"] == 1
        assert server.allowed("127.0.0.1") and not server.allowed("100.64.0.2")
    finally:
        await server.close()
    allowing = DnsServer(port=port, allow=["127.0.0.0/24", "10.244.1.0/24"])
    await allowing.listen(["127.0.0.1"])
    allowing.set_zone(build_zone(netmap(), DnsConfig("wg.internal")))
    try:
        answer = await query("db.wg.internal", port, source="127.0.0.9")
        assert answer.answer and allowing.allowed("10.244.1.7")
        assert not allowing.allowed("10.244.2.7") and not allowing.allowed("junk")
    finally:
        await allowing.close()


async def test_listen_where_the_address_is_not_configured_yet() -> None:
    server = DnsServer(port=free_port())
    await server.listen(["198.51.100.77"])  # freebind: the tunnel address comes later
    try:
        assert server.addresses == ("198.51.100.77",)
    finally:
        await server.close()


async def test_names_follow_the_map_and_give_the_resolver_back(tmp_path: Path) -> None:
    port = free_port()
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    # the file names port 53, as a resolv.conf must; the server here listens on a free port
    settings = AgentSettings(dns_resolver="resolv.conf", dns_resolv_conf=resolv,
                             state_dir=tmp_path)  # fmt: skip
    names = Names(settings, DnsServer(port=port, forward=Upstreams()))
    await names.update(netmap())
    try:
        assert resolv.read_text().startswith("# wiregate")
        assert "nameserver 127.0.0.1" in resolv.read_text()
        assert names.server.upstreams == ("192.0.2.53",)
        answer = await query("db.wg.internal", port)
        assert answer.answer
        doc = names.to_dict()
        assert doc["host_resolver"] == "resolv.conf" and doc["zones"] == ["cluster.local"]
        await names.update(netmap(dns_config=None))  # the gateway turned names off
        assert resolv.read_text() == "nameserver 192.0.2.53\n"
        assert names.server.addresses == ()
        await names.update(netmap())
        assert resolv.read_text().startswith("# wiregate")
    finally:
        await names.close()
    assert resolv.read_text() == "nameserver 192.0.2.53\n"


async def test_names_off_in_the_agents_settings(tmp_path: Path) -> None:
    settings = AgentSettings(dns=False, dns_port=free_port(), state_dir=tmp_path)
    names = Names(settings)
    await names.update(netmap())
    assert names.server.addresses == () and names.resolver is None
    await names.close()


async def test_a_port_in_use_is_reported_not_raised(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        settings = AgentSettings(dns_port=port, dns_resolver="off", state_dir=tmp_path)
        names = Names(settings)
        await names.update(netmap())
        assert "cannot listen on port" in names.to_dict()["problem"]
        await names.close()


def test_a_wire_roundtrip_of_the_dns_field() -> None:
    from wiregate import mapwire

    full = mapwire.parse_map_message(mapwire.dumps(mapwire.build_full(netmap())))
    assert isinstance(full, NetMap) and full.self_view.dns == DnsConfig("wg.internal", ZONES)
    doc = mapwire.build_self(netmap().self_view)
    assert doc["dns"] == {"domain": "wg.internal", "zones": {"cluster.local": ["10.96.0.10"]}}
    assert "dns" not in mapwire.build_self(netmap(None).self_view)
    bads: list[dict[str, object]] = [
        {"zones": {}},
        {"domain": "x", "zones": []},
        {"domain": "x", "zones": {"z": "a"}},
    ]
    for bad in bads:
        with pytest.raises(mapwire.MalformedMessage):
            mapwire.read_self({**doc, "dns": bad})


def test_the_gateway_puts_the_dns_field_in_every_self_view() -> None:
    from gateway.mapping.netmap import NetworkState, apply_upsert, encode_full, full_map
    from wiregate.model import Device, Identity
    from wiregate.settings import GatewaySettings

    config = GatewaySettings(dns_zones={"cluster.local": ["10.96.0.10"]}).mesh_dns()
    assert config == DnsConfig("wg.internal", ZONES)
    state = NetworkState(dns=config)
    who = Identity("i", "s")
    apply_upsert(state, Device("a", "a", "k" * 43 + "=", who, "100.64.0.1", "fd7a::1"))
    assert full_map(state, "a", 1).self_view.dns == config
    assert '"dns":{"domain":"wg.internal"' in encode_full(state, "a", 1)
    assert GatewaySettings(dns_domain="").mesh_dns() is None


def test_a_port_other_than_53_is_named_to_resolved_and_refused_for_resolv_conf(
    tmp_path: Path,
) -> None:
    from agent.dns.hostconfig import ResolvConf, Resolved
    from agent.dns.service import _servers
    from wiregate.errors import LocalError

    addresses = ("100.64.0.1", "fd7a::1")
    assert _servers(Resolved("wg0"), addresses, 53) == ["100.64.0.1", "fd7a::1"]
    assert _servers(Resolved("wg0"), addresses, 5353) == ["100.64.0.1:5353", "[fd7a::1]:5353"]
    with pytest.raises(LocalError, match="only name port 53"):
        _servers(ResolvConf(tmp_path / "r", tmp_path / "b"), addresses, 5353)


async def test_a_map_with_the_same_names_keeps_the_zone(tmp_path: Path) -> None:
    """An endpoint change (a new map version, the same names) rebuilds nothing; the SOA
    serial is the version at which the names last changed."""
    port = free_port()
    settings = AgentSettings(dns_resolver="off", state_dir=tmp_path)
    names = Names(settings, DnsServer(port=port))
    first = netmap()
    try:
        await names.update(first)
        assert names.server.responder is not None
        zone = names.server.responder.zone
        moved = dict(first.peers)
        moved["p"] = Peer("p", "db", "k2", ("100.64.0.2/32", "fd7a::2/128"),
                          ("100.64.0.2/32",), endpoints=("192.0.2.9:51820",))  # fmt: skip
        await names.update(NetMap(4, first.self_view, moved))
        assert names.server.responder.zone is zone and zone.serial == 3
        moved["p"] = Peer("p", "database", "k2", ("100.64.0.2/32",), ("100.64.0.2/32",))
        await names.update(NetMap(5, first.self_view, moved))
        renamed = names.server.responder.zone
        assert renamed is not zone and renamed.serial == 5 and "database" in renamed.hosts
    finally:
        await names.close()


async def test_a_node_address_is_served_to_the_allowed_sources_only(tmp_path: Path) -> None:
    """``dns_listen``: the server also listens on a host address (a node's InternalIP,
    the wiregate-dns Service's endpoint), answering there the node's pods (their CIDRs
    added from the Node, ``dns_allow_pods``) and this host; the host's resolver still
    names the tunnel addresses."""
    port = free_port()
    settings = AgentSettings(dns_resolver="off", dns_listen=["127.0.0.2"], state_dir=tmp_path)
    names = Names(settings, DnsServer(port=port))
    names.server.allow_also(["127.0.0.64/26", "127.0.0.64/26"])  # as dns_allow_pods adds
    try:
        await names.update(netmap())
        assert names.server.addresses == ("127.0.0.1", "127.0.0.2")
        q = dns.message.make_query("db.wg.internal", "A")
        for source in ("127.0.0.70", "127.0.0.2"):  # a pod of the node; the node itself
            answer = await dns.asyncquery.udp(q, "127.0.0.2", port=port, source=source, timeout=2)
            assert answer.answer[0][0].to_text() == "100.64.0.2"
        with pytest.raises(dns.exception.Timeout):  # anyone else
            await dns.asyncquery.udp(q, "127.0.0.2", port=port, source="127.0.0.9", timeout=0.5)
        assert names.server.counts["refused_source"] == 1
    finally:
        await names.close()


def test_dns_listen_takes_single_addresses() -> None:
    assert AgentSettings(dns_listen=["10.0.0.5", "10.0.0.5"]).dns_listen == ["10.0.0.5"]
    for bad in ("10.0.0.0/24", "0.0.0.0", "::", "224.0.0.1", "node"):
        with pytest.raises(ValueError, match="dns_listen"):
            AgentSettings(dns_listen=[bad])
