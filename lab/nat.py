"""Relays in the lab's internet namespace, and the home-router firewall rules around them."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from lab.harness import (
    GATEWAY_PORT,
    INTERNET_GATEWAY,
    Agent,
    Host,
    Lab,
    NatMode,
    Process,
    Router,
    Wiregate,
    poll,
)
from lab.tls import LabCA

RELAY_HOSTS = {"r1": INTERNET_GATEWAY, "r2": "198.51.100.253"}


RELAY_PORTS = {"r1": (40000, 40063), "r2": (41000, 41063)}


STUN_SECOND = "198.51.100.254"


STUN = [f"{INTERNET_GATEWAY}:3478", f"{STUN_SECOND}:3479"]


CONTROL_PORT = 3480


TCP_PORT = 443  # each relay's TLS listener (WireGuard over TCP), with ``tcp_ca``


def relay_tcp_entries() -> list[str]:
    """The gateway's ``relay_tcp`` setting for relays started with ``tcp_ca``."""
    return [f"{rid}={host}:{TCP_PORT}" for rid, host in RELAY_HOSTS.items()]


def start_relays(lab: Lab, wiregate: Wiregate, tcp_ca: LabCA | None = None) -> dict[str, Process]:
    """Both relays in the internet namespace, trusting the gateway's ticket signer.

    ``tcp_ca``: each relay also listens for TLS on its address's :data:`TCP_PORT`, with a
    certificate of that CA (agents must trust it: ``--ca-file``)."""
    for addr in (RELAY_HOSTS["r2"], STUN_SECOND):
        lab.internet.run(["ip", "addr", "add", f"{addr}/24", "dev", "br0"])
    ca = ["--cacert", str(wiregate.ca_file)] if wiregate.ca_file is not None else []
    signers = lab.internet.run(
        ["curl", "-sf", "-m", "5", *ca, f"{wiregate.server}/api/v1/relay/signers"], timeout=10
    ).stdout
    keys = lab.workdir / "relay-signers.json"
    keys.write_text(signers)
    relays: dict[str, Process] = {}
    for index, (rid, host) in enumerate(RELAY_HOSTS.items()):
        first, last = RELAY_PORTS[rid]
        stun = STUN if rid == "r1" else [f"{host}:3478"]
        env = {}
        if tcp_ca is not None:
            pair = tcp_ca.issue(lab.workdir / f"relay-{rid}-tls", [host])
            env = {
                "WIREGATE_TCP_LISTEN": f"{host}:{TCP_PORT}",
                "WIREGATE_TLS_CERT": str(pair.cert),
                "WIREGATE_TLS_KEY": str(pair.key),
            }
        relays[rid] = lab.internet.spawn(
            [*wiregate.cmd, "relay", *itertools.chain(*(("--stun-listen", s) for s in stun)),
             "--relay-id", rid, "--relay-listen", f"{host}:{CONTROL_PORT}",
             "--relay-ports", f"{first}-{last}", "--verify-keys-file", str(keys),
             "--metrics-listen", f"127.0.0.1:{9191 + index}", "--log-format", "json"],
            env=env, name=f"relay-{rid}",
        )  # fmt: skip
    ready = "relay tcp listening" if tcp_ca is not None else "relay listening"
    for rid, proc in relays.items():
        poll(partial(_logged, proc, ready), timeout=20, what=f"relay {rid}")
    return relays


def _logged(proc: Process, text: str) -> bool:
    return text in proc.output()


def tcp_only(router: Router, gateway_port: int = GATEWAY_PORT) -> None:
    """A firewall that lets the LAN out only over TCP to the relays' :data:`TCP_PORT` and to
    the gateway (and the answers back in): no UDP at all, no other TCP."""
    lan = router.lan_ifname
    rules = [["-p", "tcp", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]]
    rules += [["-i", lan, "-p", "tcp", "-d", host, "--dport", str(TCP_PORT), "-j", "ACCEPT"]
              for host in RELAY_HOSTS.values()]  # fmt: skip
    rules.append(["-i", lan, "-p", "tcp", "-d", INTERNET_GATEWAY, "--dport", str(gateway_port),
                  "-j", "ACCEPT"])  # fmt: skip
    for index, rule in enumerate(rules, start=1):
        router.run(["iptables", "-I", "FORWARD", str(index), *rule])
    for direction in ("-i", "-o"):
        router.run(["iptables", "-A", "FORWARD", direction, lan, "-j", "DROP"])


