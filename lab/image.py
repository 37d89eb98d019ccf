"""wiregate processes from the container image (deploy/Containerfile), built by
``scripts/image.sh``, run without a container engine: ``buildah run --isolation chroot``
runs a command inside the image's root but in the caller's network namespace, so
``ip netns exec NS buildah run …`` puts it on a lab host.

Every host directory a process needs is bind-mounted at the same path inside the
image, so the paths in its flags, and the sockets it creates (the gateway's admin
socket, the agent's status socket), are the same for the checkout's ``wiregate admin``
and ``wiregate status`` on the host. An agent from the image also gets ``/dev/net/tun``
(wireguard-go creates its TUN device) and ``/var/run/wireguard`` (the UAPI sockets,
where ``wg`` and the lab's teardown find them), runs as root with CAP_NET_ADMIN.

    image = Image.default()
    with Lab() as lab, ImageWiregate(lab, image) as wg:
        wg.plan_relay("r1")              # the gateway is started knowing its relays
        wg.start_gateway()
        relay = wg.start_relay(lab.internet, "r1")   # trusts the gateway's signer
        agent = wg.start_image_agent(lab.add_host("h1"), wg.create_key())
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from lab.harness import (
    GATEWAY_PORT,
    INTERNET_GATEWAY,
    METRICS_PORT,
    WG_PORT,
    WG_RUN_DIR,
    Agent,
    Host,
    Lab,
    LabError,
    Namespace,
    Process,
    Wiregate,
    _run,
    poll,
    wiregate_command,
)

__all__ = [
    "IMAGE_GID",
    "IMAGE_UID",
    "Container",
    "Image",
    "ImageWiregate",
    "image_requirements",
    "project_version",
    "readyz",
]

REPO = Path(__file__).resolve().parent.parent
IMAGE_UID = IMAGE_GID = 10001  # the image's default user, `wiregate`
TUN = "/dev/net/tun"
# /var/run/wireguard in the image, named by its real path: a bind mount onto a path
# through the /var/run -> /run symlink is hidden by the /run that buildah mounts.
IMAGE_WG_RUN_DIR = "/run/wireguard"
RELAY_CONTROL_PORT = 3480
RELAY_STUN_PORT = 3478
RELAY_PORTS = "40000-40009"


def project_version() -> str:
    """The version in pyproject.toml, which the image is tagged with."""
    with (REPO / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def image_requirements() -> str | None:
    """Why images cannot be run here, or None when they can."""
    if shutil.which("buildah") is None:
        return "buildah is not installed (sh scripts/image.sh installs it and builds the image)"
    return None


class Image:
    """A local image, e.g. ``localhost/wiregate:0.1.0``."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def default(cls) -> Image:
        """``$WIREGATE_IMAGE``, else ``localhost/wiregate:<version>`` (scripts/image.sh)."""
        return cls(os.environ.get("WIREGATE_IMAGE") or f"localhost/wiregate:{project_version()}")

    def exists(self) -> bool:
        proc = _run(["buildah", "inspect", "--type", "image", self.name], check=False)
        return proc.returncode == 0

    def config(self) -> dict[str, object]:
        """The image's OCI config (User, Entrypoint, Env, ...)."""
        doc = json.loads(_run(["buildah", "inspect", "--type", "image", self.name]).stdout)
        return dict(doc["OCIv1"]["config"])

    def container(self, name: str) -> Container:
        """A new working container of this image (``buildah from``), replacing one of that name."""
        _run(["buildah", "rm", name], check=False)
        _run(["buildah", "from", "--pull-never", "--name", name, self.name], timeout=120)
        return Container(name)


