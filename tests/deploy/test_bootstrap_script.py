"""deploy/bootstrap.sh: shellcheck, truncated downloads, bad arguments, the plan, distro
detection, and a whole install / re-run / uninstall against a scratch root.

The scratch runs replace only what the script documents as replaceable
(``WIREGATE_*`` commands): systemctl, the package managers, modprobe and the
Python that creates the virtualenv are small recorders written below, so these
tests need no network and change nothing outside their temporary directory. The
real install (real venv, real agent, a real tunnel) is tests/lab/test_bootstrap.py.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "bootstrap.sh"
DEPLOY_UNIT = REPO / "deploy" / "systemd" / "wiregate-agent.service"
UNIT = "etc/systemd/system/wiregate-agent.service"

RECORDER = """#!/bin/sh
# records its name and arguments; systemctl's answers follow what it was told before
name=$(basename "$0")
echo "$name $*" >> "$LOG_DIR/calls"
state="$LOG_DIR/state"
case "$name $1" in
    "systemctl is-enabled") [ -f "$state.enabled" ] ;;
    "systemctl is-active") [ -f "$state.active" ] ;;
    "systemctl enable") touch "$state.enabled" ;;
    "systemctl start"|"systemctl restart")
        # the agent starts and enrolls, unless told that its key is refused
        [ "${FAKE_ENROLL:-}" = fail ] && exit 0
        touch "$state.active"
        mkdir -p "$WIREGATE_ROOT/var/lib/wiregate/agent"
        echo '{}' > "$WIREGATE_ROOT/var/lib/wiregate/agent/device.json"
        echo '{}' > "$WIREGATE_ROOT/var/lib/wiregate/agent/netmap.json" ;;
    "systemctl disable") rm -f "$state.enabled" "$state.active" ;;
    "modprobe "*) exit 1 ;;
    *) exit 0 ;;
esac
"""

# A stand-in for python3: `-m venv DIR` makes DIR/bin/{python,wiregate}; `-m pip` is recorded.
FAKE_PYTHON = """#!/bin/sh
echo "$(basename "$0") $*" >> "$LOG_DIR/calls"
[ "$1" = -c ] && [ "$(basename "$0")" = "${FAKE_OLD_PYTHON:-}" ] && exit 1  # too old
if [ "$1" = -c ] && [ -n "${4:-}" ]; then  # fetch URL FILE: the gateway's requirements
    [ "${FAKE_FETCH:-}" = fail ] && { echo "urllib.error.HTTPError: HTTP Error 404" >&2; exit 1; }
    printf 'wiregate==%s \\\n    --hash=sha256:%064d\n' "${FAKE_VERSION:-0.1.0}" 0 > "$4"
fi
case "$1 $2" in
    "-m venv")
        mkdir -p "$3/bin" && cp "$0" "$3/bin/python"
        printf '#!/bin/sh\\n' > "$3/bin/wiregate" && chmod +x "$3/bin/wiregate" ;;
    "-m pip")
        env | grep '^PIP_' | sort > "$LOG_DIR/pip-env"
        [ "${FAKE_PIP:-}" = fail ] && { echo "ERROR: no distribution" >&2; exit 1; } ;;
