"""The private key file (agent.keyfile)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from agent.keyfile import KEY_FILE, KeyFileError, load_or_create_key


def test_created_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        key = load_or_create_key(tmp_path / "state")
    finally:
        os.umask(old)
    path = tmp_path / "state" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) == 32
    assert base64.b64decode(path.read_bytes()) == key
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]  # no temp file left


def test_reloaded_not_regenerated(tmp_path: Path) -> None:
    assert load_or_create_key(tmp_path) == load_or_create_key(tmp_path)


def test_group_readable_key_refused_without_leaking_it(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o640)
    with pytest.raises(KeyFileError) as info:
        load_or_create_key(tmp_path)
    text = f"{info.value} {info.value.hint}"
    assert "640" in text and base64.b64encode(key).decode() not in text


def test_garbage_refused(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    path.write_bytes(b"secret-but-not-a-key\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as info:
        load_or_create_key(tmp_path)
    assert "secret" not in str(info.value)


def test_short_key_refused(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    path.write_bytes(base64.b64encode(bytes(16)))
    path.chmod(0o600)
    with pytest.raises(KeyFileError):
        load_or_create_key(tmp_path)


def test_symlink_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(base64.b64encode(bytes(range(32))))
    target.chmod(0o600)
    (tmp_path / KEY_FILE).symlink_to(target)
    with pytest.raises(KeyFileError):
        load_or_create_key(tmp_path)
