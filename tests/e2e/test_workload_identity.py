"""End to end: VMs enroll with workload tokens of a real OpenID Provider, no enrollment key.

panva's oidc-provider runs next to the gateway in the lab's internet namespace and
mints RFC 9068 tokens for the gateway (``client_credentials``); the real agents
on lab hosts enroll with them (``WIREGATE_WORKLOAD_TOKEN=file:PATH``) and ping
each other through their tunnels.
"""

from __future__ import annotations

import pytest

from lab.harness import Lab, bare, poll
from lab.ping import ping_until
from lab.sso import (
    enroll_by_workload_token,
    mint_workload_token,
    start_sso_gateway,
    start_workload_agent,
)

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]


def test_vms_enroll_with_workload_tokens_and_reach_each_other(lab: Lab) -> None:
    wiregate, issuer, public_url = start_sso_gateway(lab)
    hosts = [lab.add_host("a"), lab.add_host("b")]
    agents = [enroll_by_workload_token(lab, wiregate, h, issuer, public_url) for h in hosts]
    statuses = wiregate.wait_mesh(agents, timeout=90)
    devices = {d["name"]: d for d in wiregate.devices()}
    for name in ("a", "b"):  # one identity (the workload client), two devices by name
        assert devices[name]["identity"] == {"issuer": issuer, "subject": "wiregate-workload"}
        assert devices[name]["tags"] == ["tag:workload"]
    for host, dst in ((hosts[0], "b"), (hosts[1], "a")):
        for address in (bare(a) for a in statuses[dst]["device"]["addresses"]):
            assert ping_until(host, address), f"{host.name} -> {dst} {address}"
    for agent in agents:
        token = (lab.workdir / f"token-{agent.host.name}").read_text().strip()
        assert agent.proc is not None and token.split(".")[2] not in agent.proc.output()
        gateway_log = wiregate.gateway.output() if wiregate.gateway else ""
        assert token.split(".")[2] not in gateway_log


def test_a_refused_token_stops_the_agent_and_a_renewed_file_is_read_again(lab: Lab) -> None:
    wiregate, issuer, public_url = start_sso_gateway(lab)
    host = lab.add_host("a")
    token_file = mint_workload_token(lab, issuer, public_url, lab.workdir / "token-a")
    header, payload, signature = token_file.read_text().strip().split(".")
    forged = signature[:-6] + ("AAAAAA" if not signature.endswith("AAAAAA") else "BBBBBB")
    token_file.write_text(f"{header}.{payload}.{forged}\n")
    agent = start_workload_agent(wiregate, host, token_file)
    assert agent.proc is not None
    assert agent.proc.wait(timeout=30) != 0
    assert "bad signature" in agent.proc.output()
    assert wiregate.devices() == []
    mint_workload_token(lab, issuer, public_url, token_file)  # renewed in place
    agent = start_workload_agent(wiregate, host, token_file)
    poll(lambda: [d for d in wiregate.devices() if d["name"] == "a"] or None,
         timeout=30, what="enrollment with the renewed token")  # fmt: skip
