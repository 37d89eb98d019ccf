"""End to end: the gateway serves HTTPS with a lab CA's certificate; agents verify it."""

from __future__ import annotations

import pytest

from lab.harness import Lab, Wiregate
from lab.ping import ping_until
from lab.tls import LabCA

pytestmark = [pytest.mark.lab, pytest.mark.timeout(400)]


@pytest.fixture
def tls_gateway(lab: Lab) -> Wiregate:
    wiregate = Wiregate(lab, tls=True)
    wiregate.start_gateway()
    return wiregate


def test_agents_with_the_ca_join_and_ping(lab: Lab, tls_gateway: Wiregate) -> None:
    assert tls_gateway.server.startswith("https://")
    key_file = tls_gateway.create_key(reusable=True)
    a, b = lab.add_host("a"), lab.add_host("b")
    agents = [tls_gateway.start_agent(a, key_file), tls_gateway.start_agent(b, key_file)]
    tls_gateway.wait_mesh(agents, timeout=90)
    b_v4 = tls_gateway.tunnel_addresses(agents[1])[0]
    a_v4 = tls_gateway.tunnel_addresses(agents[0])[0]
    assert ping_until(a, b_v4), "a cannot ping b through the tunnel"
    assert ping_until(b, a_v4), "b cannot ping a through the tunnel"


def test_an_agent_with_another_ca_is_refused(lab: Lab, tls_gateway: Wiregate) -> None:
    other = LabCA.create(lab.workdir / "other-ca", "another CA")
    key_file = tls_gateway.create_key(reusable=True)
    host = lab.add_host("a")
    agent = tls_gateway.start_agent(host, key_file, ca_file=other.ca_file)
    assert agent.proc is not None
    code = agent.proc.wait(timeout=30)
    output = agent.proc.output()
    assert code == 1, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors and errors[-1].startswith(f"error: TLS with {tls_gateway.server} failed: ")
    assert "Traceback" not in output
    assert tls_gateway.devices() == []
    assert not (agent.state_dir / "device.json").exists()