esac
exit 0
"""

DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
OS_RELEASES = {
    "debian": (DEBIAN, "debian family, packages with apt-get"),
    "ubuntu": ("ID=ubuntu\nID_LIKE=debian\nVERSION_ID=24.04\n", "debian family"),
    "rocky": ('ID="rocky"\nID_LIKE="rhel centos fedora"\n', "rhel family, packages with dnf"),
    "almalinux": ('ID="almalinux"\nID_LIKE="rhel centos fedora"\n', "rhel family"),
    "fedora": ("ID=fedora\nVERSION_ID=40\n", "rhel family"),
    "rhel": ('ID="rhel"\nID_LIKE="fedora"\n', "rhel family"),
}


@dataclass
class Sandbox:
    """A scratch root, recorder commands and a secret file, all under ``tmp``."""

    tmp: Path
    root: Path
    logs: Path
    key: Path
    env: dict[str, str]

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True,
                              env={**self.env, **extra}, timeout=60, check=False)  # fmt: skip

    def install(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return self.run("--server", "https://gw.example", "--auth-key", f"file:{self.key}",
                        *args, **extra)  # fmt: skip

    def calls(self) -> list[str]:
        path = self.logs / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def reset_calls(self) -> None:
        (self.logs / "calls").unlink(missing_ok=True)

    def tree(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*"))


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    root, logs, bin_dir, work = (tmp_path / n for n in ("root", "logs", "bin", "work"))
    for d in (root, logs, bin_dir, work):
        d.mkdir()
    for name in ("systemctl", "apt-get", "dnf", "modprobe"):
        _executable(bin_dir / name, RECORDER)
    _executable(bin_dir / "python3", FAKE_PYTHON)
    os_release = tmp_path / "os-release"
    os_release.write_text(DEBIAN)
    key = tmp_path / "key"
    key.write_text("wgk_unit_test_secret\n")
    key.chmod(0o600)
    env = {
        "PATH": os.environ["PATH"],
        "LOG_DIR": str(logs),
        "TMPDIR": str(work),
        "WIREGATE_ROOT": str(root),
        "WIREGATE_OS_RELEASE": str(os_release),
        "WIREGATE_SYSTEMCTL": str(bin_dir / "systemctl"),
        "WIREGATE_APT_GET": str(bin_dir / "apt-get"),
        "WIREGATE_DNF": str(bin_dir / "dnf"),
        "WIREGATE_MODPROBE": str(bin_dir / "modprobe"),
        "WIREGATE_PYTHON": str(bin_dir / "python3"),
        "WIREGATE_TIMESYNC_TIMEOUT": "0",
    }
    return Sandbox(tmp_path, root, logs, key, env)


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _untouched(box: Sandbox) -> None:
    assert box.tree() == [], "the script wrote into the scratch root"
    assert box.calls() == [], "the script ran a command it must not have"
    assert list((box.tmp / "work").iterdir()) == [], "the script left temporary files"


# --------------------------------------------------------------------------- static checks


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: scripts/setup.sh installs it"
    done = subprocess.run([shellcheck, "-s", "sh", str(SCRIPT)], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_posix_sh_parses_it() -> None:
    done = subprocess.run(["sh", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_everything_is_inside_main() -> None:
    lines = [ln for ln in SCRIPT.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "main() {" and lines[-2] == "}" and lines[-1] == 'main "$@"'
    assert len(lines) > 100


# --------------------------------------------------------------------------- truncation


def _cut_points(text: str) -> list[int]:
    """Every line boundary, and a few places in the middle of lines (the last one too)."""
    ends = [m.end() for m in re.finditer("\n", text)]
    middles = [len(text) // k for k in (2, 3, 5, 7, 11, 13)]
    return sorted({0, *ends[:-1], *middles, len(text) - 3, len(text) - 9})


def test_a_truncated_download_runs_nothing(box: Sandbox) -> None:
    text = SCRIPT.read_text()
    cuts = _cut_points(text)
    assert len(cuts) > 300
    prefix = box.tmp / "prefix.sh"
    for cut in cuts:
        prefix.write_text(text[:cut])
        subprocess.run(["sh", str(prefix), "--server", "https://gw.example", "--auth-key",
                        f"file:{box.key}"], capture_output=True, env=box.env, timeout=10,
                       check=False)  # fmt: skip
        assert box.tree() == [] and box.calls() == [], f"a download cut at byte {cut} acted"
    # The same environment does notice a script that runs: the control.
    prefix.write_text(text)
    subprocess.run(["sh", str(prefix), "--server", "https://gw.example", "--auth-key",
                    f"file:{box.key}"], capture_output=True, env=box.env, timeout=60,
                   check=False)  # fmt: skip
    assert box.calls() and box.tree()


# --------------------------------------------------------------------------- bad arguments

BAD_ARGUMENTS = {
    "literal key": (["--server", "https://gw", "--auth-key", "wgk_abcdef"], "not the secret"),
    "literal key =": (["--server=https://gw", "--auth-key=wgk_abcdef"], "not the secret itself"),
    "unknown option": (["--server", "https://gw", "--colour"], "unknown option: --colour"),
    "missing server": (["--auth-key", "file:KEY"], "--server URL is required"),
    "server not a URL": (["--server", "gw.example", "--auth-key", "file:KEY"], "http:// or https://"),
    "missing value": (["--auth-key"], "--auth-key needs a value"),
    "missing key": (["--server", "https://gw"], "--auth-key file:PATH (or env:VAR) is required"),
    "unreadable key": (["--server", "https://gw", "--auth-key", "file:/nonexistent/k"],
                       "cannot read /nonexistent/k"),
    "empty env key": (["--server", "https://gw", "--auth-key", "env:WG_UNSET_VAR"],
                      "WG_UNSET_VAR is empty or unset"),
    "bad env name": (["--server", "https://gw", "--auth-key", "env:A;touch x"],
                     "is not a variable name"),
    "token as env": (["--server", "https://gw", "--auth-key", "file:KEY",
                      "--workload-token", "env:TOKEN"], "--workload-token must be file:PATH"),
    "bad interface": (["--server", "https://gw", "--auth-key", "file:KEY", "--interface",
                       "wg0;reboot"], "--interface: 'wg0;reboot' may use only"),
    "quote in server": (["--server", 'https://gw"x', "--auth-key", "file:KEY"],
                        "must not contain quotes"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_are_refused_and_write_nothing(box: Sandbox, case: str) -> None:
    args, message = BAD_ARGUMENTS[case]
    done = box.run(*(a.replace("KEY", str(box.key)) for a in args))
    assert done.returncode != 0
    assert message in done.stderr and "error:" in done.stderr
    assert "wgk_abcdef" not in done.stderr  # the refused secret is not echoed
    _untouched(box)


def test_a_relative_root_is_refused(box: Sandbox) -> None:
    done = box.install(WIREGATE_ROOT="relative/root")
    assert done.returncode != 0 and "WIREGATE_ROOT must be an absolute path" in done.stderr
    _untouched(box)


# --------------------------------------------------------------------------- the plan


def test_dry_run_prints_the_plan_and_changes_nothing(box: Sandbox) -> None:
    done = box.install("--dry-run")
    assert done.returncode == 0, done.stderr
    plan = done.stdout.splitlines()
    root = box.root
    assert plan == [
        f"would: create the virtualenv {root}/opt/wiregate",
        f"would: install wiregate into {root}/opt/wiregate",
        f"would: link {root}/usr/local/bin/wiregate -> {root}/opt/wiregate/bin/wiregate",
        f"would: write {root}/etc/wiregate/agent.toml",
        f"would: write {root}/etc/wiregate/auth-key",
        f"would: write {root}/{UNIT}",
        "would: reload systemd units",
        "would: enable wiregate-agent.service",
        "would: wait for time synchronisation, then start wiregate-agent.service",
    ]
    calls = box.calls()
    assert all(c.startswith(("modprobe", "systemctl is-", "python3 -c")) for c in calls), calls
    box.reset_calls()
    _untouched(box)


@pytest.mark.parametrize("distro", sorted(OS_RELEASES))
def test_distribution_detection(box: Sandbox, distro: str) -> None:
    text, expected = OS_RELEASES[distro]
    (box.tmp / "os-release").write_text(text)
    done = box.install("--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"distribution: {distro} ({expected}" in done.stderr


def test_os_release_is_read_not_run(box: Sandbox) -> None:
    marker = box.tmp / "ran"
    (box.tmp / "os-release").write_text(f"ID=debian\ntouch {marker}\nID_LIKE=$(touch {marker})\n")
    done = box.install("--dry-run")
    assert done.returncode == 0, done.stderr
    assert "distribution: debian (debian family" in done.stderr and not marker.exists()


def test_unsupported_distribution_is_a_clear_error(box: Sandbox) -> None:
    (box.tmp / "os-release").write_text('ID=alpine\nPRETTY_NAME="Alpine Linux"\n')
    done = box.install()
    assert done.returncode != 0
    assert "unsupported distribution 'alpine'" in done.stderr and "supported: Debian" in done.stderr
    assert box.tree() == []


def _path_without(tmp: Path, *missing: str) -> str:
    """A PATH holding links to this host's tools except ``missing``."""
    bin_dir = tmp / "limited-bin"
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        for tool in Path(directory).glob("*") if Path(directory).is_dir() else []:
            link = bin_dir / tool.name
            if tool.name not in missing and not link.exists() and os.access(tool, os.X_OK):
                link.symlink_to(tool)
    return str(bin_dir)


