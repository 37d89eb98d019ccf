"""deploy/bootstrap.sh for real: a "VM" namespace joins the mesh and reaches pods.

The lab holds a gateway and two "cluster nodes" running ``wiregate agent`` with
``kubernetes = true``, each reading its Node object from the recorded-response API
stand-in (lab/kubeapi.py) inside its namespace: node n has pod CIDR
10.244.n.0/24 and a pod namespace (10.244.n.10) behind a veth, as a CNI would wire
it. In a "VM" namespace the bootstrap script runs for real against a scratch root
(``WIREGATE_ROOT``): a real virtualenv installed from the gateway's own wheelhouse
(``wiregate wheelhouse build``, built once per session; the gateway serves it at
/simple/ and /wheels/) by a VM that is offline — no default route, and pip's
environment pointing at an index no route leads to — with the userspace backend
(wireguard-go), and systemctl replaced by a shim that starts the ExecStart= line of
the unit the script wrote. Then: VM -> pods, pods -> VM and pod -> pod across nodes
through the tunnels, a re-run that changes nothing, and ``--uninstall`` leaving
nothing in the scratch root and no interface. A wheel changed on the gateway after
its wheelhouse was built is refused by pip's hash check, and nothing stays behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from lab.capture import PATTERN, is_wireguard, parse_frame, read_pcap, start_capture, stop_capture
from lab.harness import (
    Host,
    Lab,
    Wiregate,
)
from lab.vm import (
    POD_ADDR,
    VM,
    seconds_to_reply,
    serve_wheelhouse,
    start_cluster_node,
    tampered_copy,
)

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

POD_CIDR = "10.244.1.0/24"  # node n has 10.244.n.0/24, its pod 10.244.n.10 (n = 1: these)


@pytest.fixture
def gateway(lab: Lab, wheelhouse: Path) -> Iterator[Wiregate]:
    wiregate = Wiregate(lab)
    serve_wheelhouse(wiregate, wheelhouse)
    wiregate.start_gateway()
    yield wiregate


def test_a_vm_joins_with_bootstrap_and_reaches_a_pod(lab: Lab, gateway: Wiregate) -> None:
    node, node2, vm_host = lab.add_host("node1"), lab.add_host("node2"), lab.add_host("vm")
    key_file = gateway.create_key(tags="tag:lab", expiry="1h", reusable=True)
    node_agent, pod = start_cluster_node(lab, gateway, node, key_file, index=1)
    node2_agent, _pod2 = start_cluster_node(lab, gateway, node2, key_file, index=2)
    vm = VM(lab, vm_host, None, key_file, gateway.server)  # offline: the gateway serves it
    assert "default" not in vm_host.run(["ip", "route", "show"]).stdout

    # -- install: one command; the pod answers across the tunnel (timed from the start)
    first_packet, script_s = vm.join_timed()
    print(f"\nbootstrap_s={first_packet:.2f} (script ran {script_s:.2f} s)")
    assert vm.script is not None
    output = vm.script.output()
    ours = version("wiregate")
    assert f"agent: wiregate {ours} from {gateway.server}/simple/ (hashes required)" in output
    assert "192.0.2." not in output  # pip never tried the environment's index
    freeze = vm_host.run([str(vm.root / "opt/wiregate/bin/python"), "-m", "pip", "freeze"]).stdout
    assert f"wiregate=={ours}" in freeze.splitlines()

    vm_agent = vm.agent(key_file)
    gateway.agents[vm_host.name] = vm_agent
    statuses = gateway.wait_mesh([node_agent, node2_agent, vm_agent], timeout=60)
    assert sorted(p["name"] for p in statuses["vm"]["peers"]) == ["node1", "node2"]
    routes = vm_host.run(["ip", "route", "show", "table", "51820"]).stdout
    for cidr in (POD_CIDR, "10.244.2.0/24"):  # every node's pods, each through the tunnel
        assert f"{cidr} dev {vm.iface}" in routes
    assert "10.244" not in vm_host.run(["ip", "route", "show", "table", "main"]).stdout
    assert seconds_to_reply(vm_host, "10.244.2.10", timeout=30) is not None, "VM -> pod on node2"

    # next to the CNI: the node's pod route stays in main, wiregate adds one rule only
    assert f"{POD_CIDR} dev podveth" in node.run(["ip", "route", "show", "table", "main"]).stdout
    node_routes = node.run(["ip", "route", "show", "table", "51820"]).stdout
    assert POD_CIDR not in node_routes and "10.244.2.0/24 dev " + node.wg_ifname in node_routes
    rules = node.run(["ip", "-4", "rule", "show"]).stdout.splitlines()
    assert [r.split(":")[0] for r in rules] == ["0", "5210", "32766", "32767"], rules
    assert rules[1].split(":", 1)[1].split() == ["not", "from", "all", "fwmark", "0x5747",
                                                 "lookup", "51820"]  # fmt: skip

    # pods reach the VM, and each other across nodes (mesh mode), through the tunnels
    vm_tunnel = statuses["vm"]["device"]["addresses"][0].split("/")[0]
    assert seconds_to_reply(node, vm_tunnel, timeout=30) is not None, "node -> VM"
    assert seconds_to_reply(pod, vm_tunnel, timeout=30) is not None, "pod -> VM"
    assert seconds_to_reply(pod, "10.244.2.10", timeout=30) is not None, (
        "pod on node1 -> pod on node2"
    )
    transfer = vm_host.run(["wg", "show", vm.iface, "transfer"]).stdout.split()
    assert int(transfer[1]) > 0 and int(transfer[2]) > 0  # bytes both ways through WireGuard
    assert_encrypted_on_the_underlay(vm_host, node2, "10.244.2.10", lab.workdir / "vm.pcap")

    # the unit's own command line is what runs, with the secret only in a file
    execstart = (vm.shim_dir / "execstart").read_text()
    assert f"--config {vm.root}/etc/wiregate/agent.toml" in execstart
    assert "wgk_" not in execstart and "auth-key" not in execstart

    # -- a second run changes nothing: no file, no restart, same process
    before, pid = vm.installed(), vm.pid()
    again = vm.bootstrap(*vm.args)
    assert again.returncode == 0, again.stderr
    assert "is running and up to date" in again.stderr
    assert not [ln for ln in again.stderr.splitlines() if ": write " in ln or ": install " in ln]
    assert vm.installed() == before and vm.pid() == pid
    assert seconds_to_reply(vm_host, POD_ADDR, timeout=10) is not None

    # -- uninstall: nothing left in the root, no interface, no agent
    gone = vm.bootstrap("--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert sorted(p.name for p in vm.root.iterdir()) == []
    assert vm_host.run(["ip", "link", "show", "dev", vm.iface], check=False).returncode != 0
    assert pid is not None and not _alive(pid)
    assert not Path(f"/var/run/wireguard/{vm.iface}.sock").exists()
    assert vm_host.ping(POD_ADDR, count=1, timeout=1.0) is False


def assert_encrypted_on_the_underlay(src: Host, node: Host, pod_addr: str, pcap: Path) -> None:
    """Pings from ``src`` to a pod behind ``node`` cross ``src``'s underlay link as WireGuard
    UDP to the node only: no ICMP, no pod address, no payload in clear."""
    capture = start_capture(src, pcap)
    src.run(["ping", "-n", "-c", "5", "-i", "0.2", "-s", "200", "-p", PATTERN.hex(), pod_addr])
    stop_capture(capture, pcap, min_frames=10)
    frames = read_pcap(pcap)
    packets = [p for f in frames if (p := parse_frame(f)) is not None]
    assert not [f for f in frames if PATTERN in f], "ping payload seen in clear"
    assert not [p for p in packets if pod_addr in (p.src, p.dst) or p.proto == 1]
    big = [p for p in packets if is_wireguard(p) and len(p.frame) > 200]
    to_node = [p for p in big if p.dst == node.addr]
    from_node = [p for p in big if p.src == node.addr]
    assert len(to_node) >= 5 and len(from_node) >= 5, "the pings did not cross as WireGuard"


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return False


def test_a_tampered_wheel_is_refused_and_leaves_nothing_behind(lab: Lab, wheelhouse: Path) -> None:
    """One byte of wiregate's wheel changes on the gateway after its wheelhouse was built:
    pip's hash check refuses it, the script says so and removes everything it installed."""
    house = lab.workdir / "tampered-wheelhouse"
    wheel = tampered_copy(wheelhouse, house)
    wiregate = Wiregate(lab)
    serve_wheelhouse(wiregate, house)
    wiregate.start_gateway()
    key_file = wiregate.create_key(tags="tag:lab", expiry="1h", reusable=False)
    vm_host = lab.add_host("vm")
    vm = VM(lab, vm_host, None, key_file, wiregate.server)
    done = vm.bootstrap(*vm.args)
    assert done.returncode == 1, done.stderr
    assert "DO NOT MATCH THE HASHES" in done.stderr and wheel.name in done.stderr
    assert f"error: could not install wiregate from {wiregate.server}" in done.stderr
    assert "removing what this run installed" in done.stderr
    assert sorted(p.name for p in vm.root.iterdir()) == []  # no /opt/wiregate, no unit, no config
    calls = (vm.shim_dir / "calls").read_text() if (vm.shim_dir / "calls").exists() else ""
    assert "start" not in calls and vm.pid() is None
    assert vm_host.run(["ip", "link", "show", "dev", vm.iface], check=False).returncode != 0
    assert wiregate.devices() == []


