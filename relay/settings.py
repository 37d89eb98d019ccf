"""From ``[relay]`` settings to the WireGuard relay's :class:`ForwardingSettings` (pure).

``relay_id`` empty means no forwarding (STUN only). Otherwise the control
address, the relay ports and the limits are taken from the settings, and the
trusted signers from ``verify_keys_file``, a JSON document::

    {"signers": [{"public_key": "<base64 Ed25519 verify key>", "tenants": ["default"]}]}

which is exactly what the gateway serves at ``GET /api/v1/relay/signers``.
Forwarding without a signer is refused (fail closed): a relay that admits
nothing is a configuration mistake, not a state to run in.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

from gateway.config import RelaySettings, parse_port_range
from gateway.errors import ConfigError
from relay.allocation import RelayConfig
from relay.relay_server import ForwardingSettings
from relay.tickets import MAX_TEXT, TrustedSigner

__all__ = ["forwarding_from_settings", "load_verify_keys", "parse_signers"]

_HINT = 'write {"signers": [{"public_key": "<base64>", "tenants": ["default"]}]}'


def forwarding_from_settings(settings: RelaySettings) -> ForwardingSettings | None:
    """The relay's forwarding settings, or None when ``relay_id`` is empty.

    Raises :class:`~gateway.errors.ConfigError` for anything unusable, including
    forwarding with no verify keys file or no signer in it.
    """
    if not settings.relay_id:
        return None
    if settings.verify_keys_file is None:
        raise ConfigError(
            "relay_id is set but verify_keys_file is not: the relay would admit nobody",
            hint="save the gateway's GET /api/v1/relay/signers into a file and set "
            "verify_keys_file",
        )
    if settings.burst_bytes < settings.max_datagram:
        raise ConfigError("burst_bytes must be at least max_datagram")
    host, control_port = _listen(settings.relay_listen)
    return ForwardingSettings(
        host=host,
        control_port=control_port,
        relay_ports=_ports(settings.relay_ports),
        config=_core_config(settings),
        verify_keys=load_verify_keys(settings.verify_keys_file),
    )


def _core_config(settings: RelaySettings) -> RelayConfig:
    """The core's limits; the control port and relay ports are filled in once bound."""
    return RelayConfig(
        relay_id=settings.relay_id,
        control_port=0,
        ports=(),
        own_addresses=tuple(settings.own_addresses),
        max_allocations=settings.max_allocations,
        max_allocations_per_device=settings.max_allocations_per_device,
        bytes_per_second=float(settings.bytes_per_second),
        burst_bytes=float(settings.burst_bytes),
        idle_timeout=settings.idle_timeout,
        max_datagram=settings.max_datagram,
    )


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"relay_listen {text!r} is not host:port")
    return host, int(port)


def _ports(text: str) -> tuple[int, ...]:
    try:
        return parse_port_range(text)
    except ValueError as exc:
        raise ConfigError(f"relay_ports: {exc}", hint='write "40000-40063"') from exc


def load_verify_keys(path: Path) -> tuple[TrustedSigner, ...]:
    """Read and parse a verify keys file; ConfigError when unreadable or invalid."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read verify_keys_file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"verify_keys_file {path} is not JSON: {exc}", hint=_HINT) from exc
    try:
        return parse_signers(data)
    except ValueError as exc:
        raise ConfigError(f"verify_keys_file {path}: {exc}", hint=_HINT) from exc


def parse_signers(data: Any) -> tuple[TrustedSigner, ...]:
    """``{"signers": [...]}`` to trusted signers; ValueError naming what is wrong."""
    if not isinstance(data, dict) or set(data) != {"signers"}:
        raise ValueError('the document must be an object with only "signers"')
    raw = data["signers"]
    if not isinstance(raw, list) or not raw:
        raise ValueError("signers must be a non-empty list (no signer: every ticket refused)")
    signers = tuple(_signer(item, f"signers[{i}]") for i, item in enumerate(raw))
    if len({s.verify_key for s in signers}) != len(signers):
        raise ValueError("a public key is listed twice")
    return signers


def _signer(item: Any, where: str) -> TrustedSigner:
    if not isinstance(item, dict) or set(item) != {"public_key", "tenants"}:
        raise ValueError(f'{where} must be an object with "public_key" and "tenants" only')
    return TrustedSigner(_verify_key(item["public_key"], where), _tenants(item["tenants"], where))


def _verify_key(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{where}.public_key must be a string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}.public_key is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"{where}.public_key is not a 32-byte Ed25519 key")
    return raw


def _tenants(tenants: Any, where: str) -> frozenset[str]:
    if not isinstance(tenants, list) or not tenants:
        raise ValueError(f"{where}.tenants must be a non-empty list of strings")
    for tenant in tenants:
        if not isinstance(tenant, str) or not 1 <= len(tenant.encode()) <= MAX_TEXT:
            raise ValueError(f"{where}.tenants: each tenant is 1..{MAX_TEXT} bytes of text")
    return frozenset(tenants)