def allow_relays_only(router: Router) -> None:
    """On a UDP-blocking router: let UDP through to (and back from) the relays only."""
    for rid, host in RELAY_HOSTS.items():
        first, last = RELAY_PORTS[rid]
        ports = f"{CONTROL_PORT},{first}:{last}"
        for match, way in (("-d", "--dports"), ("-s", "--sports")):
            router.run(["iptables", "-I", "FORWARD", "1", "-p", "udp", match, host,
                        "-m", "multiport", way, ports, "-j", "ACCEPT"])  # fmt: skip


def drop_unsolicited(router: Router) -> None:
    """A home router's firewall: drop unsolicited packets to the router itself.

    Without it, Linux conntrack records the peer's first (unsolicited) handshake
    as an inbound flow to WAN:51820; the host's own handshake to that peer then
    clashes with it and MASQUERADE picks another port, so both sides aim at the
    wrong port and simultaneous open fails (the plain lab router is "EIM" only
    while no such clash occurs). Dropped in INPUT, the entry is never confirmed.
    """
    router.run(["iptables", "-A", "INPUT", "-i", router.wan_ifname,
                "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"])  # fmt: skip


def address_dependent_filtering(router: Router, host: Host, port: int = 51820) -> None:
    """Make ``router`` (EIM mapping) filter by address only for ``host``'s UDP ``port``.

    Linux conntrack filters by address and port: an inbound datagram passes only if
    it answers the exact 5-tuple the host sent. Here, once the host has sent from
    ``port`` to an address (any port), datagrams from that address (any port) to the
    host's mapping (the router's WAN address, ``port``: MASQUERADE keeps the port)
    reach it for two minutes: RFC 4787 "address-dependent filtering", common in
    home routers. A symmetric-NAT peer's handshake then gets through, from whatever
    port its NAT picked, once the host has sent anything to that peer's address."""
    table = f"""
table ip adf {{
    set contacted {{ type ipv4_addr; flags timeout; timeout 120s; }}
    chain forward {{
        type filter hook forward priority -10;
        iifname "{router.lan_ifname}" ip saddr {host.addr} udp sport {port} \
            update @contacted {{ ip daddr timeout 120s }}
    }}
    chain prerouting {{
        type nat hook prerouting priority -110;
        iifname "{router.wan_ifname}" udp dport {port} ip saddr @contacted \
            dnat to {host.addr}:{port}
    }}
}}
"""
    router.run(["nft", "-f", "-"], input=table)


def paths(routers: list[Router], hosts: list[Host]) -> str:
    """The routers' UDP conntrack entries and the hosts' WireGuard state, for a failure."""
    out = [r.run(["conntrack", "-L", "-p", "udp"], check=False).stdout for r in routers]
    out += [h.run(["wg", "show", h.wg_ifname], check=False).stdout for h in hosts]
    return "\n".join(out)


def start_gateway_with_relays(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, relays: list[str]
) -> Wiregate:
    """A gateway configured with ``relays`` (``ID=HOST:PORT``), probing them every second."""
    monkeypatch.setenv("WIREGATE_RELAYS", json.dumps(relays))
    monkeypatch.setenv("WIREGATE_RELAY_PROBE_INTERVAL", "1")
    wiregate = Wiregate(lab)
    wiregate.start_gateway()
    monkeypatch.delenv("WIREGATE_RELAYS")
    monkeypatch.delenv("WIREGATE_RELAY_PROBE_INTERVAL")
    return wiregate


# -- the NAT matrix: one host behind every kind of network (tests/e2e, benchmarks/paths) ----

MATRIX_KINDS = {
    "e1": "eim", "e2": "eim", "a1": "adf", "s1": "sym", "s2": "sym", "b1": "blocked",
    "t1": "tcp", "o1": "open",
}  # fmt: skip
"""Host -> network: ``eim`` endpoint-independent mapping filtered by address and port
(Linux conntrack), ``adf`` the same filtered by address only, ``sym`` symmetric
(``--random-fully``), ``blocked`` UDP dropped except to the relays, ``tcp`` all UDP
dropped, only TCP to the relays' :data:`TCP_PORT` and to the gateway let out
(:func:`tcp_only`), ``open`` no NAT."""

MATRIX_AGENT_ENV = {
    "WIREGATE_STUN_SERVERS": json.dumps(STUN),
    "WIREGATE_PATH_PROBE_TIMEOUT": "3",
    "WIREGATE_RELAY_PING_INTERVAL": "1",
    "WIREGATE_NETCHECK_INTERVAL": "15",
}
"""The settings the matrix's agents run with (set in the environment they inherit)."""

PREDICTED = "direct through hard NAT by port prediction after"

OVER_TCP = f"relayed over TCP {TCP_PORT} via relay"


