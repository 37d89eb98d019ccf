"""deploy/bootstrap.sh for real: a "VM" namespace joins the mesh and reaches pods.

The lab holds a gateway and two "cluster nodes" running ``wiregate agent`` with
``kubernetes = true``, each reading its Node object from the recorded-response API
stand-in (lab/kubeapi.py) inside its namespace: node n has pod CIDR
10.244.n.0/24 and a pod namespace (10.244.n.10) behind a veth, as a CNI would wire
it. In a "VM" namespace the bootstrap script runs for real against a scratch root
(``WIREGATE_ROOT``): a real virtualenv installed offline from a wheelhouse, the
userspace backend (wireguard-go), and systemctl replaced by a shim that starts the
ExecStart= line of the unit the script wrote. Then: VM -> pods, pods -> VM and pod
-> pod across nodes through the tunnels, a re-run that changes nothing, and
``--uninstall`` leaving nothing in the scratch root and no interface.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.harness import (
    WG_PORT,
    Agent,
    Host,
    Lab,
    Namespace,
    Process,
    Wiregate,
    poll,
    wiregate_command,
)
from lab.kubeapi import recorded, write_kubeconfig
from tests.e2e.test_mesh import (
    PATTERN,
    is_wireguard,
    parse_frame,
    read_pcap,
    start_capture,
    stop_capture,
)

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "bootstrap.sh"
WHEEL_CACHE = Path("/var/cache/wiregate-wheelhouse")
POD_CIDR = "10.244.1.0/24"  # node n has 10.244.n.0/24, its pod 10.244.n.10 (n = 1: these)
POD_ADDR = "10.244.1.10"
KUBE_API = "127.0.0.1:6443"
KUBE_TOKEN = "lab-node-token"

# systemctl for a host without systemd: state in $WIREGATE_SHIM_DIR, ExecStart= from the
# unit file the bootstrap wrote under $WIREGATE_ROOT, started in the background.
SHIM = """#!{python}
import os, shlex, signal, subprocess, sys, time
from pathlib import Path

