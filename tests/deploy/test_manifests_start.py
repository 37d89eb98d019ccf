"""Every rendered overlay starts: each container's exact arguments and environment
(ConfigMaps as rendered, Secrets and kubelet files faked, mounted files written
under a temporary root, ports remapped to free ones on 127.0.0.1).

- gateway: ``.venv/bin/wiregate <args>`` until ``/readyz`` answers 200;
- relay: started after the gateway it points at, until its STUN port answers a
  Binding request and it has fetched the gateway's ticket signers;
- agent: its configuration loads (``load_settings(AgentSettings, …)`` with the
  same flags and environment, and its workload token file is readable). Running
  it needs root and a network namespace, which this suite does not use.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.manifests import ROOT, Doc, find, pod_spec, render
from lab.pods import Prepared, prepare, service_address
from relay.client.stun import build_binding_request, parse_binding_response

WIREGATE = Path(sys.executable).with_name("wiregate")
OVERLAYS = sorted(p.parent.name for p in (ROOT / "overlays").glob("*/kustomization.yaml"))
START_TIMEOUT = 30.0
GATEWAY_SERVICE = ("wiregate-gateway.wiregate.svc", 8080)


@pytest.fixture
def root() -> Iterator[Path]:
    # short: the admin socket's path must fit a unix socket address (108 bytes)
    path = Path(tempfile.mkdtemp(prefix="wgpod-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Running:
    def __init__(self, pod: Prepared, log: Path) -> None:
        self.pod, self.log = pod, log
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(pod.root), **pod.env}
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [str(WIREGATE), *pod.args],
            env=env,
            cwd=pod.root,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            pytest.fail(f"wiregate {self.pod.process} exited with {code}:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()


@pytest.fixture
def started() -> Iterator[list[Running]]:
    procs: list[Running] = []
    yield procs
    for p in reversed(procs):
        p.stop()


def wait_until(what: str, proc: Running, check: Any) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        proc.alive()
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {START_TIMEOUT} s:\n{proc.output()}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def stun_answers(port: int) -> bool:
    txid, request = build_binding_request()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.bind(("127.0.0.1", 0))
        sock.sendto(request, ("127.0.0.1", port))
        try:
            reply = sock.recv(2048)
        except OSError:
            return False
        here = sock.getsockname()
        return parse_binding_response(reply, txid).mapped == (str(here[0]), int(here[1]))


def log_events(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out


def start_gateway(docs: list[Doc], root: Path, started: list[Running]) -> Running:
    gw = find(docs, "Deployment", "wiregate-gateway")
    pod = prepare(docs, gw, "gateway", root / "gateway")
    assert pod.process == "gateway"
    running = Running(pod, root / "gateway.log")
    started.append(running)
    c = next(c for c in pod_spec(gw)["containers"] if c["name"] == "gateway")
    probe = c["readinessProbe"]["httpGet"]
    port = pod.named[probe["port"]][0] if isinstance(probe["port"], str) else probe["port"]
    url = f"http://127.0.0.1:{pod.port(int(port))}{probe['path']}"
    wait_until(f"gateway {url}", running, lambda: http_ok(url))
    return running


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_gateway_starts_and_gets_ready(target: str, root: Path, started: list[Running]) -> None:
    docs = render(f"overlays/{target}")
    running = start_gateway(docs, root, started)
    events = log_events(running.output())
    assert not [e for e in events if e.get("level") in ("error", "critical")], running.output()


RELAY_OVERLAYS = [
    t
    for t in OVERLAYS
    if any(
        d["kind"] == "Deployment" and d["metadata"]["name"] == "wiregate-relay"
        for d in render(f"overlays/{t}")
    )
]


@pytest.mark.parametrize("target", RELAY_OVERLAYS)
def test_the_relay_starts_and_learns_the_gateway_signers(
    target: str, root: Path, started: list[Running]
) -> None:
    docs = render(f"overlays/{target}")
    gateway = start_gateway(docs, root, started)
    relay_doc = find(docs, "Deployment", "wiregate-relay")
    host, port = GATEWAY_SERVICE
    services = {f"{host}:{port}": service_address(docs, "wiregate-gateway", port, gateway.pod)}
    pod = prepare(docs, relay_doc, "relay", root / "relay", services=services)
    assert pod.process == "relay"
    relay = Running(pod, root / "relay.log")
    started.append(relay)
    stun = pod.port(3478, "UDP")
    wait_until(f"relay STUN on {stun}", relay, lambda: stun_answers(stun))
    wait_until(
        "relay signers from the gateway",
        relay,
        lambda: any(e.get("event") == "relay signers loaded" for e in log_events(relay.output())),
    )


AGENT_OVERLAYS = [
    t
    for t in OVERLAYS
    if any(
        d["kind"] == "DaemonSet" and d["metadata"]["name"] == "wiregate-agent"
        for d in render(f"overlays/{t}")
    )
]


@pytest.mark.parametrize("target", AGENT_OVERLAYS)
def test_the_agent_configuration_loads(
    target: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Configuration only: starting the agent needs root and a network namespace."""
    from agent.gateway_client import read_workload_token, workload_token_source
    from wiregate.cli.serve import agent as agent_command
    from wiregate.settings import AgentSettings, load_settings

    docs = render(f"overlays/{target}")
    ds = find(docs, "DaemonSet", "wiregate-agent")
    pod = prepare(
        docs,
        ds,
        "agent",
        root / "agent",
        services={"wiregate-gateway.wiregate.svc:8080": "wiregate-gateway.wiregate.svc:8080"},
    )
    assert pod.process == "agent"
    for name in list(os.environ):
        if name.startswith("WIREGATE_") or name in pod.env:
            monkeypatch.delenv(name)
    for name, value in pod.env.items():
        monkeypatch.setenv(name, value)
    ctx = agent_command.make_context("agent", pod.args[1:])
    flags = dict(ctx.params)
    config_file, endpoints = flags.pop("config_file"), flags.pop("endpoints")
    settings = load_settings(AgentSettings, config_file, endpoints=list(endpoints) or None, **flags)
    assert settings.server == "http://wiregate-gateway.wiregate.svc:8080"
    assert settings.kubernetes and settings.node_name == "node-a"
    assert settings.hostname == "node-a"
    assert settings.state_dir == pod.root / "var/lib/wiregate/agent"
    source = workload_token_source(
        settings.workload_token, kubernetes=settings.kubernetes, auth_key=settings.auth_key
    )
    assert source is not None and read_workload_token(source)
    assert Path(source.removeprefix("file:")).is_relative_to(pod.root), source
