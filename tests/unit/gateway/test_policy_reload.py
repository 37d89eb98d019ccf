"""The policy changes without a restart: a file edit, SIGHUP, the admin API.

Each case streams a real agent map over the gateway's WebSocket and checks the
change arrives as a delta; invalid documents (fields, failing tests) are refused
in one line with the old policy left in force; every change is audited.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

import gateway.livepolicy
from gateway.app import create_app, run_gateway
from gateway.appkeys import BROKER, POLICY, STORE
from gateway.store import KeySpec
from lab.api_client import ADMIN, AUTH, Client, ClientFactory, make_settings
from lab.fakes import new_key
from wiregate.errors import ConfigError

OPEN = "acls:\n  - {src: ['tag:a'], dst: ['tag:b']}\n"
CLOSED = "acls:\n  - {src: ['tag:a'], dst: ['tag:c']}\n"
PORTED = "acls:\n  - {src: ['tag:a'], dst: ['tag:b'], ports: ['tcp:5432']}\n"
TESTED = "tests:\n  - {src: tag:a, accept: ['tag:b:5432'], deny: ['tag:b:22']}\n"


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.livepolicy, "FILE_POLL_S", 0.1)


async def enroll_as(http: aiohttp.ClientSession, base: str, secret: str) -> dict[str, Any]:
    body = {"auth_key": secret, "public_key": new_key(), "name": "host"}
    async with http.post(f"{base}/api/v1/enroll", json=body) as resp:
        assert resp.status == 201, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> dict[str, Any]:
    msg = await ws.receive(timeout)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    data: dict[str, Any] = json.loads(msg.data)
    return data


async def nothing_within(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        await ws.receive(seconds)


async def pair(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """Devices tagged tag:a and tag:b, enrolled through the API."""
    store, out = client.app[STORE], []
    for tag in ("tag:a", "tag:b"):
        _key, secret = await store.create_key(KeySpec(tags=(tag,)))
        body = {"auth_key": secret, "public_key": new_key(), "name": tag[4:]}
        resp = await client.post("/api/v1/enroll", json=body)
        assert resp.status == 201, await resp.text()
        out.append(await resp.json())
    return out[0], out[1]


def write(path: Path, text: str) -> None:
    """Replace the file the way editors and ConfigMaps do: a new inode, renamed over."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


async def put(client: Client, document: str, fmt: str = "yaml") -> aiohttp.ClientResponse:
    return await client.put("/api/v1/policy", json={"document": document, "format": fmt},
                            headers=AUTH)  # fmt: skip


@pytest.fixture
async def gw(aiohttp_client: ClientFactory, tmp_path: Path) -> Client:
    policy = tmp_path / "policy.yaml"
    policy.write_text(OPEN)
    return await aiohttp_client(create_app(make_settings(tmp_path, policy_file=policy)))


async def test_a_file_edit_changes_a_connected_agents_map(gw: Client, tmp_path: Path) -> None:
    a, b = await pair(gw)
    headers = {"Authorization": f"Bearer {a['token']}"}
    async with gw.ws_connect("/api/v1/stream", headers=headers) as ws:
        full = await receive(ws)
        assert [p["id"] for p in full["peers"]] == [b["device"]["id"]]
        write(tmp_path / "policy.yaml", CLOSED)
        delta = await receive(ws)
        assert (delta["type"], delta["remove"], delta["base"]) == (
            "delta", [b["device"]["id"]], full["version"])  # fmt: skip
        unknown = "acls:\n  - {src: ['group:nope'], dst: ['*']}\n"
        failing = OPEN + "tests:\n  - {src: tag:a, deny: ['tag:b:22']}\n"
        invalid = {  # refused in one line each, the old policy kept
            unknown: 'acls[0].src[0]: unknown group "nope"',
            failing: "policy test failed: tests[0] (src tag:a): tag:b:22 should be denied but "
            "is accepted",
        }
        for document, error in invalid.items():
            with capture_logs() as logs:
                write(tmp_path / "policy.yaml", document)
                await nothing_within(ws, 1.0)
            [refused] = [e for e in logs if e["event"] == "policy_reload_refused"]
            assert refused["error"] == error and refused["cause"] == "file"
        write(tmp_path / "policy.yaml", OPEN)
        back = await receive(ws)
        assert [p["id"] for p in back["upsert"]] == [b["device"]["id"]]
        assert back["base"] == delta["version"]
    actions = [e for e in await gw.app[STORE].list_audit() if e.action == "policy.set"]
    assert [e.actor for e in actions] == ["system:policy-file"] * 3  # start, edit, back


