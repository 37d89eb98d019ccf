"""The first run without surprises: each refused start prints ``error: …`` and
``hint: …``, exits non-zero without a traceback, and changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from agent.gateway_client import ControlClient
from agent.privileges import CAP_NET_ADMIN, require_net_admin
from agent.state import Enrollment, StateDir
from gateway.app import read_admin_token
from gateway.preflight import LOCK_NAME, check_admin_socket
from wiregate.cli.main import main
from wiregate.errors import ConfigError, LocalError
from wiregate.settings import ADMIN_SOCKET, GatewaySettings, load_settings

WIREGATE = Path(sys.executable).with_name("wiregate")
SETPRIV = shutil.which("setpriv")
NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups"]


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def assert_refused(result: Result, *needles: str) -> None:
    """One ``error:`` line, one ``hint:`` line, exit 1, no traceback."""
    out = result.output
    assert result.exit_code == 1, out
    assert "Traceback" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), out
    lines = out.strip().splitlines()
    assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), out
    for needle in needles:
        assert needle in out, out


def assert_refused_text(text: str, *needles: str) -> None:
    assert "Traceback" not in text, text
    lines = [line for line in text.strip().splitlines() if line.startswith(("error: ", "hint: "))]
    assert [line.split(":")[0] for line in lines] == ["error", "hint"], text
    for needle in needles:
        assert needle in text, text


def gateway_args(tmp: Path, **over: str) -> list[str]:
    opts = {
        "--state-dir": str(tmp / "state"),
        "--admin-socket": str(tmp / "run" / "gateway.sock"),
        "--listen": "127.0.0.1:0",
        "--metrics-listen": "127.0.0.1:0",
    }
    opts.update(over)
    return ["gateway", *[item for pair in opts.items() for item in pair]]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory every user may enter (the unprivileged subprocess tests need one)."""
    path = Path(tempfile.mkdtemp(prefix="wiregate-first-run-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def unprivileged(*args: str) -> subprocess.CompletedProcess[str]:
    """``wiregate ARGS`` as an unprivileged user: uid 65534 via setpriv when root."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if SETPRIV is None:
            pytest.skip("needs setpriv to drop root (util-linux)")
        prefix = [SETPRIV, *NOBODY]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"}
    return subprocess.run(
        [*prefix, str(WIREGATE), *args], capture_output=True, text=True, env=env, timeout=60,
        check=False, cwd="/",
    )  # fmt: skip


# -- 1. gateway: ports, directories, a second gateway, the admin socket ---------------


@pytest.mark.parametrize("flag", ["--listen", "--metrics-listen"])
def test_gateway_refuses_a_port_in_use(tmp_path: Path, busy_port: int, flag: str) -> None:
    result = run(*gateway_args(tmp_path, **{flag: f"127.0.0.1:{busy_port}"}))
    assert_refused(result, f"port {busy_port} is already in use", flag)
    assert list(tmp_path.iterdir()) == []  # no state dir, no run dir


def test_gateway_refuses_a_state_dir_it_cannot_create(shared_tmp: Path) -> None:
    root_only = shared_tmp / "root-only"
    root_only.mkdir(mode=0o755)
    if os.geteuid() != 0:
        root_only.chmod(0o555)
    proc = unprivileged(*gateway_args(shared_tmp, **{"--state-dir": str(root_only / "gw")}))
    assert proc.returncode == 1, proc.stderr
    assert_refused_text(proc.stderr, f"state dir {root_only / 'gw'}", "permission denied")
    assert list(root_only.iterdir()) == [] and not (shared_tmp / "run").exists()


def test_gateway_refuses_a_run_dir_it_cannot_create(shared_tmp: Path) -> None:
    state = shared_tmp / "state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    root_only = shared_tmp / "root-only"
    root_only.mkdir(mode=0o755)
    if os.geteuid() != 0:
        root_only.chmod(0o555)
    sock = root_only / "wiregate-gateway" / "gateway.sock"
    proc = unprivileged(*gateway_args(shared_tmp, **{"--admin-socket": str(sock)}))
    assert proc.returncode == 1, proc.stderr
    assert_refused_text(proc.stderr, f"admin socket directory {sock.parent}", "--admin-socket")
    assert list(root_only.iterdir()) == []


def test_gateway_refuses_a_state_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = run(*gateway_args(tmp_path, **{"--state-dir": str(tmp_path / "file" / "gw")}))
    assert_refused(result, f"state dir {tmp_path / 'file' / 'gw'}", "--state-dir")


@pytest.fixture
def running_gateway(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A real ``wiregate gateway`` process on ephemeral ports."""
    args = gateway_args(tmp_path / "first")
    proc = subprocess.Popen(
        [str(WIREGATE), *args, "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sock = tmp_path / "first" / "run" / "gateway.sock"
    try:
        for _ in range(300):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert sock.exists(), proc.stderr.read() if proc.stderr else ""
        yield proc, tmp_path / "first"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_second_gateway_on_the_same_state_dir_is_refused_with_the_holders_pid(
    tmp_path: Path, running_gateway: tuple[subprocess.Popen[str], Path]
) -> None:
    proc, first = running_gateway
    lock = first / "state" / LOCK_NAME
    assert lock.read_text().strip() == str(proc.pid)
    before = sorted(p.name for p in (first / "state").iterdir())
    args = gateway_args(tmp_path / "second", **{"--state-dir": str(first / "state")})
    result = run(*args)
    assert_refused(result, f"pid {proc.pid}", str(first / "state"), "--state-dir")
    assert sorted(p.name for p in (first / "state").iterdir()) == before
    assert not (tmp_path / "second").exists()
    assert proc.poll() is None  # the first one still runs


def test_a_live_admin_socket_is_refused_never_stolen(
    tmp_path: Path, running_gateway: tuple[subprocess.Popen[str], Path]
) -> None:
    proc, first = running_gateway
    sock = first / "run" / "gateway.sock"
    inode = sock.stat().st_ino
    result = run(*gateway_args(tmp_path / "second", **{"--admin-socket": str(sock)}))
    assert_refused(result, f"admin socket {sock} is in use", "--admin-socket")
    assert sock.stat().st_ino == inode  # the same socket, still the first gateway's
    assert not (tmp_path / "second").exists()
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(sock))
    assert proc.poll() is None


def test_a_stale_admin_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "gateway.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound, never listening: its process is gone
    check_admin_socket(path, replace=False)
    assert path.exists()
    check_admin_socket(path, replace=True)
    assert not path.exists()


def test_a_file_at_the_admin_socket_path_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "run" / "gateway.sock"
    path.parent.mkdir()
    path.write_text("not a socket")
    result = run(*gateway_args(tmp_path, **{"--admin-socket": str(path)}))
    assert_refused(result, f"admin socket {path} exists and is not a socket")
    assert path.read_text() == "not a socket"
    assert not (tmp_path / "state").exists()


# -- 2. the agent without CAP_NET_ADMIN ----------------------------------------------


def _status_file(tmp_path: Path, cap_eff: int) -> Path:
    path = tmp_path / "status"
    path.write_text(f"Name:\twiregate\nCapPrm:\t{cap_eff:016x}\nCapEff:\t{cap_eff:016x}\n")
    return path


def test_require_net_admin_reads_bit_12_of_capeff(tmp_path: Path) -> None:
    from agent.privileges import effective_capabilities

    assert effective_capabilities(_status_file(tmp_path, 1 << CAP_NET_ADMIN)) == 1 << 12
    require_net_admin(lambda: 1 << CAP_NET_ADMIN, lambda: None)
    with pytest.raises(LocalError, match="CAP_NET_ADMIN") as refused:
        require_net_admin(lambda: (1 << 13) | (1 << 11), lambda: None)
    assert refused.value.hint and "AmbientCapabilities" in refused.value.hint
    with pytest.raises(LocalError, match="CAP_NET_ADMIN"):
        require_net_admin(lambda: None, lambda: None)  # unreadable: not assumed
    with pytest.raises(LocalError, match="netlink route socket: Address family not supported"):
        require_net_admin(lambda: 1 << CAP_NET_ADMIN, lambda: "Address family not supported")


def test_agent_without_cap_net_admin_never_enrolls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enrolls: list[Any] = []

    async def enroll(self: ControlClient, *args: Any, **kwargs: Any) -> Enrollment:
        enrolls.append(args)
        raise AssertionError("enrolled without CAP_NET_ADMIN")

    monkeypatch.setattr(ControlClient, "enroll", enroll)
    monkeypatch.setattr("agent.privileges.STATUS_PATH", _status_file(tmp_path, 1 << 13))
    key = tmp_path / "auth.key"
    key.write_text("wgk_single_use_secret\n")
    state, rundir = tmp_path / "state", tmp_path / "run"
    result = run(
        "agent", "--server", "http://127.0.0.1:9", "--auth-key", f"file:{key}",
        "--state-dir", str(state), "--run-dir", str(rundir),
    )  # fmt: skip
    assert_refused(result, "CAP_NET_ADMIN", "nothing was enrolled")
    assert enrolls == []
    assert not state.exists() and not rundir.exists()  # no key, no state: nothing spent
    assert key.read_text() == "wgk_single_use_secret\n"


def test_agent_as_an_unprivileged_user_is_refused_before_enrolling(shared_tmp: Path) -> None:
    if os.geteuid() == 0 and SETPRIV is None:
        pytest.skip("needs setpriv to run as uid 65534 (util-linux)")
    key = shared_tmp / "auth.key"
    key.write_text("wgk_single_use_secret\n")
    key.chmod(0o644)
    with socket.socket() as gateway:  # a gateway that would see any enrollment attempt
        gateway.bind(("127.0.0.1", 0))
        gateway.listen()
        gateway.setblocking(False)
        port = gateway.getsockname()[1]
        proc = unprivileged(
            "agent", "--server", f"http://127.0.0.1:{port}", "--auth-key", f"file:{key}",
            "--state-dir", str(shared_tmp / "state"), "--run-dir", str(shared_tmp / "run"),
        )  # fmt: skip
        with pytest.raises(BlockingIOError):
            gateway.accept()  # nobody connected
    assert proc.returncode == 1, proc.stderr
    assert_refused_text(proc.stderr, "CAP_NET_ADMIN", "uid")
    assert not (shared_tmp / "state").exists() and not (shared_tmp / "run").exists()


# -- 3. settings: unknown tables, log level and format --------------------------------


def test_an_unknown_table_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    config = tmp_path / "wiregate.toml"
    config.write_text('[gatway]\nlisten = "127.0.0.1:8080"\n')
    for verb in ("gateway", "agent", "relay"):
        result = run(verb, "--config", str(config))
        assert_refused(result, f"{config}: unknown table [gatway]", "[gateway], [agent], [relay]")
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--log-level", "verbose"], {}, "log_level: 'verbose' is not one of debug, info"),
        (["--log-format", "xml"], {}, "log_format: 'xml' is not one of auto, json, console"),
        ([], {"WIREGATE_LOG_LEVEL": "trace"}, "log_level: 'trace'"),
    ],
)
def test_log_level_and_format_are_checked(
    tmp_path: Path, args: list[str], env: dict[str, str], needle: str
) -> None:
    result = run(*gateway_args(tmp_path), *args, env=env)
    assert_refused(result, needle)
    assert list(tmp_path.iterdir()) == []


def test_log_level_in_the_file_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "wiregate.toml"
    config.write_text('[agent]\nlog_level = "verbose"\n')
    assert_refused(run("agent", "--config", str(config)), "log_level", f"[agent] in {config}")


def test_valid_log_levels_pass_in_any_case() -> None:
    assert load_settings(GatewaySettings, None, log_level="WARNING").log_level == "warning"
    assert load_settings(GatewaySettings, None, log_format="console").log_format == "console"


# -- 4. one admin socket path; wiregate admin --config; credentials --------------------


def test_admin_and_gateway_agree_on_the_admin_socket() -> None:
    assert GatewaySettings.model_fields["admin_socket"].default == ADMIN_SOCKET
    assert str(ADMIN_SOCKET) == "/run/wiregate-gateway/gateway.sock"
    result = run("admin", "keys", "list")  # nothing answers there in the test
    assert_refused(result, f"cannot reach the gateway admin API at {ADMIN_SOCKET}")


def test_admin_config_reads_the_gateways_admin_socket(tmp_path: Path) -> None:
    sock = tmp_path / "gw" / "admin.sock"
    config = tmp_path / "wiregate.toml"
    config.write_text(f'[gateway]\nadmin_socket = "{sock}"\n')
    result = run("admin", "--config", str(config), "devices", "list")
    assert_refused(result, f"cannot reach the gateway admin API at {sock}")
    result = run("admin", "--config", str(config), "--socket", str(tmp_path / "x"), "keys", "list")
    assert_refused(result, f"at {tmp_path / 'x'}")  # the flag wins


def test_admin_config_uses_public_url_and_the_token_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "admin-token").write_text("t" * 32 + "\n")
    config = tmp_path / "wiregate.toml"
    config.write_text(
        f'[gateway]\nadmin_socket = "{tmp_path / "absent.sock"}"\n'
        'public_url = "http://127.0.0.1:9"\nadmin_token_file = "%d/admin-token"\n'
    )
    seen: dict[str, Any] = {}

    async def call(self: Any, method: str, path: str, body: Any = None) -> Any:
        seen.update(base=self._base, headers=dict(self._headers), socket=self._socket)
        return {"keys": []}

    monkeypatch.setattr("wiregate.cli.admin_client.AdminClient.call", call)
    result = run("admin", "--config", str(config), "keys", "list",
                 env={"CREDENTIALS_DIRECTORY": str(creds)})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen == {
        "base": "http://127.0.0.1:9",
        "headers": {"Authorization": "Bearer " + "t" * 32},
        "socket": None,
    }
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    result = run("admin", "--config", str(config), "keys", "list")
    assert_refused(result, "%d/admin-token: $CREDENTIALS_DIRECTORY is not set", "LoadCredential")


