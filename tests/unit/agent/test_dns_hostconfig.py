"""The host resolver's configuration (agent/dns/hostconfig.py): files, a resolvectl stand-in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.dns import hostconfig
from agent.dns.hostconfig import (
    MARKER,
    NoResolver,
    ResolvConf,
    Resolved,
    choose_resolver,
    parse_nameservers,
    render_resolv_conf,
)
from wiregate.errors import LocalError

ORIGINAL = """\
# from DHCP
search corp.example
nameserver 192.0.2.53
nameserver 192.0.2.54
nameserver fe80::1%eth0
options edns0
"""


def test_parse_nameservers() -> None:
    assert parse_nameservers(ORIGINAL) == ["192.0.2.53", "192.0.2.54", "fe80::1"]
    assert parse_nameservers("nameserver\n#nameserver 1.1.1.1\n") == []


def test_render_lists_the_agent_first_and_keeps_the_rest() -> None:
    text = render_resolv_conf(ORIGINAL, ["100.64.0.1"], "wg.internal")
    assert text.startswith(MARKER)
    assert parse_nameservers(text) == ["100.64.0.1", "192.0.2.53", "192.0.2.54"]  # glibc: 3
    assert "search corp.example" in text and "options edns0" in text
    again = render_resolv_conf(text, ["100.64.0.1"], "wg.internal")
    assert again == text  # rendering its own output changes nothing


def test_resolv_conf_apply_and_restore(tmp_path: Path) -> None:
    path, backup = tmp_path / "resolv.conf", tmp_path / "state" / "resolv.conf.original"
    backup.parent.mkdir()
    path.write_text(ORIGINAL)
    resolver = ResolvConf(path, backup)
    resolver.apply(["100.64.0.1"], ["wg.internal", "cluster.local"])
    managed = path.read_text()
    assert parse_nameservers(managed)[0] == "100.64.0.1"
    assert backup.read_text() == ORIGINAL and (backup.stat().st_mode & 0o777) == 0o600
    assert (path.stat().st_mode & 0o777) == 0o644
    assert resolver.upstreams() == ["192.0.2.53", "192.0.2.54", "fe80::1"]
    resolver.apply(["100.64.0.1"], ["wg.internal"])  # again: the original stays the original
    assert backup.read_text() == ORIGINAL
    resolver.restore()
    assert path.read_text() == ORIGINAL and not backup.exists()
    resolver.restore()  # nothing to do twice
    assert path.read_text() == ORIGINAL


def test_resolv_conf_after_a_crash_without_the_original(tmp_path: Path) -> None:
    path, backup = tmp_path / "resolv.conf", tmp_path / "resolv.conf.original"
    path.write_text(render_resolv_conf(ORIGINAL, ["100.64.0.1"], "wg.internal"))
    resolver = ResolvConf(path, backup)
    resolver.apply(["100.64.0.1"], ["wg.internal"])
    assert "100.64.0.1" not in resolver.upstreams()  # never forwards to itself
    resolver.restore()
    assert not path.read_text().startswith("# wiregate")
    assert parse_nameservers(path.read_text()) == ["192.0.2.53", "192.0.2.54"]


def test_resolv_conf_rewritten_by_another_program_is_left_to_it(tmp_path: Path) -> None:
    path, backup = tmp_path / "resolv.conf", tmp_path / "resolv.conf.original"
    path.write_text(ORIGINAL)
    resolver = ResolvConf(path, backup)
    resolver.apply(["100.64.0.1"], ["wg.internal"])
    path.write_text("nameserver 198.51.100.1\n")  # DHCP renewed it meanwhile
    resolver.restore()
    assert path.read_text() == "nameserver 198.51.100.1\n" and not backup.exists()


def test_unwritable_resolv_conf_is_a_one_line_error(tmp_path: Path) -> None:
    resolver = ResolvConf(tmp_path / "missing-dir" / "resolv.conf", tmp_path / "b")
    with pytest.raises(LocalError, match="cannot write"):
        resolver.apply(["100.64.0.1"], ["wg.internal"])


def fake_resolvectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int = 0) -> Path:
    log = tmp_path / "calls"
    script = tmp_path / "bin" / "resolvectl"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                      f'[ {code} -eq 0 ] || echo "Failed to set DNS: link not found" >&2\n'
                      f"exit {code}\n")  # fmt: skip
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return log


def test_resolved_per_link_server_and_routing_domains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = fake_resolvectl(tmp_path, monkeypatch)
    resolver = Resolved("wg0")
    resolver.apply(["100.64.0.1", "fd7a::1"], ["wg.internal", "cluster.local"])
    resolver.restore()
    assert log.read_text().splitlines() == [
        "dns wg0 100.64.0.1 fd7a::1",
        "domain wg0 ~wg.internal ~cluster.local",
        "default-route wg0 false",
        "revert wg0",
    ]


def test_resolved_failure_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_resolvectl(tmp_path, monkeypatch, code=1)
    with pytest.raises(LocalError, match="resolvectl dns failed: Failed to set DNS"):
        Resolved("wg0").apply(["100.64.0.1"], ["wg.internal"])


def test_choose_resolver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, backup = tmp_path / "resolv.conf", tmp_path / "backup"
    path.write_text(ORIGINAL)

    def choose(mode: str) -> object:
        return choose_resolver(mode, interface="wg0", path=path, backup=backup)

    assert isinstance(choose("off"), NoResolver)
    assert isinstance(choose("resolved"), Resolved)
    assert isinstance(choose("resolv.conf"), ResolvConf)
    monkeypatch.setattr(hostconfig, "RESOLVED_SOCKET", tmp_path / "no-such-socket")
    monkeypatch.setattr(hostconfig, "owns_host_resolver", lambda _p: True)
    assert isinstance(choose("auto"), ResolvConf)
    link = tmp_path / "link.conf"
    link.symlink_to(path)
    auto = choose_resolver("auto", interface="wg0", path=link, backup=backup)
    assert isinstance(auto, NoResolver) and "not a plain file" in auto.reason
    socket_path = tmp_path / "io.systemd.Resolve"
    socket_path.touch()
    monkeypatch.setattr(hostconfig, "RESOLVED_SOCKET", socket_path)
    fake_resolvectl(tmp_path, monkeypatch)
    assert isinstance(choose("auto"), Resolved)
    monkeypatch.setattr(hostconfig, "owns_host_resolver", lambda _p: False)
    elsewhere = choose("auto")
    assert isinstance(elsewhere, NoResolver) and "network namespace" in elsewhere.reason
    assert elsewhere.upstreams() == ["192.0.2.53", "192.0.2.54", "fe80::1"]


def test_a_named_namespace_owns_only_its_own_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In ``ip netns`` namespace NAME the file is ours only if it is /etc/netns/NAME's."""
    netns_dir = tmp_path / "netns"
    netns_dir.mkdir()
    me = tmp_path / "me"
    me.touch()
    (netns_dir / "lab-a").hardlink_to(me)  # stands for /run/netns/lab-a, bound to our netns
    monkeypatch.setattr(hostconfig, "NETNS_DIR", netns_dir)
    assert hostconfig._named_netns(os.stat(me)) == "lab-a"
    assert hostconfig._named_netns(os.stat(tmp_path)) is None
    assert hostconfig._same_file(me, netns_dir / "lab-a")
    assert not hostconfig._same_file(me, tmp_path / "absent")