async def test_the_api_sets_gets_and_resets_the_policy(gw: Client, tmp_path: Path) -> None:
    a, b = await pair(gw)
    headers = {"Authorization": f"Bearer {b['token']}"}
    before = (await (await gw.get("/api/v1/policy", headers=AUTH)).json())["policy"]
    assert (before["source"], before["document"]) == ("file", OPEN)
    async with gw.ws_connect("/api/v1/stream", headers=headers) as ws:
        full = await receive(ws)
        assert full["peers"][0].get("filter") is None  # a may open everything on b
        resp = await put(gw, PORTED + TESTED)
        assert resp.status == 200, await resp.text()
        done = await resp.json()
        assert done["changed"] and done["previous_hash"] == before["hash"]
        delta = await receive(ws)
        [peer] = delta["upsert"]
        assert peer["id"] == a["device"]["id"] and peer["filter"] == ["tcp:5432"]
        assert delta["version"] == done["policy"]["version"] == gw.app[BROKER].version
        now = (await (await gw.get("/api/v1/policy", headers=AUTH)).json())["policy"]
        assert (now["source"], now["document"], now["set_by"]) == (
            "api", PORTED + TESTED, "admin:token")  # fmt: skip
        # the file no longer wins while the API-set policy is in force
        with capture_logs() as logs:
            write(tmp_path / "policy.yaml", CLOSED)
            await nothing_within(ws, 1.0)
        assert any(e["event"] == "policy_file_ignored" for e in logs)
        resp = await gw.delete("/api/v1/policy", headers=AUTH)
        assert resp.status == 200 and (await resp.json())["policy"]["source"] == "file"
        assert (await receive(ws))["remove"] == [a["device"]["id"]]  # CLOSED: b sees no a
    audit = await gw.app[STORE].list_audit()  # newest first
    reset, api_set, _start = [e for e in audit if e.action == "policy.set"]
    assert api_set.actor == "admin:token" and reset.actor == "admin:token"
    assert api_set.detail["old_hash"] == before["hash"]
    assert api_set.detail["new_hash"] == done["policy"]["hash"] == reset.detail["old_hash"]
    assert reset.detail["new_hash"] != before["hash"]  # the file as it is now: CLOSED


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("acls: [{src: ['tag:a']}]", "policy refused: acls[0]: missing 'dst'"),
        ("acls: [\n", "policy refused: the policy does not parse"),
        (OPEN + "tests:\n  - {src: tag:a, deny: ['tag:b:5432']}\n",
         "policy refused: policy test failed: tests[0] (src tag:a): tag:b:5432 should be denied "
         "but is accepted"),
    ],
)  # fmt: skip
async def test_an_invalid_policy_is_refused_and_the_old_one_stays(
    gw: Client, document: str, message: str
) -> None:
    before = await (await gw.get("/api/v1/policy", headers=AUTH)).json()
    version = await gw.app[STORE].map_version()
    resp = await put(gw, document)
    assert resp.status == 400
    error = await resp.json()
    assert error["message"].startswith(message) and "\n" not in error["message"]
    assert await (await gw.get("/api/v1/policy", headers=AUTH)).json() == before
    assert await gw.app[STORE].map_version() == version
    assert gw.app[POLICY].document.policy == gw.app[BROKER].policy


async def test_the_policy_routes_need_the_admin_token(gw: Client) -> None:
    assert (await gw.get("/api/v1/policy")).status == 401
    resp = await gw.put("/api/v1/policy", json={"document": OPEN})
    assert resp.status == 401


