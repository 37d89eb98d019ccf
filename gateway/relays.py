"""The gateway's side of the WireGuard relay: its ticket signing key and its relays.

The Ed25519 signing key lives in ``state_dir/relay-signing.key`` (base64 of the
32-byte seed). It is created on first start, mode 0600, atomically: written to
a private temporary file and hard-linked into place, so two starting gateways
never see a half-written key and never overwrite each other's. It is never
logged and never served; only its public key is (``GET /api/v1/relay/signers``),
in the exact format of a relay's ``verify_keys_file``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from gateway.config import parse_relay_entry
from gateway.errors import ConfigError
from gateway.model import Device
from relay.tickets import Node, issue_pair

__all__ = [
    "KEY_FILE",
    "TENANT",
    "RelayEndpoint",
    "RelaySigner",
    "load_or_create_signing_key",
    "parse_relays",
]

KEY_FILE = "relay-signing.key"
TENANT = "default"  # one tenant per gateway for now


@dataclass(frozen=True, slots=True)
class RelayEndpoint:
    """A relay the gateway hands out: its id (in tickets) and its control port."""

    id: str
    host: str
    port: int

    @property
    def control(self) -> str:
        """``host:port`` (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_relays(entries: Sequence[str]) -> tuple[RelayEndpoint, ...]:
    """``["id=HOST:PORT", ...]`` to relays; ConfigError naming a bad entry."""
    try:
        return tuple(RelayEndpoint(*parse_relay_entry(entry)) for entry in entries)
    except ValueError as exc:
        raise ConfigError(f"relays: {exc}") from exc


class RelaySigner:
    """Signs relay tickets; ``repr`` and the API never show the private key."""

    def __init__(self, signing_key: SigningKey, tenant: str = TENANT) -> None:
        self._key, self.tenant = signing_key, tenant

    def __repr__(self) -> str:
        return f"RelaySigner(public_key={self.public_key!r})"

    @property
    def public_key(self) -> str:
        """The verify key, base64."""
        return base64.b64encode(bytes(self._key.verify_key)).decode()

    def signers_document(self) -> dict[str, Any]:
        """What a relay's ``verify_keys_file`` holds to trust this gateway."""
        return {"signers": [{"public_key": self.public_key, "tenants": [self.tenant]}]}

    def ticket_for(
        self, relay: RelayEndpoint, caller: Device, peer: Device, now: float | None = None
    ) -> bytes:
        """A signed ticket admitting ``caller`` (node A) to relay ``caller``-``peer``."""
        own, _ = issue_pair(
            self._key,
            relay_id=relay.id,
            tenant=self.tenant,
            node_a=Node(caller.id, caller.public_key),
            node_b=Node(peer.id, peer.public_key),
            now=time.time() if now is None else now,
        )
        return own


def load_or_create_signing_key(state_dir: Path) -> SigningKey:
    """The key in ``state_dir/relay-signing.key``, created (0600) on first use."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / KEY_FILE
    if not path.exists():
        _create(path)
    return _read(path)


def _create(path: Path) -> None:
    seed = base64.b64encode(secrets.token_bytes(32)) + b"\n"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(seed)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another process won: use its key
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> SigningKey:
    try:
        mode = path.stat().st_mode
        text = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the relay signing key {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise ConfigError(
            f"the relay signing key {path} is readable by others",
            hint=f"chmod 600 {path}",
        )
    try:
        seed = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32:
        raise ConfigError(f"the relay signing key {path} is not a base64 32-byte seed")
    return SigningKey(seed)
