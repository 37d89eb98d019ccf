"""wiregate demo: a gateway, a local OpenID Provider and five agents in a netns lab.

Builds the lab, starts a real OpenID Provider (panva's oidc-provider,
tests/idp/provider.mjs) on the loopback of the lab's internet namespace next to
the gateway, whose single sign-on it configures (``[[gateway.oidc]]``,
``public_url``). Enrolls three hosts with one enrollment key, and a fourth by
``wiregate login``: its user code is approved through the gateway's web pages
after signing in at the IdP (an HTTP client plays the browser, inside the
namespace); a fifth agent enrolls with a workload token the same IdP minted
for the gateway (``client_credentials``, an RFC 9068 JWT access token) instead
of a key. Waits until every agent holds the full map, prints a status table,
a ✓/✗ matrix of pings across every tunnel (IPv4 and IPv6) and the sign-in URL
with a test account, then tears everything down. Exits non-zero if any step or
ping fails. ``--keep`` leaves the lab running until Ctrl-C.

    sudo .venv/bin/python scripts/demo.py [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from tests.lab.harness import (
    Agent,
    Host,
    Lab,
    Process,
    Wiregate,
    bare,
    lab_requirements,
    poll,
    write_secret,
)

HOSTS = ("alpha", "bravo", "charlie")
SSO_HOST = "delta"  # enrolled by `wiregate login`, approved through the IdP
WORKLOAD_HOST = "echo"  # enrolled with a workload token the IdP minted (client_credentials)
WORKLOAD_CLIENT, WORKLOAD_SECRET = "wiregate-workload", "wiregate-test-secret-workload"
FAMILIES = ("v4", "v6")
REPO = Path(__file__).resolve().parents[1]
IDP_SCRIPT = REPO / "tests" / "idp" / "provider.mjs"
IDP_PORT = 9400  # on the internet namespace's loopback, next to the gateway
IDP_CLIENT, IDP_SECRET = "wiregate", "wiregate-test-secret-basic"  # test-only (provider.mjs)
TEST_ACCOUNT = "admin-demo"  # any login works at the dev IdP; "admin*" is in wiregate-admins


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _age(timestamp: float | None, now: float) -> str:
    return f"{now - timestamp:.0f}s ago" if timestamp else "never"


def status_table(statuses: dict[str, dict[str, Any]]) -> str:
    """One block per device: its addresses, then one line per peer."""
    now = time.time()
    header = (
        f"{'DEVICE':<9} {'TUNNEL ADDRESSES':<34} {'PEER':<9} "
        f"{'HANDSHAKE':>10} {'RX':>10} {'TX':>10}"
    )
    lines = [header, "-" * len(header)]
    for name, st in statuses.items():
        addrs = " ".join(bare(a) for a in st["device"]["addresses"])
        state = "connected" if st["gateway"]["connected"] else "DISCONNECTED"
        lines.append(
            f"{name:<9} {addrs:<34} (gateway {state}, map v{st['gateway']['map_version']})"
        )
        for peer in st["peers"]:
            lines.append(
                f"{'':<9} {'':<34} {peer['name']:<9} {_age(peer['last_handshake'], now):>10} "
                f"{_size(peer['rx_bytes']):>10} {_size(peer['tx_bytes']):>10}"
            )
    return "\n".join(lines)


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


# -- the local OpenID Provider and single sign-on -----------------------------------------


def start_idp(lab: Lab, public_url: str) -> tuple[str, Process]:
    """Start the dev OpenID Provider on the internet namespace's loopback; its issuer URL."""
    node = shutil.which("node")
    if node is None or not (IDP_SCRIPT.parent / "node_modules" / "oidc-provider").is_dir():
        raise RuntimeError("node and tests/idp/node_modules are needed: run scripts/setup.sh")
    issuer = f"http://127.0.0.1:{IDP_PORT}"
    env = {"WIREGATE_IDP_REDIRECT_URIS": f"{public_url}/oidc/callback",
           "WIREGATE_IDP_WORKLOAD_AUDIENCE": public_url}  # fmt: skip
    proc = lab.internet.spawn([node, str(IDP_SCRIPT), str(IDP_PORT)], env=env, name="idp")
    url = f"{issuer}/.well-known/openid-configuration"

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"the OpenID Provider exited:\n{proc.output(2000)}")
        probe = lab.internet.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                  "-m", "2", url], check=False, timeout=10)  # fmt: skip
        return probe.stdout.strip() == "200"

    poll(up, timeout=30, what="OpenID Provider discovery")
    return issuer, proc


