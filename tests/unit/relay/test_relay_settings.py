"""[relay] settings to ForwardingSettings: parsing, every refusal, and run_relay with it."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from nacl.signing import SigningKey

from relay.aio.forwarding import forwarding_from_settings, parse_signers
from relay.aio.stun import RelayServer, run_relay
from relay.client.bind import build_allocate
from relay.client.stun import stun_query
from relay.controlwire import Refused, parse_control
from relay.tickets import TrustedSigner
from wiregate.cli.main import main
from wiregate.errors import ConfigError
from wiregate.settings import RelaySettings, load_settings, parse_port_range

LOOPBACK = "127.0.0.1"


def verify_key() -> str:
    return base64.b64encode(bytes(SigningKey.generate().verify_key)).decode()


def keys_file(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "verify-keys.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def good_file(tmp_path: Path, key: str | None = None) -> Path:
    doc = {"signers": [{"public_key": key or verify_key(), "tenants": ["default"]}]}
    return keys_file(tmp_path, doc)


def settings(**kw: Any) -> RelaySettings:
    return load_settings(RelaySettings, None, **kw)


# -- parsing ---------------------------------------------------------------------------


def test_no_relay_id_means_stun_only() -> None:
    assert forwarding_from_settings(settings()) is None


def test_forwarding_from_settings(tmp_path: Path) -> None:
    key = verify_key()
    s = settings(
        relay_id="relay-1",
        relay_listen="[::1]:3480",
        relay_ports="40000-40003,40010",
        own_addresses=["198.51.100.7"],
        verify_keys_file=good_file(tmp_path, key),
        max_allocations=8,
        bytes_per_second=1000,
        burst_bytes=3000,
        idle_timeout=30.0,
    )
    fwd = forwarding_from_settings(s)
    assert fwd is not None
    assert (fwd.host, fwd.control_port) == ("::1", 3480)
    assert fwd.relay_ports == (40000, 40001, 40002, 40003, 40010)
    assert fwd.verify_keys == (TrustedSigner(base64.b64decode(key), frozenset({"default"})),)
    c = fwd.config
    assert (c.relay_id, c.own_addresses, c.max_allocations) == ("relay-1", ("198.51.100.7",), 8)
    assert (c.bytes_per_second, c.burst_bytes, c.idle_timeout) == (1000.0, 3000.0, 30.0)
    assert (c.max_allocations_per_device, c.max_datagram) == (16, 1500)


def test_defaults_and_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "wiregate.toml"
    cfg.write_text(f'[relay]\nrelay_id = "r1"\nverify_keys_file = "{good_file(tmp_path)}"\n')
    fwd = forwarding_from_settings(load_settings(RelaySettings, cfg))
    assert fwd is not None and fwd.relay_ports == tuple(range(40000, 40064))
    assert (fwd.host, fwd.control_port, fwd.config.max_allocations) == ("0.0.0.0", 3480, 4096)


@pytest.mark.parametrize(
    ("text", "ports"),
    [("1-2", (1, 2)), ("5, 7-8", (5, 7, 8)), ("0,0", (0, 0)), ("65534-65535", (65534, 65535))],
)
def test_parse_port_range(text: str, ports: tuple[int, ...]) -> None:
    assert parse_port_range(text) == ports


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "not a port"),
        ("abc", "not a port"),
        ("1-", "not a port"),
        ("-5", "not a port"),
        ("10-5", "FIRST <= LAST"),
        ("0-5", "FIRST <= LAST"),
        ("65535-65536", "FIRST <= LAST"),
        ("70000,1", "above 65535"),
        ("40000", "at least two"),
        ("40000,40000", "repeat"),
        ("1-20000", "at most"),
    ],
)
def test_parse_port_range_refuses(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_port_range(text)


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("relay_id", "bad id!", "relay_id"),
        ("relay_id", "x" * 65, "relay_id"),
        ("relay_listen", "3480", "relay_listen"),
        ("relay_listen", "host:99999", "relay_listen"),
        ("relay_ports", "40000", "relay_ports"),
        ("own_addresses", ["not-an-ip"], "own_addresses"),
        ("max_allocations", 0, "max_allocations"),
        ("max_allocations_per_device", 0, "max_allocations_per_device"),
        ("bytes_per_second", 0, "bytes_per_second"),
        ("burst_bytes", 100, "burst_bytes"),
        ("idle_timeout", 1.0, "idle_timeout"),
        ("max_datagram", 100, "max_datagram"),
        ("max_datagram", 70000, "max_datagram"),
    ],
)
def test_bad_settings_are_config_errors(field: str, value: Any, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        settings(**{field: value})


def test_forwarding_without_verify_keys_fails_closed() -> None:
    with pytest.raises(ConfigError, match="admit nobody"):
        forwarding_from_settings(settings(relay_id="r1"))


def test_burst_smaller_than_a_datagram_is_refused(tmp_path: Path) -> None:
    s = settings(relay_id="r1", verify_keys_file=good_file(tmp_path), burst_bytes=1500)
    s = s.model_copy(update={"max_datagram": 9000})
    with pytest.raises(ConfigError, match="burst_bytes"):
        forwarding_from_settings(s)


def test_missing_verify_keys_file(tmp_path: Path) -> None:
    s = settings(relay_id="r1", verify_keys_file=tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="cannot read"):
        forwarding_from_settings(s)


KEY = verify_key()


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ("{not json", "not JSON"),
        ([], 'only "signers"'),
        ({"signers": [], "extra": 1}, 'only "signers"'),
        ({"signers": []}, "non-empty"),
        ({"signers": "x"}, "non-empty"),
        ({"signers": ["x"]}, r"signers\[0\] must be an object"),
        ({"signers": [{"public_key": KEY}]}, "must be an object"),
        ({"signers": [{"public_key": 1, "tenants": ["t"]}]}, "must be a string"),
        ({"signers": [{"public_key": "!!", "tenants": ["t"]}]}, "not base64"),
        ({"signers": [{"public_key": "AAAA", "tenants": ["t"]}]}, "32-byte"),
        ({"signers": [{"public_key": KEY, "tenants": []}]}, "non-empty list"),
        ({"signers": [{"public_key": KEY, "tenants": "t"}]}, "non-empty list"),
        ({"signers": [{"public_key": KEY, "tenants": [""]}]}, "1..64 bytes"),
        ({"signers": [{"public_key": KEY, "tenants": ["x" * 65]}]}, "1..64 bytes"),
        ({"signers": [{"public_key": KEY, "tenants": ["t"]}] * 2}, "listed twice"),
    ],
)
def test_bad_verify_keys_files_are_refused(tmp_path: Path, doc: Any, why: str) -> None:
    s = settings(relay_id="r1", verify_keys_file=keys_file(tmp_path, doc))
    with pytest.raises(ConfigError, match=why):
        forwarding_from_settings(s)


def test_parse_signers_several_tenants() -> None:
    (signer,) = parse_signers({"signers": [{"public_key": KEY, "tenants": ["a", "b", "a"]}]})
    assert signer.tenants == frozenset({"a", "b"})


def test_cli_relay_refuses_forwarding_without_signers(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["relay", "--relay-id", "r1", "--metrics-listen", f"{LOOPBACK}:0"]
    )
    assert result.exit_code == 1 and "admit nobody" in result.output
    result = CliRunner().invoke(main, ["relay", "--relay-ports", "5"])
    assert result.exit_code == 1 and "relay_ports" in result.output


# -- run_relay with forwarding from settings ---------------------------------------------


async def test_run_relay_with_forwarding_from_settings(tmp_path: Path) -> None:
    s = settings(
        stun_listen=[f"{LOOPBACK}:0"],
        metrics_listen=f"{LOOPBACK}:0",
        relay_id="relay-1",
        relay_listen=f"{LOOPBACK}:0",
        relay_ports="0,0,0,0",
        verify_keys_file=good_file(tmp_path),
    )
    ready: asyncio.Future[RelayServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_relay(s, forwarding=forwarding_from_settings(s), on_ready=ready.set_result)
    )
    server = await asyncio.wait_for(ready, 5)
    try:
        assert server.forwarder is not None and server.forwarder.control_address is not None
        assert len(server.forwarder.relay_ports) == 4
        control = server.forwarder.control_address
        assert await _exchange(b"garbage", control) is None
        reply = await _exchange(build_allocate(b"\x01" + bytes(40)), control)
        assert reply is None or isinstance(parse_control(reply), Refused)
        await stun_query(server.stun_addresses[0], timeout=2.0)  # still serving
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _exchange(data: bytes, to: tuple[str, int]) -> bytes | None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.setblocking(False)
        await loop.sock_sendto(sock, data, to)
        try:
            return await asyncio.wait_for(loop.sock_recv(sock, 2048), 0.5)
        except TimeoutError:
            return None
