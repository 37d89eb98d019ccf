"""deploy/bootstrap.sh with ``--workload-token`` and no enrollment key, for real.

The real OpenID Provider runs next to the gateway (lab/sso.py) and mints a
token for the gateway (``client_credentials``); the bootstrap script installs the
agent in a "VM" namespace (scratch root, offline wheelhouse, wireguard-go, the
systemctl shim of test_bootstrap.py) with ``workload_token`` in agent.toml; the
agent enrolls with the token and the VM pings another workload-token agent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.harness import Lab, bare
from lab.ping import ping_until
from lab.sso import enroll_by_workload_token, mint_workload_token, start_sso_gateway
from lab.vm import VM

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]


def test_a_vm_joins_with_a_workload_token_only(lab: Lab, wheelhouse: Path) -> None:
    wiregate, issuer, public_url = start_sso_gateway(lab)
    peer = enroll_by_workload_token(lab, wiregate, lab.add_host("peer"), issuer, public_url)
    vm_host = lab.add_host("vm")
    token = mint_workload_token(lab, issuer, public_url, lab.workdir / "vm-token")
    vm = VM(lab, vm_host, wheelhouse, lab.workdir / "no-key", wiregate.server)
    at = vm.args.index("--auth-key")
    vm.args[at : at + 2] = ["--workload-token", f"file:{token}"]
    done = vm.bootstrap(*vm.args)
    assert done.returncode == 0, done.stderr
    toml = (vm.root / "etc/wiregate/agent.toml").read_text()
    assert 'workload_token = "file:' in toml and "auth_key" not in toml
    assert not (vm.root / "etc/wiregate/auth-key").exists()
    devices = {d["name"]: d for d in wiregate.devices()}
    assert devices["vm"]["identity"] == {"issuer": issuer, "subject": "wiregate-workload"}
    [peer_v4, _v6] = (bare(a) for a in wiregate.status(peer)["device"]["addresses"])
    assert ping_until(vm_host, peer_v4, timeout=30)
    secret = token.read_text().strip().split(".")[2]
    assert secret not in done.stdout + done.stderr + (vm.shim_dir / "service.log").read_text()
    assert vm.bootstrap("--uninstall").returncode == 0
