"""``wiregate relay`` as a real process in a lab namespace.

Its STUN listeners come from each place the deployments set them: the
``WIREGATE_STUN_LISTEN`` environment variable (the Kubernetes relay component's
ConfigMap), ``[relay] stun_listen`` in a ``--config`` file (the operations
reference's example), the default (``0.0.0.0:3478``), and the flag, which wins
over the environment. Every answer is read with an independent client (coturn's
``turnutils_stunclient``) from another host. SIGTERM and SIGINT stop it with exit
status 0 after it closed every listener: the ports are free again at once.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal

import pytest
from nacl.signing import SigningKey

from lab.harness import Host, Lab, Process, poll, wiregate_command

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]

if shutil.which("turnutils_stunclient") is None:
    pytest.skip(
        "turnutils_stunclient (Debian package coturn) is not installed", allow_module_level=True
    )

MANIFEST_LISTEN = '["0.0.0.0:3478", "0.0.0.0:3479"]'  # deploy/kubernetes/components/relay
REFLEXIVE = re.compile(r"UDP reflexive addr: ([0-9.]+):(\d+)")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay inherits this process's environment: no WIREGATE_* of ours may leak in."""
    for name in ("WIREGATE_STUN_LISTEN", "WIREGATE_CONFIG", "WIREGATE_METRICS_LISTEN"):
        monkeypatch.delenv(name, raising=False)


def start(host: Host, *flags: str, env: dict[str, str] | None = None) -> Process:
    relay = host.spawn([*wiregate_command(), "relay", *flags], env=env, name="relay")
    poll(lambda: "relay listening" in relay.output() or not relay.alive(), timeout=30,
         what="relay to listen")  # fmt: skip
    assert relay.alive(), relay.output()
    return relay


def stun(client: Host, server: Host, port: int) -> tuple[str, int] | None:
    """The reflexive address ``turnutils_stunclient`` learns from ``server:port``, if any."""
    proc = client.run(
        ["timeout", "5", "turnutils_stunclient", "-p", str(port), server.addr], check=False
    )
    found = REFLEXIVE.search(proc.stdout + proc.stderr)
    return (found.group(1), int(found.group(2))) if found else None


def hosts(lab: Lab) -> tuple[Host, Host]:
    return lab.add_host("relay"), lab.add_host("client")


def test_environment_as_the_kubernetes_manifest_sets_it(lab: Lab) -> None:
    server, client = hosts(lab)
    start(server, env={"WIREGATE_STUN_LISTEN": MANIFEST_LISTEN})
    for port in (3478, 3479):
        answer = stun(client, server, port)
        assert answer is not None and answer[0] == client.addr, f"no STUN answer on {port}"


def test_config_file(lab: Lab) -> None:
    server, client = hosts(lab)
    config = lab.workdir / "relay.toml"
    config.write_text('[relay]\nstun_listen = ["0.0.0.0:3478", "0.0.0.0:3479"]\n')
    start(server, "--config", str(config))
    for port in (3478, 3479):
        answer = stun(client, server, port)
        assert answer is not None and answer[0] == client.addr, f"no STUN answer on {port}"


def test_default_listener(lab: Lab) -> None:
    server, client = hosts(lab)
    start(server)
    answer = stun(client, server, 3478)
    assert answer is not None and answer[0] == client.addr
    assert stun(client, server, 3479) is None  # only the default was bound


def test_flag_wins_over_the_environment(lab: Lab) -> None:
    server, client = hosts(lab)
    start(server, "--stun-listen", "0.0.0.0:3479", env={"WIREGATE_STUN_LISTEN": '["0.0.0.0:3478"]'})
    assert stun(client, server, 3479) is not None
    assert stun(client, server, 3478) is None


def nft_tables(host: Host) -> str:
    return host.run(["nft", "list", "tables"]).stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_relay_cleanly(lab: Lab, sig: signal.Signals) -> None:
    """STUN, the relay's control and relay ports, metrics and the kernel fast path's
    nftables table: all closed or removed, exit status 0."""
    server, client = hosts(lab)
    server.sysctl("net.ipv4.ip_forward", "1")  # the kernel fast path may be used
    keys = lab.workdir / "signers.json"
    public = base64.b64encode(bytes(SigningKey.generate().verify_key)).decode()
    keys.write_text(json.dumps({"signers": [{"public_key": public, "tenants": ["default"]}]}))
    flags = ["--stun-listen", "0.0.0.0:3478", "--relay-id", "r1",
             "--relay-listen", "0.0.0.0:3480", "--relay-ports", "40000-40003",
             "--verify-keys-file", str(keys), "--metrics-listen", "0.0.0.0:9091"]  # fmt: skip
    relay = start(server, *flags, env={"WIREGATE_FORWARD_PATH": "kernel"})
    assert stun(client, server, 3478) is not None
    assert "wiregate_relay" in nft_tables(server)  # what it installed
    relay.signal(sig)
    assert relay.wait(timeout=10) == 0, relay.output()
    assert "relay stopped" in relay.output()
    assert "Traceback" not in relay.output()
    assert stun(client, server, 3478) is None
    assert "wiregate_relay" not in nft_tables(server)  # removed on the way out
    again = start(server, *flags)  # every port was released: a new relay binds them all
    assert stun(client, server, 3478) is not None
    again.signal(signal.SIGTERM)
    assert again.wait(timeout=10) == 0
