"""Relays in the lab's internet namespace, and the home-router firewall rules around them."""

from __future__ import annotations

import itertools
import json

import pytest

from lab.harness import INTERNET_GATEWAY, Host, Lab, Process, Router, Wiregate, poll

RELAY_HOSTS = {"r1": INTERNET_GATEWAY, "r2": "198.51.100.253"}


RELAY_PORTS = {"r1": (40000, 40063), "r2": (41000, 41063)}


STUN_SECOND = "198.51.100.254"


STUN = [f"{INTERNET_GATEWAY}:3478", f"{STUN_SECOND}:3479"]


CONTROL_PORT = 3480


def start_relays(lab: Lab, wiregate: Wiregate) -> dict[str, Process]:
    """Both relays in the internet namespace, trusting the gateway's ticket signer."""
    for addr in (RELAY_HOSTS["r2"], STUN_SECOND):
        lab.internet.run(["ip", "addr", "add", f"{addr}/24", "dev", "br0"])
    signers = lab.internet.run(
        ["curl", "-sf", "-m", "5", f"{wiregate.server}/api/v1/relay/signers"], timeout=10
    ).stdout
    keys = lab.workdir / "relay-signers.json"
    keys.write_text(signers)
    relays: dict[str, Process] = {}
    for index, (rid, host) in enumerate(RELAY_HOSTS.items()):
        first, last = RELAY_PORTS[rid]
        stun = STUN if rid == "r1" else [f"{host}:3478"]
        relays[rid] = lab.internet.spawn(
            [*wiregate.cmd, "relay", *itertools.chain(*(("--stun-listen", s) for s in stun)),
             "--relay-id", rid, "--relay-listen", f"{host}:{CONTROL_PORT}",
             "--relay-ports", f"{first}-{last}", "--verify-keys-file", str(keys),
             "--metrics-listen", f"127.0.0.1:{9191 + index}", "--log-format", "json"],
            name=f"relay-{rid}",
        )  # fmt: skip
    for rid, proc in relays.items():
        poll(lambda p=proc: "relay listening" in p.output(), timeout=20, what=f"relay {rid}")
    return relays


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