@pytest.mark.parametrize(
    ("distro", "expected"),
    [
        ("debian", ["apt-get update -q",
                    "apt-get install -y -q --no-install-recommends wireguard-tools wireguard-go"]),
        ("rocky", ["dnf install -y -q wireguard-tools wireguard-go"]),
    ],
)  # fmt: skip
def test_missing_packages_come_from_the_distribution(
    box: Sandbox, distro: str, expected: list[str]
) -> None:
    (box.tmp / "os-release").write_text(OS_RELEASES[distro][0])
    done = box.install(PATH=_path_without(box.tmp, "wg", "wireguard-go"))
    assert done.returncode == 0, done.stderr
    installs = [c for c in box.calls() if c.startswith(("apt-get", "dnf"))]
    assert installs == expected
    recorded = (box.root / "var/lib/wiregate/bootstrap-packages").read_text().split()
    assert recorded == ["wireguard-tools", "wireguard-go"]
    done = box.run("--uninstall")
    assert "packages installed by bootstrap were kept: wireguard-go wireguard-tools" in done.stderr
    assert box.tree() == []


def test_an_old_python3_makes_way_for_python3_11(box: Sandbox) -> None:
    """RHEL 8/9: python3 is 3.6/3.9, python3.11 is installed beside it."""
    fake = box.tmp / "bin" / "python3"
    shutil.copy(fake, box.tmp / "bin" / "python3.11")
    path = f"{box.tmp / 'bin'}:{_path_without(box.tmp, 'python3.11', 'python3.12', 'python3.13')}"
    env = {k: v for k, v in box.env.items() if k != "WIREGATE_PYTHON"}
    done = subprocess.run(["sh", str(SCRIPT), "--server", "https://gw.example", "--auth-key",
                           f"file:{box.key}"], capture_output=True, text=True,
                          env={**env, "PATH": path, "FAKE_OLD_PYTHON": "python3"},
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"python3.11 -m venv {box.root}/opt/wiregate" in box.calls()
    assert not any(c.startswith(("apt-get", "dnf")) for c in box.calls())


def test_no_new_enough_python_is_installed(box: Sandbox) -> None:
    (box.tmp / "os-release").write_text(OS_RELEASES["rocky"][0])
    done = box.install(FAKE_OLD_PYTHON="python3")  # WIREGATE_PYTHON names an old one
    assert done.returncode != 0
    assert "dnf install -y -q python3.11" in box.calls()
    assert "no Python 3.11+ with venv and ensurepip" in done.stderr
    assert box.tree() == []


# --------------------------------------------------------------------------- install, re-run


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_install_writes_private_config_and_a_hardened_unit(box: Sandbox) -> None:
    done = box.install("--interface", "wgvm", "--hostname", "vm-1")
    assert done.returncode == 0, done.stderr
    etc = box.root / "etc/wiregate"
    assert _mode(etc) == 0o700
    assert _mode(etc / "agent.toml") == 0o600 and _mode(etc / "auth-key") == 0o600
    assert (etc / "auth-key").read_text() == box.key.read_text()
    toml = (etc / "agent.toml").read_text()
    assert 'server = "https://gw.example"' in toml
    assert f'auth_key = "file:{etc}/auth-key"' in toml and "wgk_" not in toml
    assert 'interface = "wgvm"' in toml and 'hostname = "vm-1"' in toml
    assert 'backend = "userspace"' in toml  # modprobe wireguard failed
    link = box.root / "usr/local/bin/wiregate"
    assert os.readlink(link) == f"{box.root}/opt/wiregate/bin/wiregate"
    assert _mode(box.root / UNIT) == 0o644
    systemctl = [c.removeprefix("systemctl ") for c in box.calls() if c.startswith("systemctl")]
    assert systemctl == [
        "daemon-reload",
        "is-enabled --quiet wiregate-agent.service",
        "enable --quiet wiregate-agent.service",
        "is-active --quiet wiregate-agent.service",
        "start wiregate-agent.service",
    ]
    assert "start wiregate-agent.service" in done.stderr


def test_env_auth_key_is_copied_to_a_file(box: Sandbox) -> None:
    done = box.run("--server", "https://gw.example", "--auth-key", "env:WG_KEY",
                   WG_KEY="wgk_from_the_environment")  # fmt: skip
    assert done.returncode == 0, done.stderr
    key = box.root / "etc/wiregate/auth-key"
    assert key.read_text() == "wgk_from_the_environment\n" and _mode(key) == 0o600
    assert "wgk_from_the_environment" not in done.stderr + done.stdout


def test_workload_token_is_kept_for_the_agent(box: Sandbox) -> None:
    token = box.tmp / "token"
    token.write_text("eyJhbGciOi.test.token")
    done = box.install("--workload-token", f"file:{token}")
    assert done.returncode == 0, done.stderr
    kept = box.root / "etc/wiregate/workload-token"
    assert kept.read_text() == token.read_text() and _mode(kept) == 0o600
    toml = (box.root / "etc/wiregate/agent.toml").read_text()
    assert f'workload_token = "file:{kept}"' in toml and "eyJ" not in toml


def test_a_workload_token_alone_configures_the_agent(box: Sandbox) -> None:
    token = box.tmp / "token"
    token.write_text("eyJhbGciOi.test.token")
    done = box.run("--server", "https://gw.example", "--workload-token", f"file:{token}")
    assert done.returncode == 0, done.stderr
    etc = box.root / "etc/wiregate"
    toml = (etc / "agent.toml").read_text()
    assert f'workload_token = "file:{etc}/workload-token"' in toml
    assert "auth_key" not in toml and not (etc / "auth-key").exists()
    assert "eyJhbGciOi" not in done.stdout + done.stderr


def test_a_second_run_changes_nothing(box: Sandbox) -> None:
    assert box.install().returncode == 0
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in box.root.rglob("*")}
    box.reset_calls()
    done = box.install()
    assert done.returncode == 0, done.stderr
    after = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in box.root.rglob("*")}
    assert after == before
    assert [c for c in box.calls() if not c.startswith(("modprobe", "python3 -c"))] == [
        "systemctl is-enabled --quiet wiregate-agent.service",
        "systemctl is-active --quiet wiregate-agent.service",
    ]
    assert "is running and up to date" in done.stderr


