"""``wiregate up/down/logout/ip/whois/ping/completion`` and ``--json`` errors: the pure
parts, the ICMP codec, and the commands against an agent socket served by a fake
agent (a real unix socket in a thread of its own)."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.control import control_routes
from agent.status import serve_status
from wiregate.cli.host import agent_command
from wiregate.cli.icmp import build_echo, checksum, parse_reply
from wiregate.cli.lookup import describe_path, find_peer, pick_addresses
from wiregate.cli.main import main
from wiregate.errors import BadInput, NotFound, Unavailable
from wiregate.model import NetMap, Peer, SelfView

KEY = "A" * 43 + "="

STATUS: dict[str, Any] = {
    "state": "up",
    "interface": "wg0",
    "device": {"id": "d1", "name": "me", "addresses": ["100.64.0.1/32", "fd7a::1/128"]},
    "gateway": {"connected": True},
    "peers": [
        {
            "id": "d2",
            "name": "db",
            "addresses": ["100.64.0.2/32", "fd7a::2/128"],
            "endpoint": "192.0.2.2:51820",
            "path": {"path": "direct", "state": "direct", "relay": None},
        },
        {
            "id": "d3",
            "name": "web",
            "addresses": ["100.64.0.3/32", "fd7a::3/128"],
            "endpoint": "198.51.100.9:40001",
            "path": {"path": "relayed", "state": "relayed_tcp", "relay": "r1"},
        },
        {"id": "d4", "name": "Web", "addresses": ["100.64.0.4/32"], "path": None},
    ],
}


# --------------------------------------------------------------------------- pure parts


def test_find_peer_by_id_address_or_name() -> None:
    assert find_peer(STATUS, "d3")["name"] == "web"
    assert find_peer(STATUS, "100.64.0.2")["id"] == "d2"
    assert find_peer(STATUS, "fd7a::0:2")["id"] == "d2"
    assert find_peer(STATUS, "DB")["id"] == "d2"
    with pytest.raises(BadInput, match="names 2 peers"):
        find_peer(STATUS, "web")  # "web" and "Web"
    with pytest.raises(NotFound):
        find_peer(STATUS, "100.64.0.99")


def test_pick_addresses() -> None:
    addresses = ["100.64.0.1/32", "fd7a::1/128"]
    assert pick_addresses(addresses, None) == ["100.64.0.1", "fd7a::1"]
    assert pick_addresses(addresses, 4) == ["100.64.0.1"]
    assert pick_addresses(addresses, 6) == ["fd7a::1"]


def test_describe_path() -> None:
    peers = STATUS["peers"]
    assert describe_path(peers[0]) == ("direct", "direct to 192.0.2.2:51820")
    assert describe_path(peers[1]) == ("relayed", "relayed via r1 (tcp)")
    udp = {**peers[1], "path": {"path": "relayed", "state": "relayed", "relay": "r2"}}
    assert describe_path(udp) == ("relayed", "relayed via r2 (udp)")
    assert describe_path(peers[2])[0] == "unknown"


# --------------------------------------------------------------------------- ICMP


def test_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3: the sum of 0001 f203 f4f5 f6f7 is ddf2 (one's complement: 220d)
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_echo_request_v4_checksums_to_zero_and_v6_leaves_it_to_the_kernel() -> None:
    packet = build_echo(4, 0x1234, 7, b"odd")
    assert packet[0] == 8 and checksum(packet) == 0
    assert struct.unpack("!HH", packet[4:8]) == (0x1234, 7)
    v6 = build_echo(6, 0x1234, 7, b"")
    assert v6[0] == 128 and v6[2:4] == b"\0\0"


def test_parse_reply() -> None:
    reply = struct.pack("!BBHHH", 0, 0, 0, 0x1234, 9) + b"x"
    ip = bytes([0x45]) + bytes(19)
    assert parse_reply(4, ip + reply, ip_header=True) == (0x1234, 9)
    assert parse_reply(4, reply, ip_header=False) == (0x1234, 9)
    assert parse_reply(4, build_echo(4, 1, 1, b""), ip_header=False) is None  # a request
    assert parse_reply(4, reply[:5], ip_header=False) is None
    assert parse_reply(4, bytes([0x60]) + bytes(30), ip_header=True) is None
    v6 = struct.pack("!BBHHH", 129, 0, 0, 5, 6)
    assert parse_reply(6, v6, ip_header=True) == (5, 6)
    assert parse_reply(6, struct.pack("!BBHHH", 1, 4, 0, 5, 6), ip_header=False) is None


# --------------------------------------------------------------------------- JSON errors


def test_json_errors_on_stdout_with_a_code() -> None:
    result = CliRunner().invoke(main, ["status", "--run-dir", "/nonexistent", "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["error"]["code"] == "unavailable"
    assert "no agent answers" in doc["error"]["message"] and doc["error"]["hint"]


def test_usage_errors_are_json_too() -> None:
    result = CliRunner().invoke(main, ["ping", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["code"] == "usage"
    bad = CliRunner().invoke(main, ["ping", "db", "--count", "0", "--json"])
    assert bad.exit_code == 2
    assert json.loads(bad.stdout)["error"]["code"] == "bad_parameter"


def test_admin_errors_are_json_under_json() -> None:
    args = ["admin", "--socket", "/nonexistent/gw.sock", "keys", "list", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["message"]


def test_plain_errors_without_json() -> None:
    result = CliRunner().invoke(main, ["status", "--run-dir", "/nonexistent"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: no agent answers")


# --------------------------------------------------------------------------- completion


@pytest.mark.parametrize(
    ("shell", "marker"),
    [("bash", "complete -o nosort"), ("zsh", "#compdef wiregate"), ("fish", "complete ")],
)
def test_completion_scripts(shell: str, marker: str) -> None:
    result = CliRunner().invoke(main, ["completion", shell])
    assert result.exit_code == 0 and marker in result.stdout
    assert "_WIREGATE_COMPLETE" in result.stdout


def test_completion_completes_commands() -> None:
    env = {"_WIREGATE_COMPLETE": "bash_complete", "COMP_WORDS": "wiregate wh", "COMP_CWORD": "1"}
    result = CliRunner().invoke(main, [], env=env, prog_name="wiregate")
    assert "whois" in result.stdout


# --------------------------------------------------------------------------- up's agent


def test_agent_command_passes_given_flags_and_references_only() -> None:
    flags = {"server": "https://gw", "auth_key": "file:/etc/k", "interface": "wg1",
             "listen_port": 51821, "hostname": None}  # fmt: skip
    cmd = agent_command(Path("/etc/wiregate/wiregate.toml"), flags)
    assert "agent" in cmd and cmd[cmd.index("--config") + 1] == "/etc/wiregate/wiregate.toml"
    assert cmd[cmd.index("--auth-key") + 1] == "file:/etc/k"
    assert cmd[cmd.index("--listen-port") + 1] == "51821"
    assert "--hostname" not in cmd


def test_up_refuses_a_literal_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["up", "--auth-key", "wgk_secret", "--json"])
    assert result.exit_code == 2 and "wgk_secret" not in result.stdout
    assert json.loads(result.stdout)["error"]["code"] == "bad_parameter"


# --------------------------------------------------------------------------- a fake agent


class FakeAgent:
    def __init__(self) -> None:
        self.ops: list[str] = []
        self.doc = json.loads(json.dumps(STATUS))

    async def handle_control(self, op: str) -> dict[str, Any]:
        self.ops.append(op)
        if op == "logout":
            return {"device_id": "d1", "deleted_at_gateway": False, "note": "unreachable"}
        self.doc["state"] = op
        return {"state": op, "interface": "wg0"}

    def current_map(self) -> NetMap | None:
        me = SelfView("d1", "me", KEY, ("100.64.0.1/32",))
        db = Peer("d2", "db", KEY, ("100.64.0.2/32",), ("100.64.0.2/32", "10.9.0.0/16"),
                  tags=("tag:db",))  # fmt: skip
        return NetMap(1, me, {"d2": db})

    async def owner_of(self, device_id: str) -> dict[str, Any]:
        if device_id == "d1":
            raise Unavailable("cannot reach the gateway at https://gw.example")
        owner = {"issuer": "https://idp.example", "subject": "alice", "kind": "person",
                 "via": "corp", "email": "alice@example.com", "name": "Alice"}  # fmt: skip
        return {"device": {"id": device_id}, "owner": owner}

    def status(self) -> dict[str, Any]:
        return dict(self.doc)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[FakeAgent, Path]]:
    fake, run_dir = FakeAgent(), tmp_path / "run"
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def serve() -> None:
        await serve_status(run_dir / "agent.sock", fake, control_routes(fake))
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    assert ready.wait(5)
    yield fake, run_dir
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_ip(agent: tuple[FakeAgent, Path]) -> None:
    _, run_dir = agent
    assert run("ip", "--run-dir", str(run_dir)).stdout.split() == ["100.64.0.1", "fd7a::1"]
    assert run("ip", "-4", "--run-dir", str(run_dir)).stdout.strip() == "100.64.0.1"
    assert run("ip", "-6", "--run-dir", str(run_dir)).stdout.strip() == "fd7a::1"
    assert run("ip", "-4", "db", "--run-dir", str(run_dir)).stdout.strip() == "100.64.0.2"
    doc = json.loads(run("ip", "--json", "--run-dir", str(run_dir)).stdout)
    assert doc == {"addresses": ["100.64.0.1", "fd7a::1"]}
    missing = run("ip", "nobody", "--json", "--run-dir", str(run_dir))
    assert missing.exit_code == 1
    assert json.loads(missing.stdout)["error"]["code"] == "not_found"


def test_whois(agent: tuple[FakeAgent, Path]) -> None:
    _, run_dir = agent
    result = run("whois", "10.9.8.7", "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    assert "db (d2)" in result.stdout and "tag:db" in result.stdout
    assert "10.9.0.0/16 (routed prefix)" in result.stdout
    owner = "person Alice <alice@example.com> (subject alice, issuer https://idp.example, via corp)"
    assert f"owner    {owner}" in result.stdout
    doc = json.loads(run("whois", "100.64.0.2", "--json", "--run-dir", str(run_dir)).stdout)
    assert doc["device"]["id"] == "d2" and doc["tagged"] is True
    assert doc["owner"]["subject"] == "alice" and doc["owner"]["email"] == "alice@example.com"
    mine = run("whois", "100.64.0.1", "--run-dir", str(run_dir))  # the gateway did not answer
    assert mine.exit_code == 0 and "owner    - (the gateway did not say" in mine.stdout
    bad = run("whois", "not-an-ip", "--json", "--run-dir", str(run_dir))
    assert bad.exit_code == 1 and json.loads(bad.stdout)["error"]["code"] == "bad_input"


def test_down_up_logout(agent: tuple[FakeAgent, Path]) -> None:
    fake, run_dir = agent
    down = run("down", "--run-dir", str(run_dir))
    assert down.exit_code == 0 and "wg0 removed" in down.stdout
    up = run("up", "--run-dir", str(run_dir), "--json")
    assert up.exit_code == 0, up.output
    assert json.loads(up.stdout)["state"] == "up"
    out = run("logout", "--run-dir", str(run_dir))
    assert out.exit_code == 0 and "wiregate admin devices remove d1" in out.stderr
    assert fake.ops == ["down", "up", "logout"]


def test_ping_needs_a_known_peer(agent: tuple[FakeAgent, Path]) -> None:
    _, run_dir = agent
    result = run("ping", "nobody", "--json", "--run-dir", str(run_dir))
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "not_found"


def test_status_text_says_when_the_tunnel_is_down() -> None:
    from wiregate.cli.device import format_status

    assert "down (`wiregate up`" in format_status({**STATUS, "state": "down"})
    assert "down (" not in format_status(STATUS)


def _icmp_socket_available() -> bool:
    from wiregate.cli.icmp import EchoSocket
    from wiregate.errors import LocalError

    try:
        EchoSocket.open("127.0.0.1", ident=1).close()
    except LocalError:
        return False
    return True


@pytest.mark.skipif(not _icmp_socket_available(), reason="no ICMP socket (not root, no ping group)")
@pytest.mark.parametrize("family", ["-4", "-6"])
def test_ping_loopback_peer_reports_each_reply_with_its_path(
    agent: tuple[FakeAgent, Path], family: str
) -> None:
    """The real ICMP socket against loopback, posing as a peer's tunnel address."""
    fake, run_dir = agent
    lo = {"id": "d9", "name": "lo", "addresses": ["127.0.0.1/32", "::1/128"],
          "endpoint": "192.0.2.9:51820", "path": {"path": "relayed", "relay": "r1"}}  # fmt: skip
    fake.doc["peers"] = [*fake.doc["peers"], lo]
    args = ["ping", "lo", "-c", "2", "--timeout", "1", "--run-dir", str(run_dir), "--json"]
    if family == "-6":
        args.append("-6")
    result = run(*args)
    doc = json.loads(result.stdout)
    assert result.exit_code == 1, result.output  # relayed only: no direct path
    assert doc["direct"] is False and [r["seq"] for r in doc["replies"]] == [1, 2]
    assert doc["replies"][0]["address"] == ("::1" if family == "-6" else "127.0.0.1")
    assert doc["replies"][0]["via"] == "relayed via r1 (udp)"
    lo["path"] = {"path": "direct"}
    text = run("ping", "lo", "--run-dir", str(run_dir))
    assert text.exit_code == 0, text.output
    assert text.stdout.count("reply from lo") == 1  # until direct: the first reply
    assert "direct to 192.0.2.9:51820 in" in text.stdout


def test_up_not_enrolled_without_a_server_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WIREGATE_SERVER", raising=False)
    state, run_dir = tmp_path / "state", tmp_path / "run"
    args = ["up", "--state-dir", str(state), "--run-dir", str(run_dir), "--service", "none"]
    result = run(*args, "--json")
    assert result.exit_code == 2
    assert "--server" in json.loads(result.stdout)["error"]["message"]
    assert not state.exists() and not run_dir.exists()
