"""End to end: every device is NAME.wg.internal, answered by its agent, as the policy allows.

Three agents (real ``wiregate agent`` processes with wireguard-go or the kernel
module) tagged ``tag:a``, ``tag:b`` and ``tag:c`` under the policy of
``test_policy_filter.py`` (A reaches B on tcp:5432 and ICMP, C reaches B, C and A
never peer). Each host namespace has its own /etc/resolv.conf (/etc/netns/NAME,
mounted by ``ip netns exec``) pointing at a real ``dnsmasq`` upstream; each agent
takes that file over (its ``auto`` resolver mode) and gives it back when it stops.
A second ``dnsmasq`` serves the split-DNS zone ``corp.lab`` the gateway hands out.
Names are resolved through glibc (``getaddrinfo``) and asked of the agents with
dnspython, from inside the namespaces.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.harness import INTERNET_GATEWAY, Host, Lab, Wiregate, bare, poll
from lab.tcp_listener import LISTENER

pytestmark = [pytest.mark.lab, pytest.mark.timeout(400)]

POLICY = """\
acls:
  - {src: ["tag:a"], dst: ["tag:b"], ports: ["tcp:5432", "icmp"]}
  - {src: ["tag:c"], dst: ["tag:b"]}
"""
UPSTREAM = INTERNET_GATEWAY  # the hosts' own resolver: a dnsmasq knowing upstream.lab
ZONE_SERVER = "198.51.100.53"  # the corp.lab zone's nameserver: another dnsmasq
ORIGINAL = f"search lab\nnameserver {UPSTREAM}\n"

# getaddrinfo through glibc and the namespace's /etc/resolv.conf: the addresses or the error.
RESOLVE = """\
import socket, sys
try:
    infos = socket.getaddrinfo(sys.argv[1], None, type=socket.SOCK_STREAM)
    print(" ".join(sorted({i[4][0] for i in infos})))
except socket.gaierror as exc:
    print("error", exc.errno)
"""

# One query with dnspython to the agent: a JSON line of rcode, answers, authority.
ASK = """\
import json, sys
import dns.message, dns.query, dns.rcode
server, name, rdtype, tcp = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "tcp"
q = dns.message.make_query(name, rdtype)
try:
    r = (dns.query.tcp if tcp else dns.query.udp)(q, server, timeout=2)
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__}))
    raise SystemExit
print(json.dumps({"rcode": dns.rcode.to_text(r.rcode()), "aa": bool(r.flags & 0x400),
                  "answer": [[x.ttl, x.to_text().split()] for x in r.answer],
                  "authority": [[x.ttl, x.to_text().split()] for x in r.authority]}))
"""

# Asks OLD and NEW names every 20 ms; prints "time old-rcode new-rcode" at each change.
WATCH = """\
import sys, time
import dns.message, dns.query, dns.rcode
server, old, new = sys.argv[1:4]
last = None
print("watching", flush=True)
end = time.time() + 60
while time.time() < end:
    state = []
    for name in (old, new):
        try:
            r = dns.query.udp(dns.message.make_query(name, "A"), server, timeout=0.5)
            state.append(dns.rcode.to_text(r.rcode()) + ("+" if r.answer else ""))
        except Exception:
            state.append("timeout")
    if state != last:
        print(f"{time.time():.3f}", *state, flush=True)
        last = state
    time.sleep(0.02)
"""

CONNECT = """\
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
        print("open", s.getpeername()[0], s.recv(16).decode())
except OSError as exc:
    print("failed", type(exc).__name__)
