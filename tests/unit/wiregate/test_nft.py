"""wiregate.nft against the real nftables, each case in a throwaway network namespace.

Every case re-executes Python under ``unshare -n`` so nothing touches the host's
root namespace; both back ends (libnftables through ctypes, the ``nft`` binary)
run the same script.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from wiregate.errors import DataPlaneError
from wiregate.nft import NftError, _one_line

_PRELUDE = """
import json, sys
from wiregate.nft import Nft, NftError, nft_available
nft = Nft(use_library=sys.argv[1] == "lib")
out = {"available": nft_available(), "library": nft.uses_library}
"""


def _in_netns(body: str, backend: str) -> dict[str, Any]:
    code = _PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", code, backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


BACKENDS = ["lib", "bin"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_is_applied_and_listed_as_json(backend: str) -> None:
    out = _in_netns(
        """
        nft.run(
            "add table inet t\\n"
            "add chain inet t c { type filter hook input priority 0; }\\n"
            "add rule inet t c udp dport 5 counter drop\\n"
        )
        doc = nft.query_json("list table inet t")
        out["kinds"] = [next(iter(item)) for item in doc["nftables"]]
        out["rule"] = [i["rule"] for i in doc["nftables"] if "rule" in i][0]
        """,
        backend,
    )
    assert out["available"] is True
    assert out["library"] is (backend == "lib")
    assert out["kinds"].count("table") == 1 and out["kinds"].count("chain") == 1
    assert out["rule"]["chain"] == "c" and isinstance(out["rule"]["handle"], int)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_script_changes_nothing(backend: str) -> None:
    out = _in_netns(
        """
        nft.run("add table inet t")
        try:
            nft.run("add chain inet t ok\\nadd rule inet t ok foo bar\\n")
        except NftError as exc:
            out["error"] = exc.message
        doc = nft.query_json("list table inet t")
        out["chains"] = [i["chain"]["name"] for i in doc["nftables"] if "chain" in i]
        """,
        backend,
    )
    assert out["error"].startswith("nftables: Error:")
    assert "No symbol type information" in out["error"] and "\n" not in out["error"]
    if backend == "bin":
        assert "foo bar" in out["error"]
    assert out["chains"] == []  # the transaction is atomic: "ok" was not added


@pytest.mark.parametrize("backend", BACKENDS)
def test_listing_a_missing_table_raises(backend: str) -> None:
    out = _in_netns(
        """
        try:
            nft.query_json("list table inet absent")
            out["raised"] = False
        except NftError as exc:
            out["raised"] = True
            out["error"] = exc.message
        """,
        backend,
    )
    assert out["raised"] is True
    assert "No such file or directory" in out["error"]


def test_a_nul_byte_is_refused_before_nftables() -> None:
    out = _in_netns(
        """
        try:
            nft.run("add table inet t\\0")
        except NftError as exc:
            out["error"] = exc.message
        """,
        "lib",
    )
    assert "NUL" in out["error"]


def test_error_text_becomes_one_line() -> None:
    text = "Error: No such file or directory\nlist table inet x\n^^^^^^^^^^^^^^^^^\n"
    assert _one_line(text) == "nftables: Error: No such file or directory in 'list table inet x'"
    assert _one_line("") == "nftables: refused the operation"
    assert issubclass(NftError, DataPlaneError)