class Container:
    """A buildah working container; each command runs in it with ``buildah run``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def command(
        self,
        args: Sequence[str],
        *,
        mounts: Mapping[Path | str, str] | None = None,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        caps: Sequence[str] = (),
    ) -> list[str]:
        """The ``buildah run`` command line for ``args`` (host path -> ``path[:options]``)."""
        cmd = ["buildah", "run", "--isolation", "chroot"]
        for host_path, target in (mounts or {}).items():
            cmd += ["-v", f"{host_path}:{target}"]
        if user is not None:
            cmd += ["--user", user]
        for key, value in (env or {}).items():
            cmd += ["--env", f"{key}={value}"]
        for cap in caps:
            cmd += ["--cap-add", cap]
        return [*cmd, self.name, "--", *args]

    def run(
        self,
        args: Sequence[str],
        *,
        timeout: float = 60.0,
        check: bool = True,
        mounts: Mapping[Path | str, str] | None = None,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` in the container in this (the host's) namespace and wait for it."""
        cmd = self.command(args, mounts=mounts, user=user)
        return _run(cmd, timeout=timeout, check=check)

    def spawn(
        self,
        ns: Namespace,
        args: Sequence[str],
        *,
        name: str,
        mounts: Mapping[Path | str, str] | None = None,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        caps: Sequence[str] = (),
    ) -> Process:
        """Start ``args`` in the container inside namespace ``ns`` (logged like any lab
        process, stopped by the lab's teardown)."""
        cmd = self.command(args, mounts=mounts, user=user, env=env, caps=caps)
        return ns.spawn(cmd, name=name)

    def remove(self) -> None:
        _run(["buildah", "rm", self.name], check=False, timeout=60)


def _same_path(*paths: Path, options: str = "") -> dict[Path | str, str]:
    suffix = f":{options}" if options else ""
    return {path: f"{path}{suffix}" for path in paths}