def loopback_public_url(lab: Lab) -> str:
    """The gateway's URL for browsers in the internet namespace: 127.0.0.1:8080, DNATed to
    the gateway's address (an http redirect URI must be loopback; https needs a CA)."""
    host, port = urlsplit(Wiregate(lab).server).netloc.split(":")
    dnat = ["-j", "DNAT", "--to-destination", f"{host}:{port}"]
    lab.internet.run(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1",
                      "--dport", port, *dnat])  # fmt: skip
    return f"http://127.0.0.1:{port}"


def gateway_config(lab: Lab, public_url: str, issuer: str) -> Path:
    """A [gateway] table: SSO at the local IdP (the client secret in a 0600 file)."""
    secret = lab.workdir / "oidc-demo.secret"
    write_secret(secret, IDP_SECRET)
    path = lab.workdir / "gateway.toml"
    path.write_text(
        f'[gateway]\npublic_url = "{public_url}"\nadmin_groups = ["wiregate-admins"]\n\n'
        f'[[gateway.oidc]]\nname = "demo-idp"\nissuer = "{issuer}"\n'
        f'client_id = "{IDP_CLIENT}"\nclient_secret = "file:{secret}"\n'
        'scopes = ["openid", "email", "profile", "groups"]\ninsecure_http = true\n\n'
        f'[[gateway.workload_issuers]]\nname = "demo-idp"\nissuer = "{issuer}"\n'
        'tags = ["tag:workload"]\ninsecure_http = true\n'  # audience: public_url
    )
    return path


def start_gateway(wiregate: Wiregate, config: Path) -> None:
    """Start the lab's gateway with ``config`` (passed as WIREGATE_CONFIG to it only)."""
    os.environ["WIREGATE_CONFIG"] = str(config)
    try:
        wiregate.start_gateway()
    finally:
        del os.environ["WIREGATE_CONFIG"]


def enroll_by_sso(lab: Lab, wiregate: Wiregate, host: Host) -> Agent:
    """``wiregate login`` on ``host``, approved at the web pages after an IdP sign-in."""
    agent = Agent(host, lab.workdir / "agents" / host.name, lab.workdir / "no-enrollment-key")
    login = host.spawn([*wiregate.cmd, "login", "--server", wiregate.server, "--hostname",
                        host.name, "--state-dir", str(agent.state_dir), "--json"],
                       name=f"login-{host.name}")  # fmt: skip
    url = poll(lambda: _verification_url(login.output()), timeout=20, what="wiregate login code")
    approve = [sys.executable, str(Path(__file__).resolve()), "--approve", url]
    done = lab.internet.run(approve, check=False, timeout=60, env={**os.environ})
    if done.returncode != 0:
        raise RuntimeError(f"the SSO approval failed:\n{done.stdout}{done.stderr}")
    if login.wait(timeout=30) != 0:
        raise RuntimeError(f"wiregate login failed:\n{login.output(2000)}")
    wiregate.agents[host.name] = agent
    wiregate.start_agent(host)  # enrolled already: the key file is never read
    return agent


def enroll_by_workload_token(lab: Lab, wiregate: Wiregate, host: Host, issuer: str,
                             audience: str) -> Agent:  # fmt: skip
    """The agent on ``host`` enrolls with a token the IdP minted for the gateway."""
    client = lab.workdir / "workload-client.curlrc"  # the client secret never in argv
    write_secret(client, f'user = "{WORKLOAD_CLIENT}:{WORKLOAD_SECRET}"')
    minted = lab.internet.run(["curl", "-sf", "-K", str(client),
                               "-d", "grant_type=client_credentials", "-d", "scope=wiregate:enroll",
                               "-d", f"resource={audience}", f"{issuer}/token"])  # fmt: skip
    token_file = lab.workdir / f"workload-token-{host.name}"
    write_secret(token_file, json.loads(minted.stdout)["access_token"])
    os.environ["WIREGATE_WORKLOAD_TOKEN"] = f"file:{token_file}"
    try:  # no enrollment key: the file does not exist and is never read
        return wiregate.start_agent(host, lab.workdir / "no-enrollment-key")
    finally:
        del os.environ["WIREGATE_WORKLOAD_TOKEN"]


def _verification_url(output: str) -> str | None:
    found = re.search(r"^\s+(http\S+)\s*$.*?enter the code:\s+(\S+)", output, re.M | re.S)
    return None if found is None else f"{found[1]}?code={found[2]}"