def test_a_changed_server_updates_the_config_in_place_and_restarts(box: Sandbox) -> None:
    assert box.install().returncode == 0
    box.reset_calls()
    done = box.run("--server", "https://other.example", "--auth-key", f"file:{box.key}")
    assert done.returncode == 0, done.stderr
    assert 'server = "https://other.example"' in (box.root / "etc/wiregate/agent.toml").read_text()
    assert "systemctl restart wiregate-agent.service" in box.calls()
    assert not any(" -m pip " in c for c in box.calls())  # the agent itself did not change


def test_a_new_package_is_installed_over_the_old_one(box: Sandbox) -> None:
    assert box.install().returncode == 0
    box.reset_calls()
    assert box.install("--package", "wiregate==0.2.0").returncode == 0
    pip = [c for c in box.calls() if " -m pip " in c]
    assert len(pip) == 1
    assert pip[0].endswith("install -q --disable-pip-version-check --no-compile wiregate==0.2.0")
    assert "systemctl restart wiregate-agent.service" in box.calls()


MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())


def test_by_default_the_gateway_is_the_only_index(box: Sandbox) -> None:
    """The gateway's pinned, hashed requirements for this machine, its /simple/ index and
    nothing else: no pip configuration file, no PIP_* variable of the environment."""
    done = box.install(PIP_INDEX_URL="http://192.0.2.1/simple/", PIP_FIND_LINKS="/nowhere",
                       PIP_EXTRA_INDEX_URL="http://192.0.2.2/simple/")  # fmt: skip
    assert done.returncode == 0, done.stderr
    url = f"https://gw.example/wheels/requirements-{MACHINE}.txt"
    fetch = [c for c in box.calls() if c.startswith("python3 -c") and "urlopen" in c]
    assert len(fetch) == 1 and fetch[0].split()[-2] == url
    [pip] = [c for c in box.calls() if " -m pip " in c]
    assert re.fullmatch(
        "python -m pip install -q --disable-pip-version-check --no-compile "
        "--index-url https://gw.example/simple/ --only-binary :all: --require-hashes "
        r"-r \S+/requirements\.txt",
        pip,
    ), pip
    assert (box.logs / "pip-env").read_text() == "PIP_CONFIG_FILE=/dev/null\n"
    assert "agent: wiregate 0.1.0 from https://gw.example/simple/ (hashes required)" in done.stderr
    assert list((box.tmp / "work").iterdir()) == []  # the fetched list is gone with WORK