def test_a_refused_key_leaves_nothing_behind(lab: Lab, gateway: Wiregate) -> None:
    """The key is revoked before the agent enrolls (as when it expires mid-bootstrap): the
    script says so and removes everything it installed."""
    vm_host = lab.add_host("vm")
    key_file = gateway.create_key(tags="tag:lab", expiry="1h", reusable=False)
    gateway.admin("keys", "revoke", key_file.name.removeprefix("key-"))
    vm = VM(lab, vm_host, None, key_file, gateway.server)
    done = vm.bootstrap(*vm.args)
    assert done.returncode == 1, done.stderr
    assert "the agent could not enroll (the agent exited)" in done.stderr
    assert "nothing is left installed" in done.stderr
    assert sorted(p.name for p in vm.root.iterdir()) == []
    assert vm_host.run(["ip", "link", "show", "dev", vm.iface], check=False).returncode != 0
    assert gateway.devices() == []
    service_log = (vm.shim_dir / "service.log").read_text()
    assert "error:" in service_log and key_file.read_text().strip() not in service_log


def test_a_malformed_node_annotation_stops_the_agent_before_anything_is_set_up(
    lab: Lab, gateway: Wiregate
) -> None:
    node = lab.add_host("node1")
    key_file = gateway.create_key(tags="tag:lab", expiry="1h", reusable=True)
    bad = {"wiregate.io/persistent-keepalive": "often"}
    agent, _pod = start_cluster_node(lab, gateway, node, key_file, annotations=bad)
    assert agent.proc is not None
    assert agent.proc.wait(timeout=60) == 1
    output = agent.proc.output()
    assert (
        "annotation wiregate.io/persistent-keepalive='often' is not a number of seconds" in output
    )
    assert gateway.devices() == []  # never enrolled
    assert node.run(["ip", "link", "show", "dev", agent.iface], check=False).returncode != 0