state = Path(os.environ["WIREGATE_SHIM_DIR"])
args = [a for a in sys.argv[1:] if a not in ("--quiet", "--now", "-q")]
now = "--now" in sys.argv
with open(state / "calls", "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
verb, unit = args[0], (args[1] if len(args) > 1 else "")
root = os.environ.get("WIREGATE_ROOT", "/").rstrip("/")

def pid():
    try:
        p = int((state / "pid").read_text())
        os.kill(p, 0)
        return p
    except (OSError, ValueError):
        return None

def start():
    text = Path(f"{{root}}/etc/systemd/system/{{unit}}").read_text().replace("\\\\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    out = open(state / "service.log", "ab")
    child = subprocess.Popen(shlex.split(line.removeprefix("ExecStart=")), stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    (state / "pid").write_text(str(child.pid))
    (state / "execstart").write_text(line)

def stop():
    p = pid()
    if p is not None:
        os.kill(p, signal.SIGTERM)
        for _ in range(100):
            if pid() is None:
                break
            time.sleep(0.05)
    (state / "pid").unlink(missing_ok=True)

if verb == "is-enabled":
    sys.exit(0 if (state / "enabled").exists() else 1)
if verb == "is-active":
    sys.exit(0 if pid() is not None else 3)
if verb == "enable":
    (state / "enabled").touch()
elif verb == "disable":
    (state / "enabled").unlink(missing_ok=True)
    if now:
        stop()
elif verb == "start":
    if pid() is None:
        start()
elif verb == "stop":
    stop()
elif verb == "restart":
    stop()
    start()
"""


# --------------------------------------------------------------------------- the wheelhouse


def _dependency_wheels() -> Path:
    """Every dependency's wheel, built once per pyproject.toml (shared by runs, locked)."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    target = WHEEL_CACHE / key
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    with open(WHEEL_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            building = WHEEL_CACHE / f".{key}.{os.getpid()}"
            shutil.rmtree(building, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(building),
                            str(REPO)], check=True, capture_output=True, timeout=600)  # fmt: skip
            for own in building.glob("wiregate-*.whl"):
                own.unlink()  # this checkout's wheel is built fresh for every run
            building.rename(target)
    return target


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


def build_wheelhouse(house: Path) -> Path:
    """The cached dependency wheels plus a wheel of this checkout, in ``house``."""
    for wheel in _dependency_wheels().glob("*.whl"):
        (house / wheel.name).symlink_to(wheel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(house),
                    str(REPO)], check=True, capture_output=True, timeout=300)  # fmt: skip
    return house


# --------------------------------------------------------------------------- the cluster node


def _node_document(node: Host, pod_cidr: str, annotations: dict[str, str]) -> bytes:
    """The recorded kind Node, renamed and readdressed for this lab node."""
    doc = json.loads(recorded("node-kind-worker.json"))
    doc["metadata"]["name"] = node.name
    doc["metadata"]["annotations"].update(annotations)
    doc["spec"]["podCIDR"], doc["spec"]["podCIDRs"] = pod_cidr, [pod_cidr]
    doc["status"]["addresses"] = [{"type": "InternalIP", "address": node.addr},
                                  {"type": "Hostname", "address": node.name}]  # fmt: skip
    return json.dumps(doc).encode()


def add_pod(lab: Lab, node: Host, index: int) -> Namespace:
    """A pod namespace on a veth from the node, as a CNI bridge-less plugin would wire it:
    the node holds 10.244.INDEX.1 and forwards, the pod holds 10.244.INDEX.10."""
    pod = Namespace(lab, f"pod{index}")
    lab._add_namespace(pod)
    node.run(["ip", "link", "add", "podveth", "type", "veth", "peer", "name", "eth0",
              "netns", pod.netns])  # fmt: skip
    node.run(["ip", "addr", "add", f"10.244.{index}.1/24", "dev", "podveth"])
    node.run(["ip", "link", "set", "podveth", "up"])
    node.sysctl("net.ipv4.ip_forward", "1")
    pod.run(["ip", "addr", "add", f"10.244.{index}.10/24", "dev", "eth0"])
    pod.run(["ip", "link", "set", "eth0", "up"])
    pod.run(["ip", "route", "add", "default", "via", f"10.244.{index}.1"])
    return pod


def start_cluster_node(
    lab: Lab,
    gateway: Wiregate,
    node: Host,
    key_file: Path,
    index: int = 1,
    annotations: dict[str, str] | None = None,
) -> tuple[Agent, Namespace]:
    """Pod CIDR 10.244.INDEX.0/24 with a pod behind the node, the API stand-in, and the
    agent with kubernetes on."""
    pod = add_pod(lab, node, index)
    document = lab.workdir / f"{node.name}.json"
    document.write_bytes(_node_document(node, f"10.244.{index}.0/24", annotations or {}))
    api = node.spawn([sys.executable, "-m", "lab.kubeapi", "--listen", KUBE_API,
                      "--token", KUBE_TOKEN, "--node", f"{node.name}={document}"],
                     env={"PYTHONPATH": str(REPO)}, name=f"kubeapi-{node.name}")  # fmt: skip
    poll(lambda: "Running on" in api.output(), timeout=30, what="the Kubernetes API stand-in")
    kubeconfig = write_kubeconfig(lab.workdir / f"kubeconfig-{node.name}", f"http://{KUBE_API}",
                                  KUBE_TOKEN)  # fmt: skip
    agent = Agent(node, lab.workdir / "agents" / node.name, key_file)
    gateway.agents[node.name] = agent
    agent.proc = node.spawn(
        [*wiregate_command(), "agent", "--server", gateway.server,
         "--auth-key", f"file:{key_file}", "--interface", agent.iface, "--hostname", node.name,
         "--state-dir", str(agent.state_dir), "--run-dir", str(agent.run_dir),
         "--listen-port", str(WG_PORT), "--log-format", "json"],
        env={"WIREGATE_KUBERNETES": "true", "NODE_NAME": node.name,
             "WIREGATE_KUBECONFIG": str(kubeconfig)},
        name=f"agent-{node.name}",
    )  # fmt: skip
    return agent, pod


# --------------------------------------------------------------------------- the VM


class VM:
    """The VM host, its scratch root and the bootstrap's environment."""

    def __init__(self, lab: Lab, host: Host, wheelhouse: Path, key_file: Path, server: str):
        self.host = host
        self.root = lab.workdir / f"{host.name}-root"
        self.root.mkdir()
        self.shim_dir = lab.workdir / f"{host.name}-systemctl-shim"
        self.shim_dir.mkdir()
        shim = lab.workdir / f"{host.name}-systemctl"
        shim.write_text(SHIM.format(python=sys.executable))
        shim.chmod(0o755)
        self.iface = host.wg_ifname
        self.args = ["--server", server, "--auth-key", f"file:{key_file}",
                     "--find-links", str(wheelhouse), "--interface", self.iface,
                     "--hostname", host.name]  # fmt: skip
        self.env = {
            "WIREGATE_ROOT": str(self.root),
            "WIREGATE_SYSTEMCTL": str(shim),
            "WIREGATE_SHIM_DIR": str(self.shim_dir),
            "WIREGATE_MODPROBE": "false",  # the userspace backend: wireguard-go
            "WIREGATE_PYTHON": "/usr/bin/python3",
            "WIREGATE_TIMESYNC_TIMEOUT": "2",
        }

    def join_timed(self, timeout: float = 240) -> tuple[float, float]:
        """Run the bootstrap; (seconds from its start to the first reply from the pod,
        seconds the script ran)."""
        started = time.monotonic()
        script = self.host.spawn(["sh", str(SCRIPT), *self.args], env=self.env,
                                 name=f"bootstrap-{self.host.name}")  # fmt: skip
        first_packet = _ping_until(self.host, POD_ADDR, timeout=timeout, while_alive=script)
        assert script.wait(timeout=timeout) == 0, script.output()
        assert first_packet is not None, "the VM never reached the pod"
        return first_packet, time.monotonic() - started

    def bootstrap(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.host.run(["sh", str(SCRIPT), *extra], env=self.env, timeout=300, check=False)

    def agent(self, key_file: Path) -> Agent:
        agent = Agent(self.host, self.root, key_file)
        agent.state_dir = self.root / "var/lib/wiregate/agent"
        agent.run_dir = self.root / "run/wiregate"
        agent.iface = self.iface
        return agent

    def pid(self) -> int | None:
        path = self.shim_dir / "pid"
        return int(path.read_text()) if path.exists() else None

    def installed(self) -> dict[str, tuple[int, int, int]]:
        """(mtime, inode, mode) of every file bootstrap owns (not the agent's own state)."""
        skip = (self.root / "var/lib/wiregate/agent", self.root / "run/wiregate")
        paths = [p for p in self.root.rglob("*") if not any(p == s or s in p.parents for s in skip)]
        return {str(p.relative_to(self.root)): _identity(p) for p in paths}


def _ping_until(
    host: Namespace, addr: str, timeout: float, while_alive: Process | None = None
) -> float | None:
    """Seconds until ``addr`` answered a ping from ``host``, or None (also once
    ``while_alive`` has failed)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if host.ping(addr, count=1, timeout=0.5):
            return time.monotonic() - start
        if while_alive is not None and while_alive.returncode not in (None, 0):
            return None
    return None


@pytest.fixture
def gateway(lab: Lab) -> Iterator[Wiregate]:
    wiregate = Wiregate(lab)
    wiregate.start_gateway()
    yield wiregate


def test_a_vm_joins_with_bootstrap_and_reaches_a_pod(
    lab: Lab, gateway: Wiregate, wheelhouse: Path
) -> None:
    node, node2, vm_host = lab.add_host("node1"), lab.add_host("node2"), lab.add_host("vm")
    key_file = gateway.create_key(tags="tag:lab", expiry="1h", reusable=True)
    node_agent, pod = start_cluster_node(lab, gateway, node, key_file, index=1)
    node2_agent, _pod2 = start_cluster_node(lab, gateway, node2, key_file, index=2)
    vm = VM(lab, vm_host, wheelhouse, key_file, gateway.server)

    # -- install: one command; the pod answers across the tunnel (timed from the start)
    first_packet, script_s = vm.join_timed()
    print(f"\nbootstrap_s={first_packet:.2f} (script ran {script_s:.2f} s)")

    vm_agent = vm.agent(key_file)
    gateway.agents[vm_host.name] = vm_agent
    statuses = gateway.wait_mesh([node_agent, node2_agent, vm_agent], timeout=60)
    assert sorted(p["name"] for p in statuses["vm"]["peers"]) == ["node1", "node2"]
    routes = vm_host.run(["ip", "route", "show", "table", "51820"]).stdout
    for cidr in (POD_CIDR, "10.244.2.0/24"):  # every node's pods, each through the tunnel
        assert f"{cidr} dev {vm.iface}" in routes
    assert "10.244" not in vm_host.run(["ip", "route", "show", "table", "main"]).stdout
    assert _ping_until(vm_host, "10.244.2.10", timeout=30) is not None, "VM -> pod on node2"

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
    assert _ping_until(node, vm_tunnel, timeout=30) is not None, "node -> VM"
    assert _ping_until(pod, vm_tunnel, timeout=30) is not None, "pod -> VM"
    assert _ping_until(pod, "10.244.2.10", timeout=30) is not None, "pod on node1 -> pod on node2"
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
    assert _ping_until(vm_host, POD_ADDR, timeout=10) is not None

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


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_mtime_ns, st.st_ino, st.st_mode


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return False


def test_a_refused_key_leaves_nothing_behind(lab: Lab, gateway: Wiregate, wheelhouse: Path) -> None:
    """The key is revoked before the agent enrolls (as when it expires mid-bootstrap): the
    script says so and removes everything it installed."""
    vm_host = lab.add_host("vm")
    key_file = gateway.create_key(tags="tag:lab", expiry="1h", reusable=False)
    gateway.admin("keys", "revoke", key_file.name.removeprefix("key-"))
    vm = VM(lab, vm_host, wheelhouse, key_file, gateway.server)
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
