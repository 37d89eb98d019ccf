"""Device login through the API: create, approve, poll once, and what must be refused."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog

from gateway.appkeys import STORE
from lab.api_client import AUTH, Client, RecordingBroker
from lab.device_login import APPROVER, approve, poll, start
from lab.fakes import FakeClock


async def state(client: Client) -> tuple[int, int]:
    store = client.app[STORE]
    return len(await store.list_devices()), await store.map_version()


async def test_full_flow_hands_the_token_out_once(
    client: Client, clock: FakeClock, broker: RecordingBroker
) -> None:
    created = await start(client)
    code = created["user_code"]
    assert len(code) == 9 and code[4] == "-"
    assert created["verification_uri"].endswith("/login")
    assert created["verification_uri_complete"] == f"{created['verification_uri']}?code={code}"
    assert created["interval"] == 5 and created["expires_in"] == 600
    assert (await poll(client, created["poll_token"]))["status"] == "pending"

    shown = await client.get(f"/api/v1/login/requests/{code.lower()}", headers=AUTH)
    assert shown.status == 200
    assert (await shown.json())["name"] == "laptop-1"
    assert ":" in (await shown.json())["fingerprint"]

    resp = await approve(client, code.replace("-", " "))
    assert resp.status == 200, await resp.text()
    approved = await resp.json()
    device = approved["device"]
    assert device["identity"] == {"issuer": APPROVER["issuer"], "subject": "alice"}
    assert device["tags"] == ["tag:laptop"] and "token" not in approved
    assert broker.events[-1] == ("upsert", device["id"], approved["map_version"])

    clock.now += 5
    first = await poll(client, created["poll_token"])
    assert first["status"] == "approved" and first["device"]["id"] == device["id"]
    assert (await client.app[STORE].device_by_token(first["token"])).device.id == device["id"]
    clock.now += 5
    second = await poll(client, created["poll_token"])
    assert second["status"] == "expired" and "token" not in second
    again = await approve(client, code)
    assert again.status == 404


async def test_slow_down_adds_five_seconds(client: Client, clock: FakeClock) -> None:
    token = (await start(client))["poll_token"]
    assert (await poll(client, token))["status"] == "pending"
    clock.now += 1
    slow = await poll(client, token)
    assert (slow["status"], slow["interval"]) == ("slow_down", 10)
    clock.now += 10
    assert (await poll(client, token))["status"] == "pending"


async def test_expired_request_cannot_be_approved(client: Client, clock: FakeClock) -> None:
    created = await start(client)
    clock.now += 600
    before = await state(client)
    assert (await approve(client, created["user_code"])).status == 404
    assert (await poll(client, created["poll_token"]))["status"] == "expired"
    assert await state(client) == before


async def test_deny(client: Client, clock: FakeClock) -> None:
    created = await start(client)
    resp = await client.post(f"/api/v1/login/requests/{created['user_code']}/deny", headers=AUTH)
    assert resp.status == 200 and (await resp.json())["status"] == "denied"
    assert (await poll(client, created["poll_token"]))["status"] == "denied"
    assert await state(client) == (0, 0)


async def test_guessing_codes_is_bounded_by_the_limiter(client: Client) -> None:
    created = await start(client)
    before = await state(client)
    statuses = []
    for _ in range(12):
        statuses.append((await approve(client, "BCDF-GHJK")).status)
    assert statuses[:10] == [404] * 10 and statuses[10:] == [429, 429]
    refused = await approve(client, created["user_code"])  # even the right code, now
    assert refused.status == 429
    body = await refused.json()
    assert body["error"] == "too_many_guesses" and "too many" in body["message"]
    assert await state(client) == before


async def test_concurrent_approvals_enroll_one_device(client: Client) -> None:
    code = (await start(client))["user_code"]
    answers = await asyncio.gather(*(approve(client, code) for _ in range(6)))
    statuses = sorted(r.status for r in answers)
    assert statuses.count(200) == 1 and set(statuses) <= {200, 404, 409}
    assert (await state(client))[0] == 1


async def test_duplicate_public_key_refused(client: Client) -> None:
    created = await start(client)
    await approve(client, created["user_code"])
    resp = await client.post(
        "/api/v1/login/requests",
        json={"public_key": (await client.app[STORE].list_devices())[0].device.public_key,
              "name": "again"},
    )  # fmt: skip
    assert resp.status == 409
    assert (await resp.json())["error"] == "duplicate_public_key"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"public_key": "AAAA", "name": "x"}, 400),
        ({"public_key": "A" * 43 + "=", "name": "x"}, 400),  # all-zero key
        ({"name": "x"}, 400),
        ({"public_key": None, "name": "x", "extra": 1}, 400),
    ],
)
async def test_bad_create_bodies(client: Client, body: dict[str, Any], status: int) -> None:
    resp = await client.post("/api/v1/login/requests", json=body)
    assert resp.status == status
    assert await state(client) == (0, 0)


async def test_strict_json(client: Client) -> None:
    extra = await client.post("/api/v1/login/poll", json={"poll_token": "x", "more": 1})
    assert extra.status == 400
    text = await client.post("/api/v1/login/poll", data="poll_token=x")
    assert text.status == 415
    big = await client.post(
        "/api/v1/login/requests",
        data=b'{"name": "' + b"x" * 5000 + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert big.status == 413
    unknown = await client.post("/api/v1/login/poll", json={"poll_token": "wgp_nope"})
    assert unknown.status == 401


async def test_approval_is_admin_only(client: Client) -> None:
    code = (await start(client))["user_code"]
    resp = await client.post(f"/api/v1/login/requests/{code}/approve", json=APPROVER)
    assert resp.status == 401
    assert await state(client) == (0, 0)


async def test_codes_and_tokens_never_logged(
    client: Client, clock: FakeClock, capfd: pytest.CaptureFixture[str]
) -> None:
    with structlog.testing.capture_logs() as logs:
        created = await start(client)
        await approve(client, "BCDF-GHJK")  # refused: unknown
        await approve(client, created["user_code"])
        clock.now += 5
        got = await poll(client, created["poll_token"])
        await poll(client, created["poll_token"])
    events = {entry["event"] for entry in logs}
    assert {"login_request_created", "login_request_approved", "request_refused"} <= events
    out, err = capfd.readouterr()
    code = created["user_code"]
    for secret in (code, code.replace("-", ""), created["poll_token"], got["token"]):
        assert secret not in repr(logs) and secret not in out + err
