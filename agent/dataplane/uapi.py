"""Userspace WireGuard (wireguard-go, boringtun) over the cross-platform UAPI socket.

Protocol (https://www.wireguard.com/xplatform/): the client writes ``get=1\\n\\n``
or ``set=1\\n`` + ``key=value`` lines + ``\\n``; keys are lowercase hex; the
reply ends with ``errno=N\\n\\n`` (0 = success). :func:`build_set` and
:func:`parse_get` are the sans-IO codec; :class:`UapiBackend` is the socket
adapter that also starts the daemon.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from agent.dataplane.backend import (
    DeviceUpdate,
    IPNetwork,
    LiveDevice,
    LivePeer,
    PeerUpdate,
    network,
    network_text,
    parse_endpoint,
)
from agent.dataplane.backend import format_endpoint as _fmt
from wiregate.errors import DataPlaneError
from wiregate.keys import decode_key, encode_key, public_from_private

__all__ = [
    "SOCKET_DIR",
    "MalformedUapi",
    "UapiBackend",
    "UapiError",
    "UapiRefused",
    "build_set",
    "parse_errno",
    "parse_get",
]

SOCKET_DIR = Path("/var/run/wireguard")
GET_REQUEST = b"get=1\n\n"
_MAX_REPLY = 64 << 20
_SNDBUF_DEFAULT = 1 << 16
_SO_SNDBUFFORCE = 32


class UapiError(DataPlaneError):
    """A UAPI exchange failed."""

    code = "uapi"


class MalformedUapi(UapiError):
    """The daemon's reply does not follow the protocol."""

    code = "uapi_malformed"


class UapiRefused(UapiError):
    """The daemon answered with a non-zero errno."""

    code = "uapi_refused"

    def __init__(self, errno: int) -> None:
        name = os.strerror(abs(errno))
        super().__init__(f"WireGuard UAPI refused the request: errno={errno} ({name})")
        self.errno = errno


# --- codec -----------------------------------------------------------------


@lru_cache(maxsize=1 << 14)
def _hex_key(b64: str) -> str:
    return decode_key(b64).hex()


def build_set(update: DeviceUpdate) -> bytes:
    """The ``set=1`` request for ``update`` (private key included: never log the result)."""
    parts = ["set=1\n"]
    if update.private_key is not None:
        parts.append(f"private_key={update.private_key.hex()}\n")
    if update.listen_port is not None:
        parts.append(f"listen_port={update.listen_port}\n")
    if update.fwmark is not None:
        parts.append(f"fwmark={update.fwmark}\n")
    parts.extend(map(_peer_block, update.peers))
    parts.append("\n")
    return "".join(parts).encode("ascii")


@lru_cache(maxsize=1 << 14)
def _peer_block(peer: PeerUpdate) -> str:
    """The lines of one peer, newline-terminated (memoized: maps repeat the same peers)."""
    head = f"public_key={_hex_key(peer.public_key)}\n"
    if peer.remove:
        return head + "remove=true\n"
    lines = [head]
    if peer.update_only:
        lines.append("update_only=true\n")
    if peer.endpoint is not None:
        lines.append(f"endpoint={peer.endpoint}\n")
    if peer.keepalive is not None:
        lines.append(f"persistent_keepalive_interval={peer.keepalive}\n")
    if peer.allowed_ips is not None:
        if peer.update_only:
            lines.append("replace_allowed_ips=true\n")
        lines.append(_allowed_lines(peer.allowed_ips))
    return "".join(lines)


@lru_cache(maxsize=1 << 14)
def _allowed_lines(nets: frozenset[IPNetwork]) -> str:
    ordered = sorted(nets, key=_net_key)
    return "".join(f"allowed_ip={network_text(net)}\n" for net in ordered)