def start_matrix_relays(lab: Lab) -> tuple[Wiregate, Path, dict[str, Process]]:
    """The matrix's gateway and both relays; (the gateway, the CA file agents must trust
    (``ca_file``), the relays).

    The relays serve UDP and TLS on :data:`TCP_PORT` with a certificate of a lab CA; the
    gateway hands out both addresses of each (``relays``, ``relay_tcp``) and probes the
    relays every second."""
    wiregate = Wiregate(lab)
    wiregate.gateway_env.update(
        {
            "WIREGATE_RELAYS": json.dumps(
                [f"{rid}={host}:{CONTROL_PORT}" for rid, host in RELAY_HOSTS.items()]
            ),
            "WIREGATE_RELAY_TCP": json.dumps(relay_tcp_entries()),
            "WIREGATE_RELAY_PROBE_INTERVAL": "1",
        }
    )
    wiregate.start_gateway()
    ca = LabCA.create(lab.workdir / "relay-ca")
    relays = start_relays(lab, wiregate, tcp_ca=ca)
    return wiregate, ca.ca_file, relays


def build_matrix(lab: Lab, names: Iterable[str] | None = None) -> dict[str, Host]:
    """The matrix's routers and hosts (:data:`MATRIX_KINDS`, or only ``names`` of it), every
    router a home router."""
    nat: dict[str, NatMode] = {
        "eim": "eim", "adf": "eim", "sym": "symmetric", "blocked": "eim", "tcp": "eim",
    }  # fmt: skip
    hosts: dict[str, Host] = {}
    for name in MATRIX_KINDS if names is None else names:
        kind = MATRIX_KINDS[name]
        if kind == "open":
            hosts[name] = lab.add_host(name)
            continue
        router = lab.add_router(f"r{name}", nat=nat[kind], block_udp=kind in ("blocked", "tcp"))
        drop_unsolicited(router)
        if kind == "blocked":
            allow_relays_only(router)
        if kind == "tcp":
            tcp_only(router)
        hosts[name] = lab.add_host(name, behind=router)
        if kind == "adf":
            address_dependent_filtering(router, hosts[name])
    return hosts


def best_path(a: str, b: str) -> tuple[str, str]:
    """The path ``a`` must report for peer ``b`` in the matrix, and what its reason says.

    UDP blocked (``blocked``, ``tcp``) on either side: relayed, the side named (the
    TCP-only host relayed over TCP 443); open <-> anything else: direct; EIM <-> EIM:
    direct; address-filtering EIM <-> symmetric: direct by port prediction;
    port-filtering EIM <-> symmetric: relayed (the symmetric NAT named); symmetric <->
    symmetric: relayed."""
    ours, theirs = MATRIX_KINDS[a], MATRIX_KINDS[b]
    kinds = {ours, theirs}
    if ours == "tcp":
        return "relayed", f"UDP blocked on this network: {OVER_TCP}"
    if ours == "blocked":
        return "relayed", "UDP blocked on this network"
    if theirs in ("blocked", "tcp"):
        return "relayed", "UDP blocked on the peer's network"
    if "open" in kinds:
        return "direct", "open host"
    if kinds <= {"eim", "adf"}:
        return "direct", "hole punched through NAT"
    if kinds == {"sym"}:
        return "relayed", "both sides behind symmetric NAT"
    if kinds == {"adf", "sym"}:  # the address-filtering side's prediction lets it in
        return "direct", PREDICTED if ours == "adf" else "hole punched through NAT"
    return "relayed", "symmetric NAT maps every peer anew"


def path_problem(viewer: str, peer: str, report: dict[str, Any]) -> str | None:
    """Why ``report`` (a ``wiregate status`` path) is not the pair's best path, or None.
    Only the TCP-only host's relay bindings are carried over TCP. A prediction that hit
    a random port is right too, and must say so."""
    path, reason, state = report.get("path"), report.get("reason") or "", report.get("state")
    want, why = best_path(viewer, peer)
    over_tcp = MATRIX_KINDS[viewer] == "tcp"
    lucky = path == "direct" and PREDICTED in reason and want == "relayed"
    if (path == want and why in reason and (state == "relayed_tcp") == over_tcp) or lucky:
        return None
    return f"{viewer}->{peer}: {path} [{state}] ({reason}); want {want} ({why}...)"


def peer_reports(
    wiregate: Wiregate, agents: dict[str, Agent]
) -> dict[tuple[str, str], dict[str, Any]]:
    """(viewer, peer) -> the viewer's path report for that peer (``wiregate status``)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for name, status in wiregate.statuses(list(agents.values())).items():
        for peer in status["peers"]:
            out[(name, peer["name"])] = dict(peer.get("path") or {})
    return out