async def test_the_same_document_again_changes_nothing(gw: Client) -> None:
    first = await (await put(gw, CLOSED)).json()
    again = await (await put(gw, CLOSED)).json()
    assert first["changed"] and not again["changed"]
    assert again["policy"]["version"] == first["policy"]["version"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setattr(gateway.livepolicy, "FILE_POLL_S", 3600.0)  # only SIGHUP reloads
    policy = tmp_path / "policy.yaml"
    policy.write_text(OPEN)
    port = _free_port()
    settings = make_settings(tmp_path, policy_file=policy, listen=f"127.0.0.1:{port}",
                             metrics_listen=f"127.0.0.1:{_free_port()}")  # fmt: skip
    task = asyncio.create_task(run_gateway(settings))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(400):
            hup = signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)
            try:
                async with http.get(f"{base}/livez") as resp:
                    if resp.status == 200 and hup:
                        break
            except aiohttp.ClientConnectorError:
                pass
            await asyncio.sleep(0.05)
    try:
        yield base
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_sighup_reloads_the_policy_file(served: str, tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as http:
        devices = []
        for tag in ("tag:a", "tag:b"):
            async with http.post(f"{served}/api/v1/keys", json={"tags": [tag]},
                                 headers=auth) as resp:  # fmt: skip
                assert resp.status == 201
                secret = (await resp.json())["secret"]
            devices.append(await enroll_as(http, served, secret))
        a, b = devices
        headers = {"Authorization": f"Bearer {a['token']}"}
        async with http.ws_connect(f"{served}/api/v1/stream", headers=headers) as ws:
            assert [p["id"] for p in (await receive(ws))["peers"]] == [b["device"]["id"]]
            (tmp_path / "policy.yaml").write_text(CLOSED)
            await nothing_within(ws, 1.0)  # no polling: the edit alone changes nothing
            os.kill(os.getpid(), signal.SIGHUP)
            assert (await receive(ws))["remove"] == [b["device"]["id"]]
        async with http.get(f"{served}/api/v1/audit", headers=auth) as resp:
            events = (await resp.json())["events"]
        [hup] = [e for e in events if e["action"] == "policy.set" and e["actor"] == "system:sighup"]
        assert hup["detail"]["source"] == "file"


async def test_an_api_set_policy_survives_a_restart_over_the_file(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(OPEN)
    settings = make_settings(tmp_path, policy_file=policy)
    first = await aiohttp_client(create_app(settings))
    assert (await put(first, CLOSED)).status == 200
    await first.close()
    with capture_logs() as logs:
        again = await aiohttp_client(create_app(settings))  # the same database and file
    got = (await (await again.get("/api/v1/policy", headers=AUTH)).json())["policy"]
    assert (got["source"], got["document"]) == ("api", CLOSED)
    assert again.app[BROKER].policy == again.app[POLICY].document.policy
    assert not again.app[BROKER].policy.may_peer({"tag:a"}, {"tag:b"})  # CLOSED, not OPEN
    assert any(e["event"] == "policy_file_ignored" for e in logs)


async def test_a_file_whose_tests_fail_refuses_the_start(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(OPEN + "tests:\n  - {src: tag:b, accept: ['tag:c:1']}\n")
    with pytest.raises(ConfigError, match=r"^policy test failed: tests\[0\] \(src tag:b\)"):
        await aiohttp_client(create_app(make_settings(tmp_path, policy_file=policy)))


async def test_key_expiry_follows_the_policy_in_force(gw: Client) -> None:
    store = gw.app[STORE]
    _key, secret = await store.create_key(KeySpec(tags=("tag:a",)))
    body = {"auth_key": secret, "public_key": new_key(), "name": "before"}
    before = await (await gw.post("/api/v1/enroll", json=body)).json()
    assert before["device"]["expires_at"] is None  # no key_expiry anywhere
    assert (await put(gw, OPEN + "key_expiry: {'tag:a': 1d}\n")).status == 200
    _key, secret = await store.create_key(KeySpec(tags=("tag:a",)))
    body = {"auth_key": secret, "public_key": new_key(), "name": "after"}
    after = await (await gw.post("/api/v1/enroll", json=body)).json()
    assert after["device"]["expires_at"] is not None
