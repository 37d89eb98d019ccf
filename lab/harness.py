"""Network-namespace lab: an "internet", hosts, NAT routers and real processes.

Topology::

    host ──veth──┐
    host ──veth──┤ bridge 198.51.100.1/24  ("internet" namespace)
    router WAN ──┘
      └─ LAN bridge 192.0.2.x/27 ── host ── host      (MASQUERADE, optional UDP block)

Every namespace, veth and lab WireGuard interface name starts with the run prefix
(``wg`` + 4 hex digits + ``-``), so parallel runs never collide and a crashed run's
leftovers can be found again: :func:`sweep_stale` removes every prefix whose owning
process (recorded in ``/run/wiregate-lab/PREFIX``) is gone. :meth:`Lab.teardown`
always stops spawned process groups, every other process inside the lab's
namespaces and any ``wireguard-go`` serving a lab interface, then deletes the
namespaces, leftover links and UAPI sockets.

Only lab-internal addresses are ever used: 198.51.100.0/24 for the internet,
192.0.2.0/24 and 203.0.113.0/24 for router LANs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from lab.tls import LabCA

__all__ = [
    "INTERNET_GATEWAY",
    "Agent",
    "CommandError",
    "Host",
    "Lab",
    "LabError",
    "Namespace",
    "Process",
    "Router",
    "Wiregate",
    "add_bridge",
    "bare",
    "lab_leftovers",
    "lab_requirements",
    "poll",
    "sweep_stale",
]

PREFIX_RE = re.compile(r"^(wg[0-9a-f]{4})-")
NAME_RE = re.compile(r"^[a-z0-9]{1,7}$")
INTERNET = ipaddress.IPv4Network("198.51.100.0/24")
INTERNET_GATEWAY = "198.51.100.1"
LAN_POOLS = (ipaddress.IPv4Network("192.0.2.0/24"), ipaddress.IPv4Network("203.0.113.0/24"))
OWNER_DIR = Path("/run/wiregate-lab")
WG_RUN_DIR = Path("/var/run/wireguard")

NatMode = Literal["eim", "symmetric", "none"]
T = TypeVar("T")


class LabError(Exception):
    """The lab could not be built or a lab operation failed."""


class CommandError(LabError):
    """A command run by the lab exited non-zero (or timed out)."""

    def __init__(self, cmd: Sequence[str], returncode: int | None, stdout: str, stderr: str):
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{' '.join(self.cmd)!r} exited {returncode}\n"
            f"stdout: {stdout.strip()[-2000:]}\nstderr: {stderr.strip()[-2000:]}"
        )


def lab_requirements() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, veth, TUN)"
    missing = [tool for tool in ("ip", "wireguard-go", "wg") if shutil.which(tool) is None]
    if missing:
        return f"the lab needs {', '.join(missing)} on PATH"
    return None


def _run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=None if env is None else {**os.environ, **env},
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise CommandError(cmd, None, out, err + f"\n(timed out after {timeout}s)") from exc
    if check and proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, proc.stdout, proc.stderr)
    return proc


def poll(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.25,
    what: str = "condition",
) -> T:
    """Call ``probe`` until it returns something truthy; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            result = probe()
            if result:
                return result
        except Exception as exc:  # a probe may fail while things come up
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


# --------------------------------------------------------------------------- processes


class Process:
    """A long-running process started in its own process group, output to a log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group, then SIGKILL it after ``timeout``; return the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        self.signal(signal.SIGKILL)  # stragglers of the group, even if the leader exited
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)
        return self.popen.poll()

    def output(self, tail: int | None = None) -> str:
        """The log so far (the last ``tail`` characters when given)."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text if tail is None else text[-tail:]


# --------------------------------------------------------------------------- namespaces