def test_a_new_version_on_the_gateway_is_installed_by_a_re_run(box: Sandbox) -> None:
    assert box.install().returncode == 0
    box.reset_calls()
    assert box.install().returncode == 0
    assert not any(" -m pip " in c for c in box.calls())  # same pins: nothing to do
    done = box.install(FAKE_VERSION="0.2.0")
    assert done.returncode == 0, done.stderr
    assert len([c for c in box.calls() if " -m pip " in c]) == 1
    assert "systemctl restart wiregate-agent.service" in box.calls()


def test_a_gateway_without_a_wheelhouse_is_a_clear_error(box: Sandbox) -> None:
    done = box.install(FAKE_FETCH="fail")
    assert done.returncode == 1
    assert (f"error: cannot fetch https://gw.example/wheels/requirements-{MACHINE}.txt: "
            "urllib.error.HTTPError: HTTP Error 404") in done.stderr  # fmt: skip
    assert "wheelhouse_dir" in done.stderr and "--package SPEC or --find-links DIR" in done.stderr
    assert box.tree() == []
    assert not any(" -m pip " in c or " -m venv " in c for c in box.calls())


def test_find_links_installs_offline(box: Sandbox) -> None:
    wheels = box.tmp / "wheels"
    wheels.mkdir()
    assert box.install("--find-links", str(wheels)).returncode == 0
    pip = [c for c in box.calls() if " -m pip " in c]
    assert pip == [f"python -m pip install -q --disable-pip-version-check --no-compile "
                   f"--no-index --find-links {wheels} wiregate"]  # fmt: skip
    compile_calls = [c for c in box.calls() if "-m compileall" in c]
    assert compile_calls == [f"python -m compileall -q -j 0 {box.root}/opt/wiregate/lib"]
    start = box.calls().index("systemctl start wiregate-agent.service")
    assert box.calls().index(compile_calls[0]) > start  # after the agent started


