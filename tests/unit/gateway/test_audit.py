"""The audit log: records commit with the change they describe, never hold secrets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.store import EnrollRequest, KeySpec, Store
from gateway.store.audit import check_detail, oidc_actor
from lab.fakes import FakeClock
from wiregate.keys import encode_key, generate_private_key, public_from_private
from wiregate.model import Identity
from wiregate.settings import GatewaySettings


def pub() -> str:
    return encode_key(public_from_private(generate_private_key()))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(
        f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", clock=FakeClock(1_800_000_000.0)
    )
    yield s
    await s.close()


async def test_changes_record_who_did_them(store: Store) -> None:
    key, secret = await store.create_key(KeySpec(tags=("tag:vm",)), actor="admin:socket")
    enrolled = await store.enroll(secret, EnrollRequest(pub(), "vm1"))
    await store.revoke_key(key.id, actor="admin:token")
    await store.delete_device(enrolled.record.device.id, actor="admin:socket")
    events = await store.list_audit()
    seen = [(e.actor, e.action, e.target) for e in reversed(events)]
    dev = enrolled.record.device.id
    assert seen == [
        ("admin:socket", "key.create", key.id),
        (f"device:{dev}", "device.enroll", dev),
        ("admin:token", "key.revoke", key.id),
        ("admin:socket", "device.delete", dev),
    ]
    assert events[-1].detail["tags"] == "tag:vm"
    assert events[-2].detail["key_id"] == key.id
    assert secret not in json.dumps([e.detail for e in events])


async def test_a_refused_change_records_nothing(store: Store) -> None:
    with pytest.raises(Exception, match="no device"):
        await store.delete_device("dev_missing", actor="admin:socket")
    assert await store.list_audit() == []


async def test_login_approval_and_denial_are_recorded(store: Store) -> None:
    now = 1_800_000_000.0
    a = await store.create_login_request(pub(), "laptop", now)
    b = await store.create_login_request(pub(), "phone", now)
    who = Identity("https://idp.example", "alice")
    await store.approve_login_request(a.record.id, who, ["tag:dev"], now)
    await store.deny_login_request(b.record.id, now, actor="admin:socket")
    approve, deny = reversed(await store.list_audit())
    assert (approve.actor, approve.action) == (oidc_actor(who), "login.approve")
    assert approve.actor == "oidc:https://idp.example#alice"
    assert (deny.actor, deny.action, deny.target) == ("admin:socket", "login.deny", b.record.id)
    assert a.user_code not in json.dumps(approve.detail)


async def test_since_and_limit(store: Store) -> None:
    clock = FakeClock(1_800_000_000.0)
    for i in range(5):
        await store.record_audit("system:test", "test.event", f"t{i}", {"i": str(i)})
    assert [e.target for e in await store.list_audit(limit=2)] == ["t4", "t3"]
    assert await store.list_audit(since=clock.now + 1) == []
    assert len(await store.list_audit(since=clock.now)) == 5


def test_detail_refuses_secret_keys() -> None:
    for key in ("secret", "token", "poll_token", "private_key", "user_code", "auth_key"):
        with pytest.raises(ValueError, match="secret"):
            check_detail({key: "x"})
    assert check_detail({"key_id": "key_1"}) == {"key_id": "key_1"}


async def test_audit_route(tmp_path: Path) -> None:
    settings = GatewaySettings(state_dir=tmp_path, admin_socket=tmp_path / "a.sock")
    (tmp_path / "admin.token").write_text("t" * 32)
    (tmp_path / "admin.token").chmod(0o600)
    settings = settings.model_copy(update={"admin_token_file": tmp_path / "admin.token"})
    app = create_app(settings, clock=FakeClock(1_800_000_000.0))
    async with TestClient(TestServer(app)) as client:
        auth = {"Authorization": "Bearer " + "t" * 32}
        created = await client.post("/api/v1/keys", json={"tags": []}, headers=auth)
        assert created.status == 201
        resp = await client.get("/api/v1/audit?limit=10", headers=auth)
        assert resp.status == 200
        (event,) = (await resp.json())["events"]
        assert event["actor"] == "admin:token"
        assert event["action"] == "key.create"
        assert event["at"] == "2027-01-15T08:00:00Z"
        unauth = await client.get("/api/v1/audit")
        assert unauth.status == 401
        bad = await client.get("/api/v1/audit?limit=0", headers=auth)
        assert bad.status == 400
        since = await client.get("/api/v1/audit?since=2027-01-16T00:00:00Z", headers=auth)
        assert (await since.json())["events"] == []
