"""A "VM" running deploy/bootstrap.sh in the lab, and cluster nodes for it to reach.

The VM's scratch root (``WIREGATE_ROOT``) gets a real virtualenv installed from the
gateway's own wheelhouse (``wiregate wheelhouse build``, served at /simple/ and
/wheels/): the VM has no default route and a pip configuration that points at an
unreachable index, so only the gateway can serve it. systemctl is replaced by a shim
that starts the ExecStart= line of the unit the script wrote. A cluster node runs
``wiregate agent`` with ``kubernetes = true`` against the recorded-response API
stand-in (lab/kubeapi.py), with a pod namespace behind a veth.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

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

REPO = Path(__file__).resolve().parents[1]


SCRIPT = REPO / "deploy" / "bootstrap.sh"


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


VM_PYTHON = "/usr/bin/python3"  # WIREGATE_PYTHON of the VMs: their virtualenv's Python


# where a VM's pip would go if anything but the gateway were used: no route leads there
UNREACHABLE_INDEX = "http://192.0.2.1/simple/"


def build_wheelhouse(house: Path) -> Path:
    """``wiregate wheelhouse build`` into ``house`` (empty or absent), for this machine and
    the VMs' Python, as an operator builds it for the gateway."""
    version = subprocess.run([VM_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    done = subprocess.run(
        [*wiregate_command(), "wheelhouse", "build", "--out", str(house), "--source", str(REPO),
         "--platform", host_machine(), "--python-version", version],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return house


def host_machine() -> str:
    """This machine as wheel platforms name it (``uname -m``): x86_64 or aarch64."""
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def serve_wheelhouse(gateway: Wiregate, house: Path) -> None:
    """The gateway serves ``house`` (``wheelhouse_dir``) from its next start."""
    gateway.gateway_env["WIREGATE_WHEELHOUSE_DIR"] = str(house)


def tampered_copy(house: Path, target: Path, wheel_prefix: str = "wiregate-") -> Path:
    """A copy of ``house`` in which one byte of one wheel differs (its index unchanged)."""
    shutil.copytree(house, target, symlinks=False)
    [wheel] = sorted(target.glob(f"{wheel_prefix}*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0x01
    wheel.write_bytes(bytes(data))
    return wheel


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


class VM:
    """The VM host, its scratch root and the bootstrap's environment.

    Without ``wheelhouse`` the VM is offline: its default route is removed (it reaches
    the lab's internet link, the gateway and the nodes, nothing beyond), and pip's
    environment names an index no route leads to; the script installs from the gateway.
    With ``wheelhouse`` it installs from that directory (``--find-links``).
    """

    def __init__(
        self, lab: Lab, host: Host, wheelhouse: Path | None, key_file: Path, server: str
    ) -> None:
        self.host = host
        self.root = lab.workdir / f"{host.name}-root"
        self.root.mkdir()
        self.shim_dir = lab.workdir / f"{host.name}-systemctl-shim"
        self.shim_dir.mkdir()
        shim = lab.workdir / f"{host.name}-systemctl"
        shim.write_text(SHIM.format(python=sys.executable))
        shim.chmod(0o755)
        self.iface = host.wg_ifname
        self.script: Process | None = None  # the last join_timed's run
        source = ["--find-links", str(wheelhouse)] if wheelhouse is not None else []
        self.args = ["--server", server, "--auth-key", f"file:{key_file}", *source,
                     "--interface", self.iface, "--hostname", host.name]  # fmt: skip
        self.env = {
            "WIREGATE_ROOT": str(self.root),
            "WIREGATE_SYSTEMCTL": str(shim),
            "WIREGATE_SHIM_DIR": str(self.shim_dir),
            "WIREGATE_MODPROBE": "false",  # the userspace backend: wireguard-go
            "WIREGATE_PYTHON": VM_PYTHON,
            "WIREGATE_TIMESYNC_TIMEOUT": "2",
        }
        if wheelhouse is None:
            host.run(["ip", "route", "del", "default"])
            self.env |= {  # any of these, if pip used it, would fail or hang
                "PIP_INDEX_URL": UNREACHABLE_INDEX,
                "PIP_EXTRA_INDEX_URL": "http://192.0.2.2/simple/",
                "PIP_FIND_LINKS": "http://192.0.2.3/wheels/",
                "PIP_CONFIG_FILE": str(self._failing_pip_config(lab, host)),
            }

    @staticmethod
    def _failing_pip_config(lab: Lab, host: Host) -> Path:
        path = lab.workdir / f"{host.name}-pip.conf"
        path.write_text(f"[global]\nindex-url = {UNREACHABLE_INDEX}\ntimeout = 60\n")
        return path

    def join_timed(self, timeout: float = 240) -> tuple[float, float]:
        """Run the bootstrap; (seconds from its start to the first reply from the pod,
        seconds the script ran)."""
        started = time.monotonic()
        script = self.host.spawn(["sh", str(SCRIPT), *self.args], env=self.env,
                                 name=f"bootstrap-{self.host.name}")  # fmt: skip
        self.script = script
        first_packet = seconds_to_reply(self.host, POD_ADDR, timeout=timeout, while_alive=script)
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


def seconds_to_reply(
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


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_mtime_ns, st.st_ino, st.st_mode
