"""The one nftables binding of wiregate.

``Nft.run`` applies an nftables script as one atomic transaction and
``Nft.query_json`` returns a listing parsed from nftables' JSON output. Both go
through libnftables (``libnftables.so.1``, Debian's ``libnftables1``) loaded with
ctypes; where the library is missing they fall back to the ``nft`` binary, the
script on its standard input (never in argv). Every refusal raises
:class:`NftError` carrying nftables' own message.

A handle acts on the network namespace of the thread that first used it (its
libnftables context is kept); the ``nft`` binary runs in the caller's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import shutil
import subprocess
import threading
from typing import Any

from wiregate.errors import DataPlaneError

__all__ = ["Nft", "NftError", "nft_available"]

_LIBRARY = "libnftables.so.1"
_OUTPUT_HANDLE = 1 << 3
_OUTPUT_JSON = 1 << 4
_BINARY_TIMEOUT_S = 30.0
_CONTEXT_CHARS = 160


class NftError(DataPlaneError):
    """nftables refused an operation (or is not installed)."""

    code = "nftables"


def _load_library() -> ctypes.CDLL | None:
    for name in (_LIBRARY, ctypes.util.find_library("nftables")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        _declare(lib)
        return lib
    return None


def _declare(lib: ctypes.CDLL) -> None:
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.restype = None
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.restype = None
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]


_lib_lock = threading.Lock()
_lib_loaded = False
_lib: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL | None:
    global _lib, _lib_loaded
    with _lib_lock:
        if not _lib_loaded:
            _lib = _load_library()
            _lib_loaded = True
        return _lib


def nft_available() -> bool:
    """Whether nftables can be driven from here (library or binary present)."""
    return _library() is not None or shutil.which("nft") is not None


def _one_line(text: str, *, with_context: bool = True) -> str:
    """nftables' error text as one line: each ``Error:`` line with the command it names.

    libnftables (1.0.x) quotes the first line of a multi-line buffer whatever line
    the error is on, so its context is left out there (``with_context=False``).
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    parts: list[str] = []
    for i, line in enumerate(lines):
        if "Error:" not in line:
            continue
        message = line[line.index("Error:") :]
        following = lines[i + 1] if i + 1 < len(lines) else ""
        is_context = bool(set(following) - {"^", "~", " "}) and "Error:" not in following
        if with_context and is_context:
            message = f"{message} in {following[:_CONTEXT_CHARS]!r}"
        parts.append(message)
    chosen = parts or lines[:1] or ["refused the operation"]
    return "nftables: " + "; ".join(chosen)


class Nft:
    """A handle on nftables in the calling thread's network namespace."""

    def __init__(self, *, use_library: bool = True) -> None:
        self._lib = _library() if use_library else None
        self._lock = threading.Lock()
        self._ctx: int | None = None  # one libnftables context, made on first use
        if self._lib is None and shutil.which("nft") is None:
            raise NftError(
                "nftables is not installed (neither libnftables.so.1 nor the nft binary)",
                hint="install Debian's libnftables1 (or nftables)",
            )

    @property
    def uses_library(self) -> bool:
        """True when libnftables is used, False for the ``nft`` binary."""
        return self._lib is not None

    def run(self, script: str) -> None:
        """Apply ``script`` as one atomic transaction; NftError if refused."""
        self._execute(script, json_output=False)

    def query_json(self, command: str) -> dict[str, Any]:
        """Run a listing command (``list table inet x``) and parse its JSON."""
        out = self._execute(command, json_output=True)
        try:
            doc = json.loads(out) if out.strip() else {"nftables": []}
        except ValueError as exc:
            raise NftError(f"nftables: unparsable JSON output ({exc})") from None
        if not isinstance(doc, dict):
            raise NftError("nftables: JSON output is not an object")
        return doc

    def _execute(self, script: str, *, json_output: bool) -> str:
        if "\0" in script:
            raise NftError("nftables: script contains a NUL byte")
        with self._lock:
            if self._lib is not None:
                return self._via_library(self._lib, script, json_output=json_output)
            return self._via_binary(script, json_output=json_output)

    def open(self) -> None:
        """Create the libnftables context now, in this network namespace, so that the
        first change does not pay for it (no-op with the ``nft`` binary)."""
        with self._lock:
            if self._lib is not None:
                self._context(self._lib)

    def close(self) -> None:
        """Free the libnftables context (a later call makes a new one)."""
        with self._lock:
            if self._lib is not None and self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        lib, ctx = getattr(self, "_lib", None), getattr(self, "_ctx", None)
        if lib is not None and ctx is not None:
            lib.nft_ctx_free(ctx)

    def _context(self, lib: ctypes.CDLL) -> int:
        """The handle's one context. Kept for its life: freeing a context right after
        a change makes the kernel wait for an RCU grace period (5-16 ms here). It
        talks to the network namespace the handle was first used in."""
        if self._ctx is None:
            ctx = lib.nft_ctx_new(0)
            if not ctx:
                raise NftError("nftables: cannot create a libnftables context")
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            self._ctx = int(ctx)
        return self._ctx

    def _via_library(self, lib: ctypes.CDLL, script: str, *, json_output: bool) -> str:
        ctx = self._context(lib)
        flags = _OUTPUT_HANDLE | (_OUTPUT_JSON if json_output else 0)
        lib.nft_ctx_output_set_flags(ctx, flags)
        rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
        # reading a buffer also empties it for the next call
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError(_one_line(err, with_context="\n" not in script.strip()))
        return out

    @staticmethod
    def _via_binary(script: str, *, json_output: bool) -> str:
        binary = shutil.which("nft")
        if binary is None:
            raise NftError("nftables: the nft binary is not installed")
        # ``nft -j -f`` reads JSON input, so a listing goes in argv (it holds no secret).
        if json_output:
            argv, stdin = [binary, "-a", "-j", *script.split()], ""
        else:
            argv, stdin = [binary, "-f", "-"], script
        try:
            proc = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=_BINARY_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NftError(f"nftables: cannot run nft ({exc})") from None
        if proc.returncode != 0:
            raise NftError(_one_line(proc.stderr or proc.stdout))
        return proc.stdout