class Namespace:
    """One network namespace of the lab."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name
        self.netns = f"{lab.prefix}-{name}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.netns}>"

    def _wrap(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd]

    def run(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside this namespace and wait for it (raise CommandError on failure)."""
        return _run(self._wrap(cmd), check=check, timeout=timeout, input=input, env=env)

    def spawn(
        self,
        cmd: Sequence[str],
        *,
        log: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> Process:
        """Start ``cmd`` in this namespace, in its own process group, stdout+stderr to ``log``."""
        label = name or f"{self.name}-{Path(cmd[0]).name}"
        path = (
            Path(log)
            if log is not None
            else self.lab.workdir / f"{label}-{len(self.lab.processes)}.log"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with path.open("ab") as out:
            popen = subprocess.Popen(
                self._wrap(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
        proc = Process(label, popen, path)
        self.lab.processes.append(proc)
        return proc

    def ping(self, addr: str, count: int = 1, timeout: float = 2.0) -> bool:
        """True when ``count`` echo requests to ``addr`` get replies within ``timeout`` seconds."""
        cmd = [
            "ping",
            "-n",
            "-q",
            "-c",
            str(count),
            "-i",
            "0.2",
            "-w",
            str(int(timeout + 0.999)),
            addr,
        ]
        return self.run(cmd, check=False, timeout=timeout + count * 0.2 + 5).returncode == 0

    def pids(self) -> list[int]:
        """Every process currently inside this namespace."""
        proc = _run(["ip", "netns", "pids", self.netns], check=False, timeout=10)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def sysctl(self, key: str, value: str) -> None:
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])


class Host(Namespace):
    """A host with one underlay address, either on the internet or behind a router."""

    def __init__(self, lab: Lab, name: str, addr: str, gateway: str, behind: Router | None):
        super().__init__(lab, name)
        self.addr = addr
        self.gateway = gateway
        self.behind = behind
        self.ifname = f"{lab.prefix}-{name}e"
        self.wg_ifname = f"{lab.prefix}-{name}"


class Router(Namespace):
    """A router between the internet bridge (WAN) and a LAN bridge, NAT or plain."""

    def __init__(
        self,
        lab: Lab,
        name: str,
        *,
        wan_addr: str,
        lan: ipaddress.IPv4Network,
        nat: NatMode,
        block_udp: bool,
    ) -> None:
        super().__init__(lab, name)
        self.wan_addr = wan_addr
        self.lan = lan
        self.lan_addr = str(lan.network_address + 1)
        self.nat = nat
        self.block_udp = block_udp
        self.wan_ifname = f"{lab.prefix}-{name}w"
        self.lan_ifname = f"{lab.prefix}-{name}l"
        self._next_host = 2

    def next_lan_addr(self) -> str:
        addr = self.lan.network_address + self._next_host
        if addr >= self.lan.broadcast_address:
            raise LabError(f"router {self.name}: LAN {self.lan} is full")
        self._next_host += 1
        return str(addr)


# --------------------------------------------------------------------------- the lab


class Lab:
    """A throw-away topology of network namespaces; use as a context manager."""

    def __init__(self, *, prefix: str | None = None, workdir: Path | str | None = None) -> None:
        self.prefix = prefix or f"wg{secrets.token_hex(2)}"
        if not PREFIX_RE.match(self.prefix + "-"):
            raise LabError(f"lab prefix {self.prefix!r} must look like wg + 4 hex digits")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"wiregate-lab-{self.prefix}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.internet = Namespace(self, "inet")
        self.hosts: dict[str, Host] = {}
        self.routers: dict[str, Router] = {}
        self.processes: list[Process] = []
        self._namespaces: list[Namespace] = []
        self._next_wan = 10
        self._started = False

    # -- lifecycle

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def start(self) -> None:
        """Sweep stale runs, claim the prefix and build the internet namespace."""
        sweep_stale()
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        (OWNER_DIR / self.prefix).write_text(_owner_token(os.getpid()))
        self._started = True
        try:
            inet = self._add_namespace(self.internet)
            add_bridge(inet, "br0")
            inet.run(["ip", "addr", "add", f"{INTERNET_GATEWAY}/24", "dev", "br0"])
            inet.run(["ip", "link", "set", "br0", "up"])
            inet.sysctl("net.ipv4.ip_forward", "1")
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        """Stop every process, delete every namespace, link and socket of this lab. Idempotent."""
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.stop(timeout=5.0)
        _destroy_prefix(self.prefix)
        if self._own_workdir and os.environ.get("WIREGATE_LAB_KEEP") is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._started = False

    # -- topology

    def _add_namespace(self, ns: Namespace) -> Namespace:
        _run(["ip", "netns", "add", ns.netns])
        self._namespaces.append(ns)
        ns.run(["ip", "link", "set", "lo", "up"])
        return ns

    def _check_name(self, name: str) -> None:
        if not NAME_RE.match(name):
            raise LabError(f"lab name {name!r} must be 1-7 lower-case letters or digits")
        if name == "inet" or name in self.hosts or name in self.routers:
            raise LabError(f"lab name {name!r} is already taken")

    def _next_internet_addr(self) -> str:
        addr = INTERNET.network_address + self._next_wan
        if addr >= INTERNET.broadcast_address:
            raise LabError("the internet subnet is full")
        self._next_wan += 1
        return str(addr)

    def _veth(
        self, inner: Namespace, inner_if: str, outer: Namespace, outer_if: str, bridge: str
    ) -> None:
        _run(["ip", "link", "add", inner_if, "netns", inner.netns, "type", "veth",
              "peer", "name", outer_if, "netns", outer.netns])  # fmt: skip
        outer.run(["ip", "link", "set", outer_if, "master", bridge, "up"])
        inner.run(["ip", "link", "set", inner_if, "up"])

    def add_router(self, name: str, nat: NatMode = "eim", block_udp: bool = False) -> Router:
        """A router with a WAN leg on the internet and a LAN bridge for hosts behind it.

        ``nat``: ``eim`` = MASQUERADE (endpoint-independent mapping), ``symmetric`` =
        ``MASQUERADE --random-fully``, ``none`` = plain routing (the internet gets a
        route to the LAN). ``block_udp`` drops all UDP forwarded between LAN and WAN.
        """
        self._check_name(name)
        index = len(self.routers)
        pool = LAN_POOLS[index // 8]
        lan = list(pool.subnets(new_prefix=27))[index % 8]
        router = Router(self, name, wan_addr=self._next_internet_addr(), lan=lan, nat=nat,
                        block_udp=block_udp)  # fmt: skip
        self.routers[name] = router
        self._add_namespace(router)
        self._veth(router, router.wan_ifname, self.internet, f"{self.prefix}-{name}x", "br0")
        router.run(["ip", "addr", "add", f"{router.wan_addr}/24", "dev", router.wan_ifname])
        router.run(["ip", "route", "add", "default", "via", INTERNET_GATEWAY])
        add_bridge(router, router.lan_ifname)
        router.run(
            ["ip", "addr", "add", f"{router.lan_addr}/{lan.prefixlen}", "dev", router.lan_ifname]
        )
        router.run(["ip", "link", "set", router.lan_ifname, "up"])
        router.sysctl("net.ipv4.ip_forward", "1")
        self._configure_nat(router)
        return router

    def _configure_nat(self, router: Router) -> None:
        if router.nat == "none":
            self.internet.run(["ip", "route", "add", str(router.lan), "via", router.wan_addr])
        else:
            extra = ["--random-fully"] if router.nat == "symmetric" else []
            router.run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", router.wan_ifname,
                        "-j", "MASQUERADE", *extra])  # fmt: skip
        if router.block_udp:
            for direction in ("-i", "-o"):
                router.run(["iptables", "-A", "FORWARD", direction, router.lan_ifname,
                            "-p", "udp", "-j", "DROP"])  # fmt: skip

    def add_host(self, name: str, behind: Router | None = None) -> Host:
        """A host on the internet bridge, or on ``behind``'s LAN (default route via the router)."""
        self._check_name(name)
        if behind is None:
            addr, gateway, prefixlen = self._next_internet_addr(), INTERNET_GATEWAY, 24
            outer, bridge = self.internet, "br0"
        else:
            addr, gateway, prefixlen = behind.next_lan_addr(), behind.lan_addr, behind.lan.prefixlen
            outer, bridge = behind, behind.lan_ifname
        host = Host(self, name, addr, gateway, behind)
        self.hosts[name] = host
        self._add_namespace(host)
        self._veth(host, host.ifname, outer, f"{self.prefix}-{name}p", bridge)
        host.run(["ip", "addr", "add", f"{addr}/{prefixlen}", "dev", host.ifname])
        host.run(["ip", "route", "add", "default", "via", gateway])
        return host

    # -- diagnostics

    def logs(self, tail: int = 6000) -> str:
        """The tail of every spawned process's log, for printing when a test fails."""
        parts = []
        for proc in self.processes:
            state = "running" if proc.alive() else f"exited {proc.returncode}"
            parts.append(
                f"===== {proc.name} (pid {proc.pid}, {state}) {proc.log}\n{proc.output(tail)}"
            )
        return "\n".join(parts)


# --------------------------------------------------------------------------- cleanup


def _owner_token(pid: int) -> str:
    """``pid starttime``: survives pid reuse checks."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return f"{pid} ?"
    return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"


def _owner_alive(prefix: str) -> bool:
    try:
        token = (OWNER_DIR / prefix).read_text().split()
    except OSError:
        return False
    if len(token) != 2 or not token[0].isdigit():
        return False
    return _owner_token(int(token[0])).split() == token


def _wireguard_go_pids(prefix_re: re.Pattern[str]) -> list[int]:
    """Pids of wireguard-go processes whose interface argument matches ``prefix_re``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_wg = bool(argv) and Path(argv[0].decode(errors="replace")).name == "wireguard-go"
        if is_wg and any(prefix_re.match(a.decode(errors="replace")) for a in argv[1:]):
            pids.append(int(entry.name))
    return pids


def add_bridge(ns: Namespace, name: str) -> None:
    """Add the bridge ``name`` in ``ns`` with a fixed address of its own: a bridge left
    to itself takes its lowest port's address, which changes as ports come and go, and
    neighbours holding the old one in their ARP caches lose it for up to a minute."""
    address = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
    ns.run(["ip", "link", "add", name, "address", address, "type", "bridge"])


def _kill_all(pids: Sequence[int], grace: float = 3.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                alive.append(pid)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            time.sleep(0.05)
        pids = alive
        if not pids:
            return


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _lab_netns() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _root_links() -> list[str]:
    out = _run(["ip", "-o", "link", "show"], check=False, timeout=10).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _destroy_prefix(prefix: str) -> None:
    """Remove every process, namespace, root link, socket and marker of ``prefix``."""
    pattern = re.compile(rf"^{re.escape(prefix)}-")
    namespaces = [ns for ns in _lab_netns() if pattern.match(ns)]
    pids: set[int] = set(_wireguard_go_pids(pattern))
    for ns in namespaces:
        out = _run(["ip", "netns", "pids", ns], check=False, timeout=10).stdout
        pids.update(int(p) for p in out.split() if p.isdigit())
    pids.discard(os.getpid())
    _kill_all(sorted(pids))
    for ns in namespaces:
        _run(["ip", "netns", "del", ns], check=False, timeout=10)
    for link in _root_links():
        if pattern.match(link):
            _run(["ip", "link", "del", link], check=False, timeout=10)
    for sock in WG_RUN_DIR.glob(f"{prefix}-*"):
        sock.unlink(missing_ok=True)
    (OWNER_DIR / prefix).unlink(missing_ok=True)


def sweep_stale() -> list[str]:
    """Destroy leftovers of lab runs whose owner process is gone; return their prefixes."""
    found: set[str] = set()
    names = [*_lab_netns(), *_root_links()]
    names += [p.name for p in WG_RUN_DIR.glob("wg*")] if WG_RUN_DIR.is_dir() else []
    names += [p.name + "-" for p in OWNER_DIR.glob("wg*")] if OWNER_DIR.is_dir() else []
    for name in names:
        if m := PREFIX_RE.match(name):
            found.add(m.group(1))
    for pid in _wireguard_go_pids(PREFIX_RE):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        for arg in argv[1:]:
            if m := PREFIX_RE.match(arg.decode(errors="replace")):
                found.add(m.group(1))
    stale = sorted(p for p in found if not _owner_alive(p))
    for prefix in stale:
        _destroy_prefix(prefix)
    return stale


def lab_leftovers(prefix: str) -> Iterator[str]:
    """Anything of ``prefix`` still present (namespaces, links, sockets, wireguard-go)."""
    pattern = re.compile(rf"^{re.escape(prefix)}-")
    yield from (f"netns {ns}" for ns in _lab_netns() if pattern.match(ns))
    yield from (f"link {ln}" for ln in _root_links() if pattern.match(ln))
    if WG_RUN_DIR.is_dir():
        yield from (f"socket {s}" for s in WG_RUN_DIR.glob(f"{prefix}-*"))
    yield from (f"wireguard-go pid {p}" for p in _wireguard_go_pids(pattern))


# --------------------------------------------------------------------------- wiregate in the lab

GATEWAY_PORT = 8080
METRICS_PORT = 9090
WG_PORT = 51820


def wiregate_command() -> list[str]:
    """How to start the ``wiregate`` CLI of this checkout (the virtualenv's entry point)."""
    exe = Path(sys.executable).with_name("wiregate")
    if exe.exists():
        return [str(exe)]
    code = "import sys; from wiregate.cli.main import main; sys.exit(main())"
    return [sys.executable, "-c", code]


def bare(address: str) -> str:
    """``100.64.0.7/32`` -> ``100.64.0.7``."""
    return address.split("/", 1)[0]


class Agent:
    """One ``wiregate agent`` on a lab host; its directories survive restarts."""

    def __init__(self, host: Host, root: Path, key_file: Path) -> None:
        self.host = host
        self.iface = host.wg_ifname
        self.state_dir = root / "state"
        self.run_dir = root / "run"
        self.key_file = key_file
        self.proc: Process | None = None
        self.restarts = 0


class Wiregate:
    """A wiregate gateway in the lab's internet namespace and agents on lab hosts."""

    def __init__(
        self, lab: Lab, command: Sequence[str] | None = None, *, tls: bool = False
    ) -> None:
        """``tls``: the gateway serves HTTPS with a certificate of a lab CA (lab/tls.py)
        and agents trust that CA with ``--ca-file``."""
        self.lab = lab
        self.cmd = list(command or wiregate_command())
        self.dir = lab.workdir / "gateway"
        self.admin_socket = self.dir / "gw.sock"
        self.server = f"http://{INTERNET_GATEWAY}:{GATEWAY_PORT}"
        self.ca_file: Path | None = None
        self.ca: LabCA | None = None  # a TLS gateway's CA: it can issue the relays' too
        self._tls_pair: tuple[Path, Path] | None = None
        if tls:
            from lab.tls import LabCA

            ca = LabCA.create(lab.workdir / "tls")
            # 127.0.0.1: browsers in the internet namespace reach it there (DNAT, lab/sso.py)
            names = [INTERNET_GATEWAY, "gateway.lab", "127.0.0.1"]
            pair = ca.issue(lab.workdir / "tls", names)
            self.ca_file, self._tls_pair = ca.ca_file, (pair.cert, pair.key)
            self.ca = ca
            self.server = f"https://{INTERNET_GATEWAY}:{GATEWAY_PORT}"
        self.gateway: Process | None = None
        self.gateway_env: dict[str, str] = {}  # WIREGATE_* settings without a flag
        self.agents: dict[str, Agent] = {}
        self._starts = 0
        self.status_timeout = 20.0  # s per `wiregate status`; raise it on a loaded machine

    # -- gateway

    def start_gateway(self, timeout: float = 30.0) -> Process:
        """Start the gateway and wait until ``/readyz`` answers 200."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        self.gateway = self.lab.internet.spawn(
            [*self.cmd, "gateway",
             "--listen", f"{INTERNET_GATEWAY}:{GATEWAY_PORT}",
             "--metrics-listen", f"{INTERNET_GATEWAY}:{METRICS_PORT}",
             "--state-dir", str(self.dir), "--admin-socket", str(self.admin_socket),
             *self._tls_flags()],
            env=self.gateway_env, name=f"gateway{self._starts}",
        )  # fmt: skip
        poll(self._gateway_ready, timeout=timeout, what="gateway /readyz")
        return self.gateway

    def _tls_flags(self) -> list[str]:
        if self._tls_pair is None:
            return []
        cert, key = self._tls_pair
        return ["--tls-cert", str(cert), "--tls-key", str(key)]

    def _gateway_ready(self) -> bool:
        if self.gateway is None or not self.gateway.alive():
            code = None if self.gateway is None else self.gateway.returncode
            raise LabError(f"gateway exited {code}:\n{self.gateway and self.gateway.output(3000)}")
        url = f"{self.server}/readyz"
        ca = ["--cacert", str(self.ca_file)] if self.ca_file is not None else []
        probe = self.lab.internet.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                       "-m", "2", *ca, url], check=False, timeout=10)  # fmt: skip
        return probe.stdout.strip() == "200"

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()

    # -- admin

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``wiregate admin --socket S ARGS`` (a unix socket: no namespace needed)."""
        cmd = [*self.cmd, "admin", "--socket", str(self.admin_socket), *args]
        return _run(cmd, check=check, timeout=30)

    def admin_json(self, *args: str) -> Any:
        return json.loads(self.admin(*args, "--json").stdout)

    def create_key(
        self, *, tags: str = "tag:lab", expiry: str = "1h", reusable: bool = True
    ) -> Path:
        """Create an enrollment key and store its secret in a 0600 file; return the path."""
        flags = ["--reusable"] if reusable else []
        doc = self.admin_json("keys", "create", "--tags", tags, "--expiry", expiry, *flags)
        path = self.lab.workdir / f"key-{doc['key']['id']}"
        write_secret(path, str(doc["secret"]))
        return path

    def devices(self) -> list[dict[str, Any]]:
        return list(self.admin_json("devices", "list")["devices"])

    # -- agents

    def start_agent(
        self,
        host: Host,
        key_file: Path | None = None,
        *,
        backend: str | None = None,
        ca_file: Path | None = None,
    ) -> Agent:
        """Start (or restart, with the same directories) the agent on ``host``.

        ``backend`` (auto, kernel or userspace) is passed as ``--backend`` when given;
        ``ca_file`` as ``--ca-file`` (default: the lab CA of a TLS gateway, if any).
        """
        ca_file = ca_file or self.ca_file
        agent = self.agents.get(host.name)
        if agent is None:
            if key_file is None:
                raise LabError(f"a first start on {host.name} needs an enrollment key file")
            agent = Agent(host, self.lab.workdir / "agents" / host.name, key_file)
            self.agents[host.name] = agent
        elif key_file is not None:
            agent.key_file = key_file
        agent.restarts += 1
        agent.proc = host.spawn(
            [*self.cmd, "agent", "--server", self.server, "--auth-key", f"file:{agent.key_file}",
             "--interface", agent.iface, "--hostname", host.name,
             "--state-dir", str(agent.state_dir), "--run-dir", str(agent.run_dir),
             "--listen-port", str(WG_PORT), "--log-format", "json",
             *(["--backend", backend] if backend else []),
             *(["--ca-file", str(ca_file)] if ca_file else [])],
            name=f"agent-{host.name}-{agent.restarts}",
        )  # fmt: skip
        return agent

    def status(self, agent: Agent) -> dict[str, Any]:
        """``wiregate status --json`` of ``agent``."""
        cmd = [*self.cmd, "status", "--run-dir", str(agent.run_dir), "--json"]
        return dict(json.loads(agent.host.run(cmd, timeout=self.status_timeout).stdout))

    def statuses(self, agents: Sequence[Agent]) -> dict[str, dict[str, Any]]:
        """``status`` of several agents at once (each is a CLI process of its own)."""
        with ThreadPoolExecutor(max_workers=max(1, len(agents))) as pool:
            docs = list(pool.map(self.status, agents))
        return {agent.host.name: doc for agent, doc in zip(agents, docs, strict=True)}

    def wait_mesh(
        self, agents: Sequence[Agent], timeout: float = 60.0
    ) -> dict[str, dict[str, Any]]:
        """Wait until every agent is connected and has every other agent as a peer."""

        def probe() -> dict[str, dict[str, Any]] | None:
            for agent in agents:
                if agent.proc is not None and not agent.proc.alive():
                    raise LabError(f"agent on {agent.host.name} exited {agent.proc.returncode}")
            statuses = self.statuses(agents)
            ids = {name: st["device"].get("id") for name, st in statuses.items()}
            for name, st in statuses.items():
                want = {i for n, i in ids.items() if n != name}
                have = {p["id"] for p in st["peers"]}
                if not st["gateway"]["connected"] or have != want:
                    return None
            return statuses

        return poll(probe, timeout=timeout, interval=0.5, what="every agent to see the full mesh")

    def tunnel_addresses(self, agent: Agent) -> list[str]:
        """The agent's tunnel addresses (IPv4 first), bare."""
        return [bare(a) for a in self.status(agent)["device"]["addresses"]]


def write_secret(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path`` with mode 0600 from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")


if __name__ == "__main__":
    # ``python -m lab.harness``: remove what crashed lab runs left behind.
    print("swept:", " ".join(sweep_stale()) or "nothing")
