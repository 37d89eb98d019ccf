"""``wiregate admin devices list|rename|tag|expire`` and ``admin login list|approve --as``
against a real gateway app on a unix socket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from lab.fakes import new_key
from tests.unit.wiregate.test_cli_lifecycle import admin, invoke, socket_path
from wiregate.cli.admin_client import AdminClient

__all__ = ["socket_path"]  # the fixture these tests take


def call(path: Path, method: str, route: str, body: dict[str, Any] | None = None) -> Any:
    return asyncio.run(AdminClient(socket=path).call(method, route, body))


def enroll(path: Path, secret: str, name: str) -> dict[str, Any]:
    body = {"auth_key": secret, "public_key": new_key(), "name": name}
    device: dict[str, Any] = call(path, "POST", "/api/v1/enroll", body)["device"]
    return device


def two_devices(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    created = json.loads(admin(path, "keys", "create", "--reusable", "--tags", "tag:vm",
                               "--json"))  # fmt: skip
    return enroll(path, created["secret"], "a"), enroll(path, created["secret"], "b")


def test_devices_are_renamed_tagged_and_listed(socket_path: Path) -> None:
    a, b = two_devices(socket_path)
    out = admin(socket_path, "devices", "rename", a["id"], "db-main")
    assert out.startswith(f"renamed {a['id']} to db-main (map v3)")
    renamed = json.loads(admin(socket_path, "devices", "rename", "db-main", "db-1", "--json"))
    assert renamed["device"]["name"] == "db-1" and renamed["map_version"] == 4
    tagged = json.loads(admin(socket_path, "devices", "tag", "b", "tag:db,tag:x", "--json"))
    assert tagged["device"]["tags"] == ["tag:db", "tag:x"]
    assert "no tags" in admin(socket_path, "devices", "tag", b["id"])
    table = admin(socket_path, "devices", "list")
    head, *rows = table.strip().splitlines()
    assert head.split()[:6] == ["ID", "NAME", "ADDRESSES", "TAGS", "OWNER", "ONLINE"]
    by_name = {row.split()[1]: row for row in rows}
    assert set(by_name) == {"db-1", "b"} and " no " in by_name["b"]
    assert "tag:vm" in by_name["db-1"] and a["identity"]["subject"] in by_name["db-1"]
    listed = json.loads(admin(socket_path, "devices", "list", "--json", "--tag", "tag:vm"))
    assert [d["name"] for d in listed["devices"]] == ["db-1"]
    assert listed["devices"][0]["online"] is False
    offline = json.loads(admin(socket_path, "devices", "list", "--offline", "--json"))
    assert len(offline["devices"]) == 2
    online = json.loads(admin(socket_path, "devices", "list", "--online", "--json"))
    assert online["devices"] == []


def test_refused_device_changes_say_why(socket_path: Path) -> None:
    a, _ = two_devices(socket_path)
    taken = invoke(socket_path, "devices", "rename", a["id"], "b")
    assert taken.exit_code == 1 and "already called 'b'" in taken.output
    bad = invoke(socket_path, "devices", "rename", a["id"], "Not_A_Label")
    assert bad.exit_code == 1 and "name" in bad.output and "Traceback" not in bad.output
    unknown = invoke(socket_path, "devices", "expire", "nobody")
    assert unknown.exit_code != 0 and "no device is called 'nobody'" in unknown.output
    names = sorted(d["name"] for d in call(socket_path, "GET", "/api/v1/devices")["devices"])
    assert names == ["a", "b"]


def test_a_device_expired_from_the_cli_leaves(socket_path: Path) -> None:
    a, b = two_devices(socket_path)
    out = json.loads(admin(socket_path, "devices", "expire", "a", "--json"))
    assert out == {"device_id": a["id"], "reason": "key expired", "map_version": 3}
    assert admin(socket_path, "devices", "expire", b["id"]).startswith(f"expired {b['id']}")
    assert call(socket_path, "GET", "/api/v1/devices") == {"devices": []}


def test_logins_are_listed_and_approved_as_a_named_admin(socket_path: Path) -> None:
    body = {"public_key": new_key(), "name": "laptop-1"}
    started = call(socket_path, "POST", "/api/v1/login/requests", body)
    table = admin(socket_path, "login", "list")
    assert started["request_id"] in table and "laptop-1" in table
    assert started["user_code"] not in table
    listed = json.loads(admin(socket_path, "login", "list", "--json"))["requests"]
    assert [r["request_id"] for r in listed] == [started["request_id"]]
    usage = invoke(socket_path, "login", "approve", started["user_code"])
    assert usage.exit_code == 2 and "--as NAME" in usage.output
    half = invoke(socket_path, "login", "approve", started["user_code"], "--issuer", "x")
    assert half.exit_code == 2 and "together" in half.output
    approved = json.loads(admin(socket_path, "login", "approve", started["user_code"],
                                "--as", "alice", "--tags", "tag:laptop", "--json"))  # fmt: skip
    assert approved["device"]["identity"] == {"issuer": "wiregate:admin", "subject": "alice"}
    events = json.loads(admin(socket_path, "audit", "--json"))["events"]
    assert ("admin:socket#alice", "login.approve") in {(e["actor"], e["action"]) for e in events}
    assert json.loads(admin(socket_path, "login", "list", "--json")) == {"requests": []}
