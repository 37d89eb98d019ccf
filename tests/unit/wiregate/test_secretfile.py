"""Shared key files (wiregate.files): 0600 or a Secret handed to the process's group."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from wiregate.errors import ConfigError
from wiregate.files import load_or_create_key_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand files over")

PROBE = """
import sys
from wiregate.errors import ConfigError
from wiregate.files import load_or_create_key_file
try:
    load_or_create_key_file(__import__("pathlib").Path(sys.argv[1]), "test key")
except ConfigError as exc:
    print("refused:", exc.message)
else:
    print("loaded")
"""


def load_as_nobody(path: Path) -> str:
    """Load ``path`` as the ``nobody`` user in the ``nogroup`` group (a pod's user)."""
    out = subprocess.run(
        ["runuser", "-u", "nobody", "-g", "nogroup", "--", sys.executable, "-c", PROBE,
         str(path)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[3],
    )  # fmt: skip
    return out.stdout.strip()


@pytest.fixture
def key() -> Iterator[Path]:
    # in the system temporary directory: pytest's own are private to root
    root = Path(tempfile.mkdtemp(prefix="wiregate-secretfile-"))
    root.chmod(0o755)
    path = root / "shared.key"
    load_or_create_key_file(path, "test key")
    os.chown(path, 0, int(subprocess.check_output(["getent", "group", "nogroup"],
                                                  text=True).split(":")[2]))  # fmt: skip
    yield path
    shutil.rmtree(root)


def test_a_root_owned_key_readable_by_the_process_group_only_is_accepted(key: Path) -> None:
    key.chmod(0o440)  # what the kubelet makes of a Secret volume with fsGroup
    assert load_as_nobody(key) == "loaded"


def test_a_key_readable_by_others_is_refused(key: Path) -> None:
    key.chmod(0o444)
    assert load_as_nobody(key).startswith("refused: the test key")


def test_a_group_readable_key_of_its_own_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "own.key"
    load_or_create_key_file(path, "test key")
    path.chmod(0o640)  # root's own file, root's group: not handed over by anyone
    with pytest.raises(ConfigError, match="readable by group or others"):
        load_or_create_key_file(path, "test key")