class ImageWiregate(Wiregate):
    """:class:`lab.harness.Wiregate` with its gateway, a relay and some agents from the image.

    ``start_agent`` still starts the checkout's agent (a normal lab agent), so both kinds
    join one mesh; ``admin`` and ``status`` use the checkout's CLI on the shared sockets.
    """

    def __init__(self, lab: Lab, image: Image) -> None:
        super().__init__(lab, wiregate_command())
        self.image = image
        self.containers: list[Container] = []
        self.processes: list[Process] = []  # started from the image
        self.relays: dict[str, str] = {}  # id -> control HOST:PORT

    def __enter__(self) -> ImageWiregate:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop what runs from the image and remove the working containers."""
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.stop(timeout=5.0)
        for container in self.containers:
            container.remove()
        self.containers.clear()

    def _container(self, role: str) -> Container:
        container = self.image.container(f"{self.lab.prefix}-{role}")
        self.containers.append(container)
        return container

    def _spawn(
        self,
        container: Container,
        ns: Namespace,
        args: Sequence[str],
        *,
        name: str,
        mounts: Mapping[Path | str, str] | None = None,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        caps: Sequence[str] = (),
    ) -> Process:
        proc = container.spawn(ns, args, name=name, mounts=mounts, user=user, env=env, caps=caps)
        self.processes.append(proc)
        return proc

    # -- gateway

    def start_gateway(self, timeout: float = 60.0) -> Process:
        """The gateway from the image (uid 10001) in the internet namespace; waits for /readyz.

        Its state dir (with the admin socket) is bind-mounted at the same path, so
        :meth:`admin` works unchanged; the relays added with :meth:`start_relay` before
        are configured (``WIREGATE_RELAYS``).
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.dir, IMAGE_UID, IMAGE_GID)
        self.dir.chmod(0o700)
        self._starts += 1
        container = self._container(f"gw{self._starts}")
        env = {"WIREGATE_RELAYS": json.dumps([f"{i}={c}" for i, c in self.relays.items()])}
        self.gateway = self._spawn(
            container,
            self.lab.internet,
            ["wiregate", "gateway",
             "--listen", f"{INTERNET_GATEWAY}:{GATEWAY_PORT}",
             "--metrics-listen", f"{INTERNET_GATEWAY}:{METRICS_PORT}",
             "--state-dir", str(self.dir), "--admin-socket", str(self.admin_socket)],
            name=f"image-gateway{self._starts}",
            mounts=_same_path(self.dir),
            env=env,
        )  # fmt: skip
        poll(self._gateway_ready, timeout=timeout, what="gateway (image) /readyz")
        return self.gateway

    def signers_file(self) -> Path:
        """The running gateway's relay signers (``GET /api/v1/relay/signers``) in a file."""
        url = f"{self.server}/api/v1/relay/signers"
        doc = self.lab.internet.run(["curl", "-sf", "-m", "5", url], timeout=15).stdout
        path = self.lab.workdir / "relay-signers.json"
        path.write_text(json.dumps(json.loads(doc)))
        path.chmod(0o644)
        return path

    # -- relay

    def plan_relay(self, relay_id: str = "r1", addr: str = INTERNET_GATEWAY) -> str:
        """Name a relay the next gateway start is configured with; returns its control address."""
        control = f"{addr}:{RELAY_CONTROL_PORT}"
        self.relays[relay_id] = control
        return control

    def start_relay(
        self, ns: Namespace, relay_id: str = "r1", addr: str = INTERNET_GATEWAY
    ) -> Process:
        """The relay from the image (uid 10001) in ``ns``, trusting the running gateway's
        ticket signer; waits until it forwards."""
        control = self.relays.get(relay_id) or self.plan_relay(relay_id, addr)
        keys = self.signers_file()
        container = self._container(f"relay-{relay_id}")
        relay = self._spawn(
            container,
            ns,
            ["wiregate", "relay", "--stun-listen", f"{addr}:{RELAY_STUN_PORT}",
             "--relay-id", relay_id, "--relay-listen", control, "--relay-ports", RELAY_PORTS,
             "--verify-keys-file", str(keys), "--metrics-listen", "127.0.0.1:9091"],
            name=f"image-relay-{relay_id}",
            mounts=_same_path(keys, options="ro"),
        )  # fmt: skip
        poll(lambda: "relay forwarding" in relay.output(), timeout=30, what="relay forwarding")
        return relay

    # -- agents

    def start_image_agent(
        self, host: Host, key_file: Path | None = None, *, backend: str = "userspace"
    ) -> Agent:
        """The agent from the image on ``host``: root with CAP_NET_ADMIN, wireguard-go from
        the image on ``/dev/net/tun``, its UAPI socket in the host's ``/var/run/wireguard``."""
        agent = self.agents.get(host.name)
        if agent is None:
            if key_file is None:
                raise LabError(f"a first start on {host.name} needs an enrollment key file")
            agent = Agent(host, self.lab.workdir / "agents" / host.name, key_file)
            self.agents[host.name] = agent
        elif key_file is not None:
            agent.key_file = key_file
        agent.restarts += 1
        for path in (agent.state_dir, agent.run_dir):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        WG_RUN_DIR.mkdir(parents=True, exist_ok=True)
        container = self._container(f"ag-{host.name}")
        agent.proc = self._spawn(
            container,
            host,
            ["wiregate", "agent", "--server", self.server,
             "--auth-key", f"file:{agent.key_file}",
             "--interface", agent.iface, "--hostname", host.name,
             "--state-dir", str(agent.state_dir), "--run-dir", str(agent.run_dir),
             "--listen-port", str(WG_PORT), "--log-format", "json", "--backend", backend],
            name=f"image-agent-{host.name}-{agent.restarts}",
            mounts={
                **_same_path(agent.state_dir, agent.run_dir),
                **_same_path(agent.key_file, options="ro"),
                TUN: TUN,
                WG_RUN_DIR: IMAGE_WG_RUN_DIR,
            },
            user="0:0",
            caps=["CAP_NET_ADMIN", "CAP_NET_RAW"],
        )  # fmt: skip
        return agent


def readyz(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of ``GET url`` (None when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None