def test_uninstall_leaves_nothing_behind(box: Sandbox) -> None:
    assert box.install("--workload-token", f"file:{box.key}").returncode == 0
    (box.root / "var/lib/wiregate/agent").mkdir(exist_ok=True)  # the agent's, as it runs
    (box.root / "var/lib/wiregate/agent/private.key").write_text("x")
    (box.root / "run/wiregate").mkdir()
    box.reset_calls()
    done = box.run("--uninstall")
    assert done.returncode == 0, done.stderr
    assert box.tree() == []
    assert "systemctl disable --now --quiet wiregate-agent.service" in box.calls()
    again = box.run("--uninstall")
    assert again.returncode == 0 and "nothing to remove" in again.stderr


def test_a_failed_package_install_rolls_a_first_install_back(box: Sandbox) -> None:
    done = box.install(FAKE_PIP="fail")
    assert done.returncode == 1
    assert "error: could not install wiregate" in done.stderr
    assert "removing what this run installed" in done.stderr
    assert box.tree() == []
    assert not any(c.startswith("systemctl") and "is-" not in c for c in box.calls())


def test_a_refused_enrollment_rolls_a_first_install_back(box: Sandbox) -> None:
    done = box.install(FAKE_ENROLL="fail")
    assert done.returncode == 1
    assert "error: the agent could not enroll (the agent exited)" in done.stderr
    assert "nothing is left installed" in done.stderr and "enrollment key" in done.stderr
    assert box.tree() == []
    assert "systemctl disable --now --quiet wiregate-agent.service" in box.calls()