def test_gateway_reads_its_admin_token_from_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "admin-token").write_text("s" * 20 + "\n")
    (tmp_path / "admin-token").chmod(0o600)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_admin_token(Path("%d/admin-token")) == b"s" * 20
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        read_admin_token(Path("%d/admin-token"))


def test_gateway_refuses_an_admin_token_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "admin-token"
    token.write_text("s" * 20 + "\n")
    for mode in (0o644, 0o640, 0o604):
        token.chmod(mode)
        with pytest.raises(ConfigError) as caught:
            read_admin_token(token)
        assert caught.value.message == (
            f"admin_token_file {token} is readable by others (mode {mode:04o}; chmod 600 it)"
        )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))  # %d/: the same check
    with pytest.raises(ConfigError, match="is readable by others"):
        read_admin_token(Path("%d/admin-token"))
    token.chmod(0o600)
    assert read_admin_token(Path("%d/admin-token")) == b"s" * 20


# -- 5. login saves the server; agent and netcheck use it ------------------------------


def test_agent_without_server_uses_the_one_login_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.daemon import Agent

    servers: list[str] = []

    async def fake_run(self: Agent) -> None:
        servers.append(self.settings.server)

    monkeypatch.setattr(Agent, "run_until_signalled", fake_run)
    monkeypatch.delenv("WIREGATE_SERVER", raising=False)
    state = StateDir(tmp_path / "state")
    state.ensure()
    state.save_server("https://gw.example:8443")
    assert run("agent", "--state-dir", str(state.path)).exit_code == 0
    assert run("agent", "--state-dir", str(state.path), "--server", "http://x:1").exit_code == 0
    assert servers == ["https://gw.example:8443", "http://x:1"]  # a given --server wins


