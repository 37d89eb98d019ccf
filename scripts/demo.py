"""wiregate demo: a gateway, a local OpenID Provider, two relays and eight agents in a netns lab.

Builds the lab, starts a real OpenID Provider (panva's oidc-provider,
tests/idp/provider.mjs) on the loopback of the lab's internet namespace next to
the gateway, whose single sign-on it configures (``[[gateway.oidc]]``,
``public_url``). The gateway serves HTTPS, as in a real deployment, with a
certificate of a local CA made for the lab (lab/tls.py); every client (agents,
``wiregate login``, the browser) trusts that CA with ``--ca-file``. Two relays
(STUN and WireGuard relay, lab/nat.py) trust the gateway's ticket signer. Enrolls
three hosts with one enrollment key, and a fourth by ``wiregate login``: its
user code is approved through the gateway's web pages after signing in at the
IdP (an HTTP client plays the browser, inside the namespace); a fifth agent
enrolls with a workload token the same IdP minted for the gateway
(``client_credentials``, an RFC 9068 JWT access token) instead of a key. Two more
hosts sit each behind a home router with a symmetric NAT (lab/demo.py): they
reach the others directly, and each other only through a relay; an eighth sits
behind a firewall that drops all UDP and lets only TCP to the relays' 443 (and
the gateway) out: it reaches every peer relayed over TCP. Waits until every
agent holds the full map and every pair has settled on a path, prints a status
table (each peer's path, direct, relayed or relayed over TCP, and why, from each
agent's ``wiregate status``), a ✓/✗ matrix of pings across every tunnel (IPv4
and IPv6), the fleet's path matrix the agents report (``wiregate admin paths``;
the console's /admin/paths heatmap)
and the sign-in URL with a test account, then tears everything down. A second lab
then shows a pod-identity rule at work (lab/poddemo.py): of two pods on a cluster
node, only the one the policy's pod selector picks reaches a VM's port, and a
relabel at the Kubernetes API moves that within a second. A third lab shows names
both ways (lab/hybriddemo.py): a VM calls the cluster Service
orders.shop.svc.cluster.local by name (its agent forwards the cluster's zone over the
tunnel), and a pod calls the VM as vm-db.wg.internal (the cluster DNS forwards the
mesh domain to the node agent), and by the Service name the gateway's peer-Services
controller gives it (vm-db.wiregate-peers.svc.cluster.local). Exits non-zero if any
step or ping fails. ``--keep`` leaves the lab running until Ctrl-C.

    sudo .venv/bin/python scripts/demo.py [--keep]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import time
from types import FrameType

from lab import hybriddemo, poddemo
from lab.demo import (
    NAT_HOSTS,
    add_nat_hosts,
    agent_environment,
    status_table,
    use_relays,
    wait_paths,
)
from lab.harness import Agent, Lab, Wiregate, lab_requirements, poll
from lab.nat import start_relays
from lab.sso import (
    TEST_ACCOUNT,
    enroll_by_sso,
    enroll_by_workload_token,
    gateway_config,
    loopback_public_url,
    start_gateway,
    start_idp,
)

HOSTS = ("alpha", "bravo", "charlie")
SSO_HOST = "delta"  # enrolled by `wiregate login`, approved through the IdP
WORKLOAD_HOST = "echo"  # enrolled with a workload token the IdP minted (client_credentials)
FAMILIES = ("v4", "v6")


def ping_matrix(wiregate: Wiregate, agents: dict[str, Agent]) -> dict[tuple[str, str, str], bool]:
    """(source, destination, family) -> did a ping across the tunnel succeed (10 s to try)."""
    addresses = {name: wiregate.tunnel_addresses(agent) for name, agent in agents.items()}
    result = {}
    for src, dst in itertools.permutations(agents, 2):
        for family, addr in zip(FAMILIES, addresses[dst], strict=False):
            host = agents[src].host
            deadline = time.monotonic() + 10
            ok = False
            while not ok and time.monotonic() < deadline:
                ok = host.ping(addr, count=1, timeout=1.0)
            result[(src, dst, family)] = ok
    return result


def matrix_text(names: list[str], matrix: dict[tuple[str, str, str], bool]) -> str:
    width = max(len(n) for n in names) + 2
    corner = "from \\ to"
    lines = [f"{corner:<{width}}" + "".join(f"{n:^{width + 4}}" for n in names)]
    for src in names:
        cells = []
        for dst in names:
            if src == dst:
                cells.append(f"{'·':^{width + 4}}")
                continue
            marks = " ".join(
                f"{fam}{'✓' if matrix.get((src, dst, fam)) else '✗'}" for fam in FAMILIES
            )
            cells.append(f"{marks:^{width + 4}}")
        lines.append(f"{src:<{width}}" + "".join(cells))
    return "\n".join(lines)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def demo(keep: bool) -> int:
    with Lab() as lab:
        try:
            names = ", ".join((*HOSTS, SSO_HOST, WORKLOAD_HOST))
            behind = ", ".join(f"{h} (behind a {kind})" for h, (_, kind) in NAT_HOSTS.items())
            print(f"lab {lab.prefix}: internet 198.51.100.0/24, hosts {names}, {behind}")
            hosts = [lab.add_host(name) for name in HOSTS]
            wiregate = Wiregate(lab, tls=True)
            use_relays(wiregate)
            public_url = loopback_public_url(lab, tls=True)
            issuer, _idp = start_idp(lab, public_url)
            print(f"OpenID Provider (panva oidc-provider) ready at {issuer}")
            start_gateway(wiregate, gateway_config(lab, public_url, issuer))
            print(f"gateway ready on {wiregate.server} over TLS, public_url {public_url}"
                  f" (admin socket {wiregate.admin_socket})")  # fmt: skip
            print(f"agents, `wiregate login` and the browser trust the lab CA {wiregate.ca_file}")
            relays = start_relays(lab, wiregate, tcp_ca=wiregate.ca)
            print(f"relays {', '.join(relays)} ready: STUN, WireGuard relay over UDP and over"
                  " TLS on 443, admitting gateway-signed tickets")  # fmt: skip
            os.environ.update(agent_environment())  # every agent measures its NAT
            key = wiregate.create_key(tags="tag:demo", expiry="1h", reusable=True)
            agents = {h.name: wiregate.start_agent(h, key) for h in hosts}
            agents[SSO_HOST] = enroll_by_sso(lab, wiregate, lab.add_host(SSO_HOST))
            [owner] = [d["identity"] for d in wiregate.devices() if d["name"] == SSO_HOST]
            print(f"{SSO_HOST}: `wiregate login` approved at the web pages after signing in at"
                  f" the IdP; owner {owner['issuer']} subject {owner['subject']}")  # fmt: skip
            agents[WORKLOAD_HOST] = enroll_by_workload_token(
                lab, wiregate, lab.add_host(WORKLOAD_HOST), issuer, public_url
            )
            for name, host in add_nat_hosts(lab).items():
                agents[name] = wiregate.start_agent(host, key)
            wiregate.wait_mesh(list(agents.values()), timeout=90)
            [tags] = [d["tags"] for d in wiregate.devices() if d["name"] == WORKLOAD_HOST]
            print(f"{WORKLOAD_HOST}: enrolled with a workload token from the IdP (client_"
                  f"credentials, audience {public_url}); tags {', '.join(tags)}")  # fmt: skip
            print("every agent holds the full map")
            _, unsettled = wait_paths(wiregate, list(agents.values()), timeout=90)
            searching = "".join(f"\n  {pair}" for pair in unsettled)
            print(f"pairs still searching for a path:{searching}\n" if unsettled
                  else "every pair on a path\n")  # fmt: skip
            matrix = ping_matrix(wiregate, agents)
            statuses = wiregate.statuses(list(agents.values()))  # after the pings: handshakes
            print(status_table(statuses), end="\n\n")
            print(matrix_text(list(agents), matrix), end="\n\n")
            print(fleet_paths(wiregate, len(agents)), end="\n\n")
        except Exception as exc:
            print(f"demo failed: {exc}\n\n{lab.logs()}", file=sys.stderr)
            return 1
        ok = all(matrix.values())
        print("all tunnels up" if ok else "SOME TUNNELS FAILED")
        ok = pod_identity() and ok
        ok = hybrid_names() and ok
        print(
            f"\nsingle sign-on: {public_url}/devices (inside the lab's internet namespace:"
            f" ip netns exec {lab.internet.netns} ...; trust the CA {wiregate.ca_file})\n"
            f"  IdP {issuer}, test account: any login, e.g. {TEST_ACCOUNT} (any password;"
            " admin* logins may use /admin)"
        )
        if keep:
            _wait_for_interrupt(lab, wiregate, agents)
        return 0 if ok else 1


def fleet_paths(wiregate: Wiregate, devices: int) -> str:
    """``wiregate admin paths``, the fleet's path matrix the agents report (the console's
    /admin/paths draws it as a heatmap), once every agent has reported."""

    def reported() -> str | None:
        doc = json.loads(wiregate.admin("paths", "--json").stdout)
        reporters = {p["reporter"]["id"] for p in doc["paths"]}
        return wiregate.admin("paths").stdout if len(reporters) == devices else None

    return poll(reported, timeout=30, what="every agent's path report").rstrip()


def pod_identity() -> bool:
    """A second lab: a pod-identity rule at work (lab/poddemo.py); True if it held."""
    print("\npod identity: a cluster node with pods ledger and web (namespace payments), a VM")
    with Lab() as lab:
        try:
            pl = poddemo.build(lab)
            print("policy: only pods of namespace payments labelled app=ledger open the VM's"
                  f" tcp:{poddemo.PORT}")  # fmt: skip
            poddemo.start_probers(pl)
            poddemo.settled(pl.probers["ledger"], "ok", time.monotonic(), timeout=30)
            print(f"  ledger (app=ledger) -> VM:{poddemo.PORT}: ✓ let in")
            since = time.monotonic()
            time.sleep(0.6)
            web_in = any(v == "ok" for v, _ in poddemo.attempts(pl.probers["web"], since))
            drops = poddemo.dropped(pl.vm_host)
            print(
                f"  web (app=web) -> VM:{poddemo.PORT}: "
                f"{'✗ let in' if web_in else '✓ dropped at the VM'} ({drops} drops counted)"
            )
            took_in = poddemo.relabel(pl, "web", {"app": "ledger"}, "ok")
            print(f"  relabel web to app=ledger at the API: let in at the VM {took_in:.2f} s later")
            took_out = poddemo.relabel(pl, "ledger", {"app": "archive"}, "no")
            print(f"  relabel ledger to app=archive: dropped at the VM {took_out:.2f} s later")
        except Exception as exc:
            print(f"pod identity demo failed: {exc}\n\n{lab.logs()}", file=sys.stderr)
            return False
    held = not web_in and max(took_in, took_out) < 1.0
    print("pod identity enforced" if held else "POD IDENTITY NOT ENFORCED AS WRITTEN")
    return held


def hybrid_names() -> bool:
    """A third lab: a VM calls a cluster Service by name, a pod calls the VM by name
    (lab/hybriddemo.py); True if both exchanges completed."""
    print("\nnames both ways: a cluster node with pods orders and client (namespace shop),"
          f" a VM named {hybriddemo.VM_NAME}")  # fmt: skip
    orders, vm_name = hybriddemo.ORDERS, f"{hybriddemo.VM_NAME}.{hybriddemo.MESH_DOMAIN}"
    peer_service, port = hybriddemo.PEER_SERVICE, hybriddemo.PORT
    with Lab() as lab:
        try:
            with hybriddemo.hybrid(lab) as hl:
                exchanges = [
                    ("VM", orders.fqdn, orders.port, "its agent, over the tunnel",
                     hybriddemo.calls(hl.vm_host, orders.fqdn, orders.port)),
                    ("pod", vm_name, port, "the cluster DNS, stub domain",
                     hybriddemo.calls(hl.client, vm_name, port)),
                    ("pod", peer_service, port, "the cluster DNS, peer Service",
                     hybriddemo.calls(hl.client, peer_service, port)),
                ]  # fmt: skip
        except Exception as exc:
            print(f"names demo failed: {exc}\n\n{lab.logs()}", file=sys.stderr)
            return False
    for who, name, port, via, (addr, reply) in exchanges:
        mark = "✓" if reply == "hello" else "✗"
        print(f"  {mark} {who} -> {name}:{port}, resolved by {via}: {addr}, said {reply!r}")
    ok = all(reply == "hello" for *_, (_, reply) in exchanges)
    print("names resolve both ways" if ok else "NAMES DID NOT RESOLVE BOTH WAYS")
    return ok


def _wait_for_interrupt(lab: Lab, wiregate: Wiregate, agents: dict[str, Agent]) -> None:
    first = next(iter(agents.values()))
    cli = " ".join(wiregate.cmd)
    print(
        f"\nlab kept running; try:\n"
        f"  ip netns exec {first.host.netns} {cli} status --run-dir {first.run_dir}\n"
        f"  ip netns exec {first.host.netns} wg show {first.iface}\n"
        f"logs in {lab.workdir}\nCtrl-C tears it down."
    )
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print("\ntearing down")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="wiregate in a network-namespace lab")
    parser.add_argument("--keep", action="store_true", help="leave the lab up until Ctrl-C")
    args = parser.parse_args(argv)
    if reason := lab_requirements():
        print(f"cannot run the demo: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)  # teardown on kill, too
    try:
        return demo(args.keep)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