def _net_key(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def parse_errno(reply: bytes) -> int:
    """The errno of a reply (``errno=N`` on its last non-empty line)."""
    if not reply.endswith(b"\n\n"):
        raise MalformedUapi("UAPI reply is not terminated by an empty line")
    last = reply[:-2].rsplit(b"\n", 1)[-1]
    key, sep, value = last.partition(b"=")
    if key != b"errno" or not sep:
        raise MalformedUapi("UAPI reply does not end with errno=N")
    try:
        errno = int(value)
    except ValueError:
        raise MalformedUapi("UAPI errno is not an integer") from None
    if not -(1 << 31) < errno < 1 << 31:  # os.strerror takes a C int
        raise MalformedUapi("UAPI errno is out of range")
    return errno


def parse_get(reply: bytes) -> LiveDevice:
    """Parse a ``get=1`` reply into a :class:`LiveDevice`; raise on errors and malformed input."""
    errno = parse_errno(reply)
    if errno != 0:
        raise UapiRefused(errno)
    try:
        lines = reply[:-2].decode("ascii").split("\n")[:-1]
        device, peers = _split_pairs(lines)
        return LiveDevice(
            public_key=_public_of(device.get("private_key")),
            listen_port=int(device.get("listen_port", "0")),
            fwmark=int(device.get("fwmark", "0")),
            peers={p.public_key: p for p in map(_live_peer, peers)},
        )
    except MalformedUapi:
        raise
    except (ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise MalformedUapi(f"bad value in UAPI reply ({type(exc).__name__})") from None


def _split_pairs(lines: list[str]) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """Device key/values, then one list of key/values per peer (each opened by public_key)."""
    device: dict[str, str] = {}
    peers: list[list[tuple[str, str]]] = []
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            raise MalformedUapi(f"UAPI line without '=': {line[:40]!r}")
        if key == "public_key":
            peers.append([])
        if peers:
            peers[-1].append((key, value))
        else:
            device[key] = value
    return device, peers


def _public_of(private_hex: str | None) -> str | None:
    if private_hex is None:
        return None
    raw = bytes.fromhex(private_hex)
    if len(raw) != 32:
        raise MalformedUapi("UAPI private key is not 32 bytes")
    return None if raw == bytes(32) else encode_key(public_from_private(raw))


def _key_from_hex(value: str) -> str:
    raw = bytes.fromhex(value)
    if len(raw) != 32:
        raise MalformedUapi("UAPI key is not 32 bytes")
    return encode_key(raw)


def _live_peer(pairs: list[tuple[str, str]]) -> LivePeer:
    fields: dict[str, str] = {}
    allowed: list[IPNetwork] = []
    for key, value in pairs:
        if key == "allowed_ip":
            allowed.append(network(value))
        else:
            fields[key] = value
    sec = int(fields.get("last_handshake_time_sec", "0"))
    nsec = int(fields.get("last_handshake_time_nsec", "0"))
    endpoint = fields.get("endpoint")
    return LivePeer(
        public_key=_key_from_hex(fields["public_key"]),
        allowed_ips=frozenset(allowed),
        endpoint=None if endpoint is None else _fmt(*parse_endpoint(endpoint)),
        keepalive=int(fields.get("persistent_keepalive_interval", "0")),
        last_handshake=None if sec == 0 and nsec == 0 else sec + nsec / 1e9,
        rx=int(fields.get("rx_bytes", "0")),
        tx=int(fields.get("tx_bytes", "0")),
    )


# --- socket adapter --------------------------------------------------------


class UapiBackend:
    """wireguard-go (or boringtun) driven through its UAPI socket.

    ``create`` starts ``BINARY -f NAME`` detached, in the current network
    namespace, logging to ``run_dir/NAME.log``; a daemon that already answers
    on the socket is adopted, so an agent restart does not restart the tunnel.
    """

    name = "userspace"

    def __init__(
        self, *, run_dir: Path, binary: str = "wireguard-go", socket_dir: Path = SOCKET_DIR
    ) -> None:
        self.run_dir = Path(run_dir)
        self.binary = binary
        self.socket_dir = Path(socket_dir)
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def socket_path(self, name: str) -> Path:
        """Where the daemon for ``name`` listens."""
        return self.socket_dir / f"{name}.sock"

    def exists(self, name: str) -> bool:
        try:
            with self._connect(name):
                return True
        except UapiError:
            return False

    def create(self, name: str, timeout: float = 10.0) -> None:
        if self.exists(name):
            return
        self.socket_path(name).unlink(missing_ok=True)  # stale socket of a dead daemon
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.run_dir / f"{name}.log", "ab") as log:
            child = subprocess.Popen(
                [self.binary, "-f", name],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        self._children[name] = child
        (self.run_dir / f"{name}.pid").write_text(f"{child.pid}\n")
        self._wait_ready(name, child, timeout)

    def _wait_ready(self, name: str, child: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise DataPlaneError(
                    f"{self.binary} exited with {child.returncode} while creating {name}",
                    hint=f"see {self.run_dir / (name + '.log')}",
                )
            if self.exists(name):
                return
            time.sleep(0.02)
        raise DataPlaneError(f"{self.binary} did not open {self.socket_path(name)} in time")

    def delete(self, name: str) -> None:
        pid = self._pid(name)
        if pid is not None:
            self._terminate(name, pid)
        self.socket_path(name).unlink(missing_ok=True)
        (self.run_dir / f"{name}.pid").unlink(missing_ok=True)

    def _pid(self, name: str) -> int | None:
        try:
            pid = int((self.run_dir / f"{name}.pid").read_text())
            args = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        except (OSError, ValueError):
            return None
        # Only ever signal the daemon we started for this interface (pids get reused).
        return pid if args[-2:] == [b"-f", name.encode()] else None

    def _terminate(self, name: str, pid: int) -> None:
        os.kill(pid, signal.SIGTERM)
        child = self._children.pop(name, None)
        if child is not None:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    def read(self, name: str) -> LiveDevice:
        return parse_get(self._transact(name, GET_REQUEST))

    def write(self, name: str, update: DeviceUpdate) -> int:
        return self.begin_write(name, update)()

    def begin_write(self, name: str, update: DeviceUpdate) -> Callable[[], int]:
        """Send the ``set`` request now; the returned function reads the daemon's answer.

        The send buffer is sized for the whole request, so the daemon parses it
        while the caller goes on (routes); the answer waits in the socket.
        """
        if update.is_empty:
            return lambda: 0
        request = build_set(update)
        sock = self._connect(name)
        try:
            _grow_send_buffer(sock, len(request))
            sock.sendall(request)
        except OSError as exc:
            sock.close()
            raise UapiError(f"UAPI exchange with {name} failed: {exc}") from None
        return lambda: _finish_set(sock, name)

    def _connect(self, name: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(str(self.socket_path(name)))
        except OSError as exc:
            sock.close()
            raise UapiError(f"cannot reach the UAPI socket of {name}: {exc.strerror}") from None
        return sock

    def _transact(self, name: str, request: bytes) -> bytes:
        with self._connect(name) as sock:
            try:
                sock.sendall(request)
                return _read_reply(sock)
            except OSError as exc:
                raise UapiError(f"UAPI exchange with {name} failed: {exc}") from None


def _grow_send_buffer(sock: socket.socket, size: int) -> None:
    if size <= _SNDBUF_DEFAULT:
        return
    try:  # CAP_NET_ADMIN (which the agent has) may exceed net.core.wmem_max
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, size + 4096)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size + 4096)


def _finish_set(sock: socket.socket, name: str) -> int:
    with sock:
        try:
            errno = parse_errno(_read_reply(sock))
        except OSError as exc:
            raise UapiError(f"UAPI exchange with {name} failed: {exc}") from None
    if errno != 0:
        raise UapiRefused(errno)
    return 1


def _read_reply(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    tail = b""
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise MalformedUapi("UAPI socket closed before the end of the reply")
        chunks.append(chunk)
        size += len(chunk)
        tail = (tail + chunk)[-2:]
        if tail == b"\n\n":
            return b"".join(chunks)
        if size > _MAX_REPLY:
            raise MalformedUapi("UAPI reply is too large")
