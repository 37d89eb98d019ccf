"""The container image (deploy/Containerfile, built by ``scripts/image.sh``), run for real
with ``buildah run --isolation chroot``: its version, default user and bootstrap script;
the gateway from the image answering /readyz on loopback; and, in the network-namespace
lab, a gateway, a relay and an agent from the image in one mesh with a lab agent."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from lab.harness import INTERNET_GATEWAY, WG_PORT, Lab, LabError, poll
from lab.image import (
    IMAGE_GID,
    IMAGE_UID,
    RELAY_STUN_PORT,
    Container,
    Image,
    ImageWiregate,
    project_version,
    readyz,
)

pytestmark = [pytest.mark.image, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
STATE = "/var/lib/wiregate/gateway"  # the gateway's default state dir in the image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the image itself


def test_version_is_the_package_version(container: Container) -> None:
    out = container.run(["wiregate", "--version"]).stdout
    assert out.strip() == f"wiregate, version {project_version()}"


def test_default_user_is_10001(image: Image, container: Container) -> None:
    config = image.config()
    assert config.get("User") == f"{IMAGE_UID}:{IMAGE_GID}"
    assert config.get("Entrypoint") == ["wiregate"]
    assert container.run(["id", "-u"]).stdout.strip() == str(IMAGE_UID)
    assert container.run(["id", "-g"]).stdout.strip() == str(IMAGE_GID)


def test_bootstrap_script_is_the_repositorys(container: Container) -> None:
    code = (
        "import sys; from gateway.api import bootstrap; "
        "sys.stdout.buffer.write(bootstrap._PACKAGED.read_bytes())"
    )
    proc = subprocess.run(
        container.command(["python3", "-c", code]), capture_output=True, timeout=60, check=True
    )
    assert proc.stdout == (REPO / "deploy" / "bootstrap.sh").read_bytes()


def test_dataplane_tools_are_in_the_image(container: Container) -> None:
    for tool in ("wg", "wireguard-go", "ip", "nft", "iptables"):
        container.run(["sh", "-c", f"command -v {tool}"])


# --------------------------------------------------------------------------- the gateway


def test_gateway_from_the_image_answers_readyz(container: Container, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, IMAGE_UID, IMAGE_GID)
    port, metrics = free_port(), free_port()
    cmd = container.command(
        ["wiregate", "gateway", "--listen", f"127.0.0.1:{port}",
         "--metrics-listen", f"127.0.0.1:{metrics}", "--state-dir", STATE],
        mounts={state: STATE},
    )  # fmt: skip
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise LabError(f"gateway exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            return readyz(f"http://127.0.0.1:{port}/readyz") == 200

        poll(ready, timeout=60, what="the image's gateway /readyz")
        assert readyz(f"http://127.0.0.1:{metrics}/metrics") == 200
        # The image's wheelhouse is served to VMs: wiregate's wheel and the pinned lists.
        base = f"http://127.0.0.1:{port}"
        assert readyz(f"{base}/simple/wiregate/") == 200
        for machine in ("x86_64", "aarch64"):
            assert readyz(f"{base}/wheels/requirements-{machine}.txt") == 200
        # Its state lives in the mounted dir, written by the image's user.
        db = state / "wiregate.db"
        assert db.exists() and db.stat().st_uid == IMAGE_UID
        assert (state / "relay-signing.key").stat().st_mode & 0o077 == 0
        # `wiregate admin` in the container finds the admin socket (the image's default).
        listed = json.loads(
            container.run(["wiregate", "admin", "devices", "list", "--json"]).stdout
        )
        assert listed == {"devices": []}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    # Nothing of the gateway keeps running after its process group is stopped.
    time.sleep(0.5)
    assert readyz(f"http://127.0.0.1:{port}/readyz", timeout=1) is None


# --------------------------------------------------------------------------- the lab


@pytest.mark.lab
def test_lab_mesh_from_the_image(lab: Lab, image: Image) -> None:
    """Gateway, relay and one agent from the image, one agent from the checkout: the
    agents mesh, ping each other across the tunnel, and see the image's relay."""
    with ImageWiregate(lab, image) as wg:
        wg.plan_relay("r1")
        wg.start_gateway()
        relay = wg.start_relay(lab.internet, "r1")
        key = wg.create_key()
        from_image = wg.start_image_agent(lab.add_host("img"), key)
        normal = wg.start_agent(lab.add_host("lab"), key)
        wg.wait_mesh([from_image, normal], timeout=90)

        img_addr = wg.tunnel_addresses(from_image)[0]
        lab_addr = wg.tunnel_addresses(normal)[0]
        assert poll(lambda: normal.host.ping(img_addr), timeout=30, what="lab -> image agent")
        assert poll(lambda: from_image.host.ping(lab_addr), timeout=30, what="image -> lab")

        # The image's wireguard-go serves the image agent's interface on the shared socket.
        shown = from_image.host.run(["wg", "show", from_image.iface, "peers"]).stdout.split()
        assert len(shown) == 1

        # The gateway hands out the image's relay and the lab agent reaches it.
        stun = f"{INTERNET_GATEWAY}:{RELAY_STUN_PORT}"
        cmd = [*wg.cmd, "netcheck", "--state-dir", str(normal.state_dir), "--json",
               "--server", wg.server, "--stun", stun, "--port", str(WG_PORT)]  # fmt: skip
        doc = json.loads(normal.host.run(cmd, timeout=60).stdout)
        by_id = {r["id"]: r for r in doc["relays"]}
        assert by_id["r1"]["reachable"] is True, doc
        assert relay.alive() and wg.gateway is not None and wg.gateway.alive()
        assert len(wg.devices()) == 2
