"""Agent state files: 0600, atomic, the token never in repr; endpoint candidates; auth keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.discovery.endpoints import candidates
from agent.gateway_client import read_auth_key
from agent.state import Enrollment, StateDir
from wiregate.errors import ConfigError, LocalError
from wiregate.model import Device, Identity, NetMap


def test_enrollment_round_trip_is_private(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "st")
    sd.ensure()
    enr = Enrollment("d1", "host", ("100.64.0.2", "fd7a::2"), "secret-token-value")
    sd.save_enrollment(enr)
    assert sd.load_enrollment() == enr
    mode = stat.S_IMODE(os.stat(tmp_path / "st" / "device.json").st_mode)
    assert mode == 0o600
    assert "secret-token-value" not in repr(enr)


def test_netmap_cache_and_forget(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    dev = Device("d1", "h", "k", Identity("i", "s"), "100.64.0.1", "fd7a::1")
    nm = NetMap(version=3, self_view=dev.to_self(), peers={})
    sd.save_netmap(nm)
    assert sd.load_netmap() == nm
    (tmp_path / "private.key").write_text("burned")
    (tmp_path / "private.key.next").write_text("burned too")
    sd.forget()
    assert sd.load_netmap() is None and sd.load_enrollment() is None
    # the gateway never registers a revoked device's key again: the next enrollment
    # must make a new one
    assert not (tmp_path / "private.key").exists()
    assert not (tmp_path / "private.key.next").exists()


def test_corrupt_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "device.json").write_text("{not json")
    with pytest.raises(LocalError, match="corrupt"):
        StateDir(tmp_path).load_enrollment()


def test_candidates_skip_loopback_link_local_and_tunnel() -> None:
    addrs = [
        ("lo", "127.0.0.1"),
        ("eth0", "198.51.100.7"),
        ("eth0", "fe80::1"),
        ("wg0", "100.64.0.2"),
        ("eth0", "2001:db8::7"),
        ("eth1", "198.51.100.7"),
    ]
    assert candidates(addrs, 51820, {"wg0"}) == ["198.51.100.7:51820", "[2001:db8::7]:51820"]


def test_auth_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "key"
    f.write_text("wgk_fromfile\n")
    assert read_auth_key(f"file:{f}") == "wgk_fromfile"
    monkeypatch.setenv("MY_KEY", "wgk_fromenv")
    assert read_auth_key("env:MY_KEY") == "wgk_fromenv"
    with pytest.raises(ConfigError):
        read_auth_key(f"file:{tmp_path / 'absent'}")
    with pytest.raises(ConfigError):
        read_auth_key("env:NOT_SET_ANYWHERE")
