"""The mesh domain's records and answers (agent/dns/zone.py): pure, no sockets."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dns.zone import (
    CACHE_LIMIT,
    TTL,
    Forward,
    Reply,
    Responder,
    Zone,
    build_zone,
    dns_label,
)
from wiregate.model import DnsConfig, NetMap, Peer, SelfView

DOMAIN = "wg.internal"


def peer(pid: str, name: str, host: int) -> Peer:
    cidrs = (f"100.64.0.{host}/32", f"fd7a:7767:6174::{host}/128")
    return Peer(pid, name, f"key{pid}", cidrs, (*cidrs, "10.1.0.0/24"))


def netmap(*peers: Peer, version: int = 42) -> NetMap:
    own = SelfView("self", "web-1", "keyself", ("100.64.0.1/32", "fd7a:7767:6174::1/128"))
    return NetMap(version, own, {p.id: p for p in peers})


def zone(*peers: Peer, zones: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> Zone:
    return build_zone(netmap(*peers), DnsConfig(DOMAIN, zones))


def ask(z: Zone, name: str, rdtype: str = "A", **kwargs: object) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    outcome = Responder(z).respond(query.to_wire())
    assert isinstance(outcome, Reply), outcome
    answer = dns.message.from_wire(outcome.wire)
    assert answer.id == query.id and answer.flags & dns.flags.QR
    return answer


def rcode(message: dns.message.Message) -> str:
    return dns.rcode.to_text(message.rcode())


def test_a_and_aaaa_of_a_peer_with_a_small_ttl() -> None:
    z = zone(peer("p1", "db", 2))
    a = ask(z, f"db.{DOMAIN}", "A")
    assert rcode(a) == "NOERROR" and a.flags & dns.flags.AA
    [rrset] = a.answer
    assert [r.address for r in rrset] == ["100.64.0.2"] and rrset.ttl == TTL
    aaaa = ask(z, f"db.{DOMAIN}", "AAAA")
    assert [r.address for r in aaaa.answer[0]] == ["fd7a:7767:6174::2"]
    both = ask(z, f"db.{DOMAIN}", "ANY")
    assert {r.rdtype for r in both.answer} == {dns.rdatatype.A, dns.rdatatype.AAAA}


def test_routes_are_not_names_own_device_is() -> None:
    z = zone(peer("p1", "db", 2))
    assert "10.1.0.0" not in str(ask(z, f"db.{DOMAIN}").answer)
    own = ask(z, f"web-1.{DOMAIN}")
    assert [r.address for r in own.answer[0]] == ["100.64.0.1"]


def test_names_are_case_insensitive_and_the_askers_case_is_echoed() -> None:
    z = zone(peer("p1", "DB", 2))
    answer = ask(z, "dB.Wg.InTeRnAl", "A")
    assert answer.answer[0].name.to_text() == "dB.Wg.InTeRnAl."
    assert answer.question[0].name.to_text() == "dB.Wg.InTeRnAl."


def test_unknown_names_are_nxdomain_with_the_soa() -> None:
    z = zone(peer("p1", "db", 2))
    for name in (f"nope.{DOMAIN}", f"x.db.{DOMAIN}"):
        answer = ask(z, name)
        assert rcode(answer) == "NXDOMAIN" and answer.flags & dns.flags.AA
        assert not answer.answer
        [soa] = answer.authority
        assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == f"{DOMAIN}."
        record = soa[0]
        assert record.serial == 42 and record.minimum == TTL and soa.ttl == TTL
        assert record.mname.to_text() == f"ns.{DOMAIN}."


def test_other_types_of_a_name_are_nodata_with_the_soa() -> None:
    answer = ask(zone(peer("p1", "db", 2)), f"db.{DOMAIN}", "MX")
    assert rcode(answer) == "NOERROR" and not answer.answer
    assert answer.authority[0].rdtype == dns.rdatatype.SOA


def test_the_apex_answers_its_soa_and_nodata_otherwise() -> None:
    z = zone()
    soa = ask(z, DOMAIN, "SOA")
    assert soa.answer[0].rdtype == dns.rdatatype.SOA and rcode(soa) == "NOERROR"
    a = ask(z, DOMAIN, "A")
    assert rcode(a) == "NOERROR" and not a.answer and a.authority


def test_a_device_out_of_the_map_does_not_resolve() -> None:
    """The map is what the policy lets this device peer with: nothing else has a name."""
    z = zone(peer("p1", "db", 2))
    assert rcode(ask(z, f"billing.{DOMAIN}")) == "NXDOMAIN"


def test_ptr_of_tunnel_addresses() -> None:
    z = zone(peer("p1", "db", 2))
    for address in ("100.64.0.2", "fd7a:7767:6174::2"):
        name = dns.reversename.from_address(address).to_text()
        answer = ask(z, name, "PTR")
        assert answer.answer[0][0].target.to_text() == f"db.{DOMAIN}."
        assert answer.flags & dns.flags.AA


def test_other_names_are_forwarded_split_zones_to_their_servers() -> None:
    zones = (("cluster.local", ("10.96.0.10",)), ("svc.cluster.local", ("10.96.0.11",)),
             ("bad.example", ("127.0.0.1",)), ("x.wg.internal", ("10.0.0.1",)))  # fmt: skip
    z = zone(zones=zones)
    responder = Responder(z)

    def forwarded(name: str) -> tuple[str, ...] | None:
        outcome = responder.respond(dns.message.make_query(name, "A").to_wire())
        assert isinstance(outcome, Forward)
        fail = dns.message.from_wire(outcome.fail)
        assert rcode(fail) == "SERVFAIL" and fail.id == outcome.query.id
        return outcome.servers

    assert forwarded("orders.shop.svc.cluster.local") == ("10.96.0.11",)  # the longest zone
    assert forwarded("kube-dns.kube-system.cluster.local") == ("10.96.0.10",)
    assert forwarded("example.com") is None  # the host's upstream resolver
    assert forwarded("db.bad.example") is None  # a loopback nameserver is never used
    assert [str(name) for name, _ in z.zones] == ["svc.cluster.local.", "cluster.local."]
    reverse_unknown = dns.reversename.from_address("100.64.0.99").to_text()
    assert forwarded(reverse_unknown) is None


def test_dns_labels() -> None:
    assert dns_label("DB_1.eu") == "db-1-eu"
    assert dns_label("web-1") == "web-1"
    assert dns_label("-x") is None and dns_label("a" * 64) is None and dns_label("é") is None


def test_clashing_or_unfit_names_are_left_out() -> None:
    z = zone(peer("p1", "db.1", 2), peer("p2", "db_1", 3), peer("p3", "-bad", 4))
    assert z.left_out == ("-bad", "db.1", "db_1")
    assert rcode(ask(z, f"db-1.{DOMAIN}")) == "NXDOMAIN"
    reverse = dns.reversename.from_address("100.64.0.2").to_text()
    assert not isinstance(Responder(z).respond(dns.message.make_query(reverse, "PTR").to_wire()),
                          Reply)  # fmt: skip


def test_unreadable_and_unanswerable_queries() -> None:
    responder = Responder(zone())
    assert responder.respond(b"\x12\x34") is None  # a runt
    response = dns.message.make_response(dns.message.make_query(f"x.{DOMAIN}", "A"))
    assert responder.respond(response.to_wire()) is None  # a response is never answered
    garbage = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff"
    formerr = responder.respond(garbage)
    assert isinstance(formerr, Reply) and formerr.wire[:2] == b"\xab\xcd"
    header = dns.message.from_wire(formerr.wire)
    assert rcode(header) == "FORMERR" and header.flags & dns.flags.RD
    notify = dns.message.make_query(f"x.{DOMAIN}", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    outcome = responder.respond(notify.to_wire())
    assert isinstance(outcome, Reply) and rcode(dns.message.from_wire(outcome.wire)) == "NOTIMP"
    chaos = dns.message.make_query(f"x.{DOMAIN}", "TXT", rdclass=dns.rdataclass.CH)
    assert rcode(ask(zone(), chaos.question[0].name.to_text(), "TXT",
                     rdclass=dns.rdataclass.CH)) == "REFUSED"  # fmt: skip


def test_edns_is_answered_with_edns() -> None:
    answer = ask(zone(peer("p1", "db", 2)), f"db.{DOMAIN}", "A", use_edns=0, payload=4096)
    assert answer.edns == 0 and answer.payload == 1232
    plain = ask(zone(peer("p1", "db", 2)), f"db.{DOMAIN}", "A", use_edns=False)
    assert plain.edns == -1


def test_answers_are_cached_by_query_bytes_with_each_askers_id() -> None:
    responder = Responder(zone(peer("p1", "db", 2)))
    query = dns.message.make_query(f"db.{DOMAIN}", "A")
    first = responder.respond(query.to_wire())
    query.id = (query.id + 1) % 65536
    second = responder.respond(query.to_wire())
    assert isinstance(first, Reply) and isinstance(second, Reply)
    assert second.wire[2:] == first.wire[2:]
    assert dns.message.from_wire(second.wire).id == query.id
    for n in range(CACHE_LIMIT + 5):  # bounded: the cache starts over
        responder.respond(dns.message.make_query(f"n{n}.{DOMAIN}", "A").to_wire())
    assert len(responder._cache) <= CACHE_LIMIT


def test_a_new_map_answers_anew() -> None:
    before = Responder(zone(peer("p1", "db", 2)))
    after = Responder(zone(peer("p1", "database", 2)))
    wire = dns.message.make_query(f"db.{DOMAIN}", "A").to_wire()
    for responder, want in ((before, "NOERROR"), (after, "NXDOMAIN")):
        outcome = responder.respond(wire)
        assert isinstance(outcome, Reply) and rcode(dns.message.from_wire(outcome.wire)) == want


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_get_an_outcome_never_an_exception(data: bytes) -> None:
    outcome = Responder(zone(peer("p1", "db", 2))).respond(data)
    if isinstance(outcome, Reply):
        assert outcome.wire[:2] == data[:2]


def test_an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp() -> None:
    many = tuple(f"100.64.1.{i}/32" for i in range(1, 61))
    z = zone(Peer("p1", "big", "k", many, many))
    wire = dns.message.make_query(f"big.{DOMAIN}", "A", use_edns=False).to_wire()
    udp = Responder(z).respond(wire)
    assert isinstance(udp, Reply) and len(udp.wire) <= 512
    cut = dns.message.from_wire(udp.wire)
    assert cut.flags & dns.flags.TC and not cut.answer
    tcp = Responder(z).respond(wire, max_size=65535)
    assert isinstance(tcp, Reply) and len(dns.message.from_wire(tcp.wire).answer[0]) == 60
