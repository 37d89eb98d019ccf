"""A real OpenID Provider in the lab, next to the gateway: single sign-on and workload tokens.

panva's oidc-provider (tests/idp/provider.mjs) runs on the loopback of the lab's
internet namespace, where the gateway runs; browsers there reach the gateway as
``http://127.0.0.1:8080`` (DNAT to its address: an http redirect URI must be
loopback), or with ``tls=True`` as ``https://127.0.0.1:8080``: the gateway serves
HTTPS with a lab CA's certificate (``Wiregate(lab, tls=True)``, lab/tls.py) and
every client (agents, ``wiregate login``, the browser) trusts that CA. Used by
``scripts/demo.py`` and the lab tests:

- :func:`enroll_by_sso`: ``wiregate login`` on a host, its code approved at the
  gateway's web pages after a sign-in at the IdP; the browser is an HTTP client
  (:func:`approve_as_browser`, run as ``python -m lab.sso [--ca-file CA] URL``
  inside the namespace);
- :func:`enroll_by_workload_token`: an agent that enrolls with a token the IdP
  minted for the gateway by ``client_credentials`` (no enrollment key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import ssl
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import aiohttp

from lab.harness import Agent, Host, Lab, Process, Wiregate, poll, write_secret

__all__ = [
    "IDP_PORT",
    "TEST_ACCOUNT",
    "approve_as_browser",
    "enroll_by_sso",
    "enroll_by_workload_token",
    "gateway_config",
    "loopback_public_url",
    "mint_workload_token",
    "start_gateway",
    "start_idp",
    "start_sso_gateway",
    "start_workload_agent",
]

IDP_SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "idp" / "provider.mjs"
IDP_PORT = 9400  # on the internet namespace's loopback, next to the gateway
IDP_CLIENT, IDP_SECRET = "wiregate", "wiregate-test-secret-basic"  # test-only (provider.mjs)
WORKLOAD_CLIENT, WORKLOAD_SECRET = "wiregate-workload", "wiregate-test-secret-workload"
TEST_ACCOUNT = "admin-demo"  # any login works at the dev IdP; "admin*" is in wiregate-admins


def start_idp(lab: Lab, public_url: str) -> tuple[str, Process]:
    """Start the dev OpenID Provider on the internet namespace's loopback; its issuer URL.

    The gateway's redirect URI and the workload audience follow ``public_url``: an
    ``https://`` public_url (a TLS gateway) gives an https redirect URI and audience."""
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


def loopback_public_url(lab: Lab, *, tls: bool = False) -> str:
    """The gateway's URL for browsers in the internet namespace: 127.0.0.1:8080, DNATed to
    the gateway's address (an http redirect URI must be loopback). ``tls``: the https URL
    of a TLS gateway, whose lab certificate names 127.0.0.1 too."""
    host, port = urlsplit(Wiregate(lab).server).netloc.split(":")
    dnat = ["-j", "DNAT", "--to-destination", f"{host}:{port}"]
    lab.internet.run(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1",
                      "--dport", port, *dnat])  # fmt: skip
    return f"{'https' if tls else 'http'}://127.0.0.1:{port}"


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


def start_sso_gateway(lab: Lab, *, tls: bool = False) -> tuple[Wiregate, str, str]:
    """The IdP and the gateway configured for it: (gateway, issuer URL, public_url).

    ``tls``: the gateway serves HTTPS with a lab CA's certificate (``wiregate.ca_file``)."""
    wiregate = Wiregate(lab, tls=tls)
    public_url = loopback_public_url(lab, tls=tls)
    issuer, _idp = start_idp(lab, public_url)
    start_gateway(wiregate, gateway_config(lab, public_url, issuer))
    return wiregate, issuer, public_url