def test_a_refused_enrollment_keeps_an_earlier_install(box: Sandbox) -> None:
    assert box.install().returncode == 0
    for name in ("device.json", "netmap.json"):  # say the device was removed
        (box.root / "var/lib/wiregate/agent" / name).unlink()
    (box.logs / "state.active").unlink()
    done = box.install(FAKE_ENROLL="fail")
    assert done.returncode == 1 and "the previous installation was kept" in done.stderr
    assert (box.root / "etc/wiregate/agent.toml").exists()


def test_uninstall_keeps_directories_it_did_not_make(box: Sandbox) -> None:
    (box.root / "etc/systemd/system").mkdir(parents=True)
    (box.root / "usr/local/bin").mkdir(parents=True)
    (box.root / "usr/local/bin/other-tool").write_text("")
    assert box.install().returncode == 0
    assert box.run("--uninstall").returncode == 0
    assert box.tree() == ["etc", "etc/systemd", "etc/systemd/system", "usr", "usr/local",
                          "usr/local/bin", "usr/local/bin/other-tool"]  # fmt: skip


def test_without_systemd_it_says_how_to_start(box: Sandbox) -> None:
    done = box.install(WIREGATE_SYSTEMCTL="")  # as on a host where systemd is not PID 1
    assert done.returncode == 0, done.stderr
    assert "systemd is not running: start the agent yourself" in done.stderr
    assert not any(c.startswith("systemctl") for c in box.calls())


# --------------------------------------------------------------------------- the unit


def _unit_directives(text: str) -> dict[str, str]:
    joined = text.replace("\\\n", " ")
    pairs = (ln.split("=", 1) for ln in joined.splitlines() if "=" in ln and ln[0] != "#")
    return {k: " ".join(v.split()) for k, v in pairs}


def test_the_unit_matches_the_shipped_one(box: Sandbox) -> None:
    assert box.install().returncode == 0
    written = _unit_directives((box.root / UNIT).read_text())
    shipped = _unit_directives(DEPLOY_UNIT.read_text())
    for key in ("ExecStart", "Description"):
        written.pop(key), shipped.pop(key)
    assert written == shipped


def test_the_unit_verifies(box: Sandbox) -> None:
    assert box.install().returncode == 0
    text = (
        (box.root / UNIT)
        .read_text()
        .replace(
            f"{box.root}/usr/local/bin/wiregate", str(Path(sys.executable).with_name("wiregate"))
        )
    )
    copy = box.tmp / "wiregate-agent.service"
    copy.write_text(text)
    verifier = shutil.which("systemd-analyze")
    assert verifier, "systemd-analyze is missing: scripts/setup.sh installs systemd"
    done = subprocess.run([verifier, "verify", str(copy)], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert done.returncode == 0 and copy.name not in done.stderr, done.stderr
    exec_start = _unit_directives(text)["ExecStart"]
    assert "auth-key" not in exec_start and "wgk_" not in exec_start


# --------------------------------------------------------------------------- cloud-init


def test_the_cloud_init_example() -> None:
    path = REPO / "deploy" / "cloud-init" / "wiregate-vm.yaml"
    text = path.read_text()
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    (key_file,) = doc["write_files"]
    assert key_file["permissions"] == "0600" and key_file["owner"] == "root:root"
    assert key_file["content"].startswith("wgk_")
    command = doc["runcmd"][0][-1]
    assert f"--auth-key file:{key_file['path']}" in command
    assert "/bootstrap.sh | sh -s -- --server https://" in command
    assert key_file["content"].strip() not in command  # the key only in the 0600 file
    assert doc["runcmd"][-1] == ["rm", "-f", key_file["path"]]