class _Forms(HTMLParser):
    """The forms of a page: (method, action, fields)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("method", "get").upper(), a.get("action", ""), {}))
        elif tag == "input" and self.forms and a.get("name"):
            value = {"text": TEST_ACCOUNT, "password": "any"}.get(a.get("type", "text"))
            self.forms[-1][2][a["name"]] = a.get("value", "") if value is None else value


async def approve_as_browser(url: str) -> str:
    """Play the person's browser: sign in at the IdP as the test account, then Approve."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for IP-address hosts
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=aiohttp.ClientTimeout(20)) as http:
        method, data, approved = "GET", None, False
        for _ in range(25):
            parts = urlsplit(url)
            origin = {"Origin": f"{parts.scheme}://{parts.netloc}"} if method == "POST" else {}
            async with http.request(method, url, data=data, headers=origin,
                                    allow_redirects=False) as resp:  # fmt: skip
                body, location = await resp.text(), resp.headers.get("Location")
            if location is not None:
                url, method, data = urljoin(url, location), "GET", None
                continue
            if resp.status != 200:
                raise RuntimeError(f"{url}: HTTP {resp.status}")
            if approved:
                return body
            page = _Forms()
            page.feed(body)
            forms = [f for f in page.forms if f[1] not in ("/logout", "/login/deny")]
            if not forms:
                raise RuntimeError(f"{url}: no form to submit")
            method, action, data = forms[0]
            approved = action == "/login/approve"
            url = urljoin(url, action)
    raise RuntimeError("the sign-in did not finish in 25 steps")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def demo(keep: bool) -> int:
    with Lab() as lab:
        try:
            names = ", ".join((*HOSTS, SSO_HOST, WORKLOAD_HOST))
            print(f"lab {lab.prefix}: internet 198.51.100.0/24, hosts {names}")
            hosts = [lab.add_host(name) for name in HOSTS]
            wiregate = Wiregate(lab)
            public_url = loopback_public_url(lab)
            issuer, _idp = start_idp(lab, public_url)
            print(f"OpenID Provider (panva oidc-provider) ready at {issuer}")
            start_gateway(wiregate, gateway_config(lab, public_url, issuer))
            print(f"gateway ready on {wiregate.server} (admin socket {wiregate.admin_socket})")
            key = wiregate.create_key(tags="tag:demo", expiry="1h", reusable=True)
            agents = {h.name: wiregate.start_agent(h, key) for h in hosts}
            agents[SSO_HOST] = enroll_by_sso(lab, wiregate, lab.add_host(SSO_HOST))
            [owner] = [d["identity"] for d in wiregate.devices() if d["name"] == SSO_HOST]
            print(f"{SSO_HOST}: `wiregate login` approved at the web pages after signing in at"
                  f" the IdP; owner {owner['issuer']} subject {owner['subject']}")  # fmt: skip
            agents[WORKLOAD_HOST] = enroll_by_workload_token(
                lab, wiregate, lab.add_host(WORKLOAD_HOST), issuer, public_url
            )
            wiregate.wait_mesh(list(agents.values()), timeout=90)
            [tags] = [d["tags"] for d in wiregate.devices() if d["name"] == WORKLOAD_HOST]
            print(f"{WORKLOAD_HOST}: enrolled with a workload token from the IdP (client_"
                  f"credentials, audience {public_url}); tags {', '.join(tags)}")  # fmt: skip
            print("every agent holds the full map\n")
            matrix = ping_matrix(wiregate, agents)
            statuses = {name: wiregate.status(agent) for name, agent in agents.items()}
            print(status_table(statuses), end="\n\n")
            print(matrix_text(list(agents), matrix), end="\n\n")
        except Exception as exc:
            print(f"demo failed: {exc}\n\n{lab.logs()}", file=sys.stderr)
            return 1
        ok = all(matrix.values())
        print("all tunnels up" if ok else "SOME TUNNELS FAILED")
        print(
            f"\nsingle sign-on: {public_url}/devices (inside the lab's internet namespace:"
            f" ip netns exec {lab.internet.netns} ...)\n"
            f"  IdP {issuer}, test account: any login, e.g. {TEST_ACCOUNT} (any password;"
            " admin* logins may use /admin)"
        )
        if keep:
            _wait_for_interrupt(lab, wiregate, agents)
        return 0 if ok else 1


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
    parser.add_argument("--approve", metavar="URL", help=argparse.SUPPRESS)  # the browser part
    args = parser.parse_args(argv)
    if args.approve:
        asyncio.run(approve_as_browser(args.approve))
        return 0
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
