"""The one writer of private files (wiregate.files.write_private)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from wiregate import files
from wiregate.files import fsync_dir, write_private


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("exclusive", [False, True])
def test_written_0600_even_with_a_permissive_umask(tmp_path: Path, exclusive: bool) -> None:
    path = tmp_path / "secret"
    old = os.umask(0)
    try:
        write_private(path, b"data\n", exclusive=exclusive)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"data\n" and mode(path) == 0o600
    assert names(tmp_path) == ["secret"]  # no temporary file left


def test_chunks_are_written_in_order(tmp_path: Path) -> None:
    path = tmp_path / "doc.jsonl"
    write_private(path, (line for line in (b"a\n", b"b\n", b"c\n")))
    assert path.read_bytes() == b"a\nb\nc\n" and mode(path) == 0o600


def test_an_existing_file_is_replaced_by_a_new_0600_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    path.chmod(0o644)
    before = path.stat().st_ino
    write_private(path, b"new")
    assert path.read_bytes() == b"new" and mode(path) == 0o600
    assert path.stat().st_ino != before  # renamed over, never rewritten in place
    assert names(tmp_path) == ["state.json"]


def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"old")

    def chunks() -> Iterator[bytes]:
        yield b"half of the"
        raise RuntimeError("the source failed")

    with pytest.raises(RuntimeError, match="the source failed"):
        write_private(path, chunks())
    assert path.read_bytes() == b"old" and names(tmp_path) == ["state.json"]


def test_exclusive_create_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    path.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        write_private(path, b"ours", exclusive=True)
    assert path.read_bytes() == b"theirs" and names(tmp_path) == ["private.key"]


def test_a_symlink_in_place_is_replaced_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"untouched")
    path = tmp_path / "state.json"
    path.symlink_to(target)
    with pytest.raises(FileExistsError):
        write_private(path, b"new", exclusive=True)
    write_private(path, b"new")
    assert not path.is_symlink() and path.read_bytes() == b"new"
    assert target.read_bytes() == b"untouched"


def test_a_missing_directory_is_an_os_error_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_private(tmp_path / "absent" / "file", b"data")
    assert names(tmp_path) == []


@pytest.mark.parametrize("exclusive", [False, True])
def test_the_file_then_its_directory_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exclusive: bool
) -> None:
    synced: list[tuple[int, bool]] = []  # (inode, is a directory) per fsync, in order
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((info.st_ino, stat.S_ISDIR(info.st_mode)))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    path = tmp_path / "secret"
    write_private(path, b"data", exclusive=exclusive)
    assert synced == [(path.stat().st_ino, False), (tmp_path.stat().st_ino, True)]


def test_fsync_dir_refuses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"")
    fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        fsync_dir(path)