def enroll_by_sso(lab: Lab, wiregate: Wiregate, host: Host) -> Agent:
    """``wiregate login`` on ``host``, approved at the web pages after an IdP sign-in.

    With a TLS gateway, ``wiregate login`` and the browser trust its lab CA."""
    agent = Agent(host, lab.workdir / "agents" / host.name, lab.workdir / "no-enrollment-key")
    ca = ["--ca-file", str(wiregate.ca_file)] if wiregate.ca_file is not None else []
    login = host.spawn([*wiregate.cmd, "login", "--server", wiregate.server, "--hostname",
                        host.name, "--state-dir", str(agent.state_dir), "--json", *ca],
                       name=f"login-{host.name}")  # fmt: skip
    url = poll(lambda: _verification_url(login.output()), timeout=20, what="wiregate login code")
    approve = [sys.executable, "-m", "lab.sso", *ca, url]  # the browser, in the namespace
    done = lab.internet.run(approve, check=False, timeout=60, env={**os.environ})
    if done.returncode != 0:
        raise RuntimeError(f"the SSO approval failed:\n{done.stdout}{done.stderr}")
    if login.wait(timeout=30) != 0:
        raise RuntimeError(f"wiregate login failed:\n{login.output(2000)}")
    wiregate.agents[host.name] = agent
    wiregate.start_agent(host)  # enrolled already: the key file is never read
    return agent


def mint_workload_token(lab: Lab, issuer: str, audience: str, path: Path) -> Path:
    """A client_credentials token of the IdP for ``audience``, written to ``path`` (0600)."""
    client = lab.workdir / "workload-client.curlrc"  # the client secret never in argv
    write_secret(client, f'user = "{WORKLOAD_CLIENT}:{WORKLOAD_SECRET}"')
    minted = lab.internet.run(["curl", "-sf", "-K", str(client),
                               "-d", "grant_type=client_credentials", "-d", "scope=wiregate:enroll",
                               "-d", f"resource={audience}", f"{issuer}/token"])  # fmt: skip
    write_secret(path, json.loads(minted.stdout)["access_token"])
    return path


def enroll_by_workload_token(lab: Lab, wiregate: Wiregate, host: Host, issuer: str,
                             audience: str) -> Agent:  # fmt: skip
    """The agent on ``host`` enrolls with a token the IdP minted for the gateway (trusting
    its lab CA if it serves HTTPS)."""
    token_file = mint_workload_token(lab, issuer, audience, lab.workdir / f"token-{host.name}")
    return start_workload_agent(wiregate, host, token_file)


def start_workload_agent(wiregate: Wiregate, host: Host, token_file: Path) -> Agent:
    """Start the agent on ``host`` with ``workload_token = file:token_file`` and no key
    (``--ca-file``: the lab CA of a TLS gateway)."""
    os.environ["WIREGATE_WORKLOAD_TOKEN"] = f"file:{token_file}"
    try:  # no enrollment key: the file does not exist and is never read
        no_key = wiregate.lab.workdir / "no-enrollment-key"
        return wiregate.start_agent(host, no_key, ca_file=wiregate.ca_file)
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


async def approve_as_browser(url: str, ca_file: Path | None = None) -> str:
    """Play the person's browser: sign in at the IdP as the test account, then Approve.

    ``ca_file``: a PEM CA trusted for HTTPS besides the system's (a TLS gateway's lab CA)."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for IP-address hosts
    trust = ssl.create_default_context()
    if ca_file is not None:
        trust.load_verify_locations(cafile=ca_file)
    connector = aiohttp.TCPConnector(ssl=trust)
    timeout = aiohttp.ClientTimeout(20)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout, connector=connector) as http:
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


def main(argv: list[str] | None = None) -> None:
    """``python -m lab.sso [--ca-file CA] URL``: play the browser for one approval."""
    parser = argparse.ArgumentParser(prog="python -m lab.sso", description=main.__doc__)
    parser.add_argument("--ca-file", type=Path, help="PEM CA trusted for HTTPS (a lab CA)")
    parser.add_argument("url", help="the verification URL that `wiregate login` printed")
    args = parser.parse_args(argv)
    asyncio.run(approve_as_browser(args.url, args.ca_file))


if __name__ == "__main__":
    main()