"""


def resolve(host: Host, name: str) -> str:
    return host.run([sys.executable, "-c", RESOLVE, name], timeout=20).stdout.strip()


def ask(host: Host, server: str, name: str, rdtype: str = "A", tcp: bool = False) -> Any:
    cmd = [sys.executable, "-c", ASK, server, name, rdtype, "tcp" if tcp else "udp"]
    return json.loads(host.run(cmd, timeout=20).stdout)


def answers(doc: dict[str, Any]) -> set[str]:
    return {words[-1] for _, words in doc.get("answer", [])}


@pytest.fixture
def own_resolv_confs(lab: Lab) -> Iterator[dict[str, Path]]:
    """/etc/netns/NETNS/resolv.conf for the hosts a, b and c (removed afterwards)."""
    files: dict[str, Path] = {}
    try:
        for name in ("a", "b", "c"):
            host = lab.add_host(name)
            path = Path("/etc/netns") / host.netns / "resolv.conf"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(ORIGINAL)
            files[name] = path
        yield files
    finally:
        for path in files.values():
            shutil.rmtree(path.parent, ignore_errors=True)


def start_dnsmasq(lab: Lab, address: str, record: str) -> None:
    if address != INTERNET_GATEWAY:
        lab.internet.run(["ip", "addr", "add", f"{address}/24", "dev", "br0"])
    proc = lab.internet.spawn(
        ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
         "--bind-interfaces", f"--listen-address={address}", "--port=53", "--user=root",
         "--pid-file", "--log-facility=-", f"--host-record={record}"],
        name=f"dnsmasq-{address}",
    )  # fmt: skip
    poll(lambda: "started, version" in proc.output(), timeout=20, what="dnsmasq")


def test_names_resolve_as_the_policy_allows_and_follow_a_rename(
    lab: Lab, own_resolv_confs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    monkeypatch.setenv("WIREGATE_POLICY_FILE", str(policy))
    monkeypatch.setenv("WIREGATE_DNS_ZONES", json.dumps({"corp.lab": [ZONE_SERVER]}))
    start_dnsmasq(lab, UPSTREAM, "upstream.lab,192.0.2.80")
    start_dnsmasq(lab, ZONE_SERVER, "db.corp.lab,192.0.2.81")
    wiregate = Wiregate(lab)
    wiregate.start_gateway()
    hosts = lab.hosts
    agents = {name: wiregate.start_agent(host, wiregate.create_key(tags=f"tag:{name}"))
              for name, host in hosts.items()}  # fmt: skip
    want = {"a": {"b"}, "b": {"a", "c"}, "c": {"b"}}

    def settled() -> dict[str, dict[str, Any]] | None:
        statuses = wiregate.statuses(list(agents.values()))
        names = {st["device"].get("id"): n for n, st in statuses.items()}
        for name, st in statuses.items():
            peers = {names.get(p["id"]) for p in st["peers"]}
            dns = st.get("dns") or {}
            if peers != want[name] or dns.get("host_resolver") != "resolv.conf":
                return None
        return statuses

    statuses = poll(settled, timeout=90, interval=0.5, what="peers and names on every agent")
    addr = {n: [bare(x) for x in st["device"]["addresses"]] for n, st in statuses.items()}
    a, b, c = hosts["a"], hosts["b"], hosts["c"]
    for name, path in own_resolv_confs.items():
        text = path.read_text()
        assert text.startswith("# wiregate"), text
        assert text.split("nameserver ")[1].strip() == addr[name][0]  # the agent first
        assert f"nameserver {UPSTREAM}" in text and "search lab" in text
        assert statuses[name]["dns"]["listen"] == [f"{addr[name][0]}:53", f"[{addr[name][1]}]:53"]

    # Through glibc: a peer's name gives both its tunnel addresses; the rest goes upstream.
    assert resolve(a, "b.wg.internal") == " ".join(sorted(addr["b"]))
    assert resolve(c, "B.WG.Internal") == " ".join(sorted(addr["b"]))
    assert resolve(b, "c.wg.internal") == " ".join(sorted(addr["c"]))
    assert resolve(a, "a.wg.internal") == " ".join(sorted(addr["a"]))  # itself
    assert resolve(a, "upstream.lab") == "192.0.2.80"  # forwarded to the host's resolver
    assert resolve(a, "upstream") == "192.0.2.80"  # the original search list is kept
    assert resolve(a, "db.corp.lab") == "192.0.2.81"  # the split zone's own nameserver

    # Only what the policy lets a device peer with has a name: A and C never peer.
    assert resolve(a, "c.wg.internal").startswith("error")
    assert resolve(c, "a.wg.internal").startswith("error")
    nx = ask(c, addr["c"][0], "a.wg.internal")
    assert nx["rcode"] == "NXDOMAIN" and nx["aa"] and not nx["answer"]
    [[ttl, soa]] = nx["authority"]
    assert soa[:4] == ["wg.internal.", "10", "IN", "SOA"] and soa[-1] == "10" and ttl == 10
    aaaa = ask(a, addr["a"][0], "b.wg.internal", "AAAA", tcp=True)  # over TCP too
    assert answers(aaaa) == {addr["b"][1]} and aaaa["answer"][0][0] == 10
    ptr = ask(a, addr["a"][0], ".".join(reversed(addr["b"][0].split("."))) + ".in-addr.arpa",
              "PTR")  # fmt: skip
    assert answers(ptr) == {"b.wg.internal."}

    # A peer's DNS server does not answer others: C reaches B, but B's server is B's own.
    assert ask(c, addr["b"][0], "b.wg.internal") == {"error": "Timeout"}

    # A TCP exchange by name, over the tunnel.
    listener = b.spawn([sys.executable, "-c", LISTENER, "5432"], name="listener-b")
    poll(lambda: "listening" in listener.output(), timeout=15, what="the listener on b")

    def connected() -> str | None:
        out = a.run([sys.executable, "-c", CONNECT, "b.wg.internal", "5432"], timeout=20).stdout
        return out.strip() if out.startswith("open") else None

    said = poll(connected, timeout=30, interval=1.0, what="a TCP exchange with b.wg.internal")
    assert said.split()[1] in addr["b"] and said.endswith("hello")

    # A rename: the new name resolves within a second, the old one no longer does.
    watch = a.spawn([sys.executable, "-c", WATCH, addr["a"][0], "b.wg.internal",
                     "db-main.wg.internal"], name="watch-a")  # fmt: skip
    poll(lambda: "NOERROR+ NXDOMAIN" in watch.output(), timeout=15, what="the watcher")
    b_id = statuses["b"]["device"]["id"]
    renamed_at = time.time()  # before the request: what follows bounds the delay from above
    patch = subprocess.run(
        ["curl", "-sS", "-f", "--unix-socket", str(wiregate.admin_socket), "-X", "PATCH",
         "-H", "Content-Type: application/json", "--data", '{"name": "db-main"}',
         f"http://gateway/api/v1/devices/{b_id}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert patch.returncode == 0, patch.stderr
    assert json.loads(patch.stdout)["device"]["name"] == "db-main"

    def switched() -> float | None:
        for line in watch.output().splitlines():
            words = line.split()
            if words[1:] == ["NXDOMAIN", "NOERROR+"]:
                return float(words[0])
        return None

    seen_at = poll(switched, timeout=15, interval=0.05, what="the rename in a's answers")
    assert seen_at - renamed_at < 1.0, watch.output()
    assert resolve(a, "db-main.wg.internal") == " ".join(sorted(addr["b"]))
    assert resolve(a, "b.wg.internal").startswith("error")
    watch.stop()

    # A stopped agent gives the host's resolver back as it was.
    assert agents["a"].proc is not None
    agents["a"].proc.stop(timeout=15)
    assert own_resolv_confs["a"].read_text() == ORIGINAL
    assert resolve(a, "upstream.lab") == "192.0.2.80"
