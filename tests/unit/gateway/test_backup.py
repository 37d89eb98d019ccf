"""Backup and restore of the store (gateway/store/backup.py, ``wiregate backup|restore``)
against real SQLite files: the dialect-independent tests of lab/backup_cases.py, a
running gateway backed up online, the document parser on arbitrary input. What needs
a real PostgreSQL is in tests/service/test_backup_postgres.py."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.store.backup import (
    VERSION_JUMP,
    BackupError,
    decode,
    read_backup,
)
from lab.backup_cases import *  # noqa: F403 (its tests and fixtures, here on SQLite)
from lab.backup_cases import assert_consistent, cli, resealed
from lab.fakes import new_key


@pytest.fixture(params=["sqlite"])
def dialect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- the CLI ---------------------------------------------------------------------------------


def test_commands_are_registered() -> None:
    help_text = cli("--help").output
    assert "backup" in help_text and "restore" in help_text
    assert "Stop the gateway first" in cli("restore", "--help").output


# -- real processes: a running gateway, the installed console script -------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatewayProcess:
    """``wiregate gateway`` on loopback with its state in ``folder``."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        self.port, self.socket = _free_port(), folder / "gw.sock"
        self.config = folder / "gateway.toml"
        self.config.write_text(
            f'[gateway]\nlisten = "127.0.0.1:{self.port}"\n'
            f'metrics_listen = "127.0.0.1:{_free_port()}"\n'
            f'admin_socket = "{self.socket}"\nstate_dir = "{folder / "state"}"\n'
        )
        self.log = folder / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [WIREGATE, "gateway", "--config", str(self.config)], stdout=out, stderr=out
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(OSError):
                if self.http("GET", "/readyz")[0] == 200 and self.socket.exists():
                    return
            time.sleep(0.1)
        self.stop()
        pytest.fail("the gateway did not start:\n" + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None

    def http(self, method: str, path: str, body: Any = None, token: str = "") -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data, method=method)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def enroll(self, secret: str, name: str) -> dict[str, Any]:
        body = {"auth_key": secret, "public_key": new_key(), "name": name}
        status, doc = self.http("POST", "/api/v1/enroll", body)
        assert status == 201, (status, doc)
        return dict(doc)


WIREGATE = shutil.which("wiregate", path=str(Path(sys.executable).parent)) or "wiregate"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WIREGATE, *args], capture_output=True, text=True, timeout=120)


def test_a_running_gateway_is_backed_up_online_and_restored_once_stopped(tmp_path: Path) -> None:
    gw_a, gw_b = GatewayProcess(tmp_path / "a"), GatewayProcess(tmp_path / "b")
    out = tmp_path / "online.jsonl"
    gw_a.start()
    try:
        created = run("admin", "--socket", str(gw_a.socket), "keys", "create", "--reusable")
        assert created.returncode == 0, created.stderr
        secret = created.stdout.strip()
        first = gw_a.enroll(secret, "before")
        versions = {first["device"]["id"]: first["map_version"]}
        tokens = {first["device"]["id"]: first["token"]}
        stop = threading.Event()

        def storm() -> None:  # enrollments keep arriving while the backup runs
            for i in itertools.count():
                if stop.is_set():
                    return
                doc = gw_a.enroll(secret, f"storm-{i}")
                versions[doc["device"]["id"]] = doc["map_version"]
                tokens[doc["device"]["id"]] = doc["token"]

        enrolling = threading.Thread(target=storm)
        enrolling.start()
        time.sleep(0.3)
        backup = run("backup", "--config", str(gw_a.config), "--out", str(out))
        time.sleep(0.3)
        stop.set()
        enrolling.join(60)
        assert backup.returncode == 0, backup.stderr
        refused = run("restore", "--config", str(gw_a.config), str(out), "--replace")
        assert refused.returncode == 1 and "the gateway is running" in refused.stderr
    finally:
        stop.set()
        gw_a.stop()
    snapshot = read_backup(out)
    assert_consistent(snapshot, versions)
    kept = {d: v for d, v in versions.items() if v <= snapshot.map_version}
    assert 1 < len(kept) < len(versions), "the backup did not fall within the storm"

    restored = run("restore", "--config", str(gw_b.config), str(out))
    assert restored.returncode == 0, restored.stderr
    gw_b.start()
    try:
        listed = run("admin", "--socket", str(gw_b.socket), "devices", "list", "--json")
        assert {d["id"] for d in json.loads(listed.stdout)["devices"]} == set(kept)
        assert gw_b.http("GET", "/api/v1/relays", token=first["token"])[0] == 200
        late = max(versions, key=lambda d: versions[d])  # enrolled after the backup
        assert gw_b.http("GET", "/api/v1/relays", token=tokens[late])[0] == 401
        again = gw_b.enroll(secret, "after-restore")
        assert again["map_version"] == snapshot.map_version + VERSION_JUMP + 1
    finally:
        gw_b.stop()


# -- the document parser on arbitrary input ------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
_HEADER = {"format": "wiregate-backup", "version": 1, "revision": "0005",
           "created_at": "2026-01-01T00:00:00Z", "dialect": "sqlite"}  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    tables=st.lists(st.sampled_from(["meta", "devices", "x"]), max_size=3),
    body=st.lists(
        st.one_of(
            _json,
            st.fixed_dictionaries(
                {
                    "table": st.sampled_from(["meta", "devices", "x"]),
                    "columns": st.lists(st.sampled_from(["id", "map_version", "a"]), max_size=3),
                    "rows": st.integers(-1, 3),
                }
            ),
        ),
        max_size=8,
    ),
)
def test_any_sealed_document_decodes_or_is_refused(tables: list[str], body: list[Any]) -> None:
    lines = [json.dumps(_HEADER | {"tables": tables}).encode() + b"\n"]
    lines += [json.dumps(doc).encode() + b"\n" for doc in body] + [b"end\n"]
    try:
        snapshot = decode(resealed(lines))
    except BackupError as exc:
        assert exc.code in ("backup_corrupt", "backup_format")
        return
    assert [t.name for t in snapshot.tables] == tables
    metas = [t for t in snapshot.tables if t.name == "meta"]
    meta = metas[0] if metas else None
    version = None
    if meta is not None and len(meta.rows) == 1:
        version = dict(zip(meta.columns, meta.rows[0], strict=True)).get("map_version")
    if isinstance(version, int) and not isinstance(version, bool) and version >= 0:
        assert snapshot.map_version == version
    else:  # no single meta row, or its map version is not a count
        with pytest.raises(BackupError) as refused:
            _ = snapshot.map_version
        assert refused.value.code == "backup_corrupt"