def test_netcheck_asks_the_given_or_saved_server_for_relays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    async def fetch_relays(server: str, token: str, **_kw: Any) -> tuple[()]:
        asked.append(server)
        return ()

    class Report:
        def to_dict(self) -> dict[str, Any]:
            return {"nat_type": "none", "reflexive": None, "local": None, "evidence": "",
                    "servers": [], "relays": []}  # fmt: skip

    async def run_netcheck(*_args: Any, **_kw: Any) -> Report:
        return Report()

    monkeypatch.setattr("agent.discovery.netcheck.fetch_relays", fetch_relays)
    monkeypatch.setattr("agent.discovery.netcheck.run_netcheck", run_netcheck)
    monkeypatch.delenv("WIREGATE_SERVER", raising=False)
    state = StateDir(tmp_path / "state")
    state.ensure()
    state.save_enrollment(Enrollment("d1", "h", ("100.64.0.1/32",), "wgd_token"))
    state.save_server("https://saved.example")
    base = ["netcheck", "--stun", "127.0.0.1:3478", "--state-dir", str(state.path)]
    assert run(*base, "--server", "https://given.example").exit_code == 0
    assert run(*base).exit_code == 0
    assert asked == ["https://given.example", "https://saved.example"]


def test_state_dir_keeps_the_server(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    assert state.load_server() is None
    state.save_server("https://gw.example")
    assert state.load_server() == "https://gw.example"
    assert json.loads((tmp_path / "server.json").read_text()) == {"server": "https://gw.example"}
    assert (tmp_path / "server.json").stat().st_mode & 0o077 == 0


async def test_login_saves_the_server_it_used(client: Any, clock: Any, tmp_path: Path) -> None:
    from agent.login import login
    from tests.unit.wiregate.test_login_cli import Harness, RecordingClient, approver, no_qr

    server = str(client.make_url("")).rstrip("/")
    state = StateDir(tmp_path / "agent")
    h = Harness(clock)
    h.actions[0] = approver(client)
    await login(RecordingClient(client), state, "laptop", sleep=h.sleep, out=h.out, qr=no_qr,
                server=server)  # fmt: skip
    assert state.load_server() == server
    assert f"wiregate agent --state-dir {state.path}" in h.text  # works: the server is saved
