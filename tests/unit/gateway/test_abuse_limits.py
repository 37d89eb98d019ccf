"""Abuse of device login through the API and the pages: floods of login requests,
user-code guessing behind a proxy, sign-out on every replica (issue: an outside probe).

Each test replays the attack as it was found; different client addresses are real
source addresses on loopback (127.0.0.x).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.store import logins as logins_module
from gateway.web.sessions import csrf_token
from lab.api_client import AUTH, RecordingBroker, make_settings
from lab.fakes import FakeClock, new_key
from tests.unit.gateway.test_web_pages import cookie, make_session, pending_code, sso_settings

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]
Session = Callable[[str], aiohttp.ClientSession]
LOGIN = "/api/v1/login/requests"


@pytest.fixture
async def from_address() -> AsyncIterator[Session]:
    """HTTP sessions whose connections come from a given loopback address."""
    opened: list[aiohttp.ClientSession] = []

    def make(address: str) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)
        opened.append(aiohttp.ClientSession(connector=connector))
        return opened[-1]

    yield make
    for session in opened:
        await session.close()


async def _start(http: aiohttp.ClientSession | Client, url: str, **headers: str) -> int:
    body = {"public_key": new_key(), "name": "laptop"}
    async with http.post(url, json=body, headers=headers) as resp:
        return resp.status


async def test_a_login_flood_from_one_address_leaves_others_able_to_log_in(
    client: Client, from_address: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logins_module, "MAX_PENDING", 30)  # the flood, scaled down
    url = str(client.make_url(LOGIN))
    flood = [await _start(client, LOGIN) for _ in range(40)]
    assert flood.count(201) < 30 and flood[-1] == 429
    assert await _start(from_address("127.0.0.2"), url) == 201


async def test_a_flood_from_several_addresses_gives_way_to_a_newcomer(
    client: Client, from_address: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logins_module, "MAX_PENDING", 30)
    url = str(client.make_url(LOGIN))
    for address in ("127.0.0.11", "127.0.0.12", "127.0.0.13"):
        http = from_address(address)
        assert [await _start(http, url) for _ in range(10)] == [201] * 10
    assert await _start(from_address("127.0.0.2"), url) == 201  # the cap is full: a fair share
    refused = await _start(from_address("127.0.0.11"), url)
    assert refused == 429  # the flooders' own buckets are empty


async def test_behind_a_trusted_proxy_each_client_has_its_own_bucket(
    aiohttp_client: ClientFactory, tmp_path: Path, clock: FakeClock
) -> None:
    settings = make_settings(tmp_path, trusted_proxies=["127.0.0.0/8"])
    client = await aiohttp_client(create_app(settings, broker_factory=RecordingBroker, clock=clock))
    # the proxy appends the client's address; what the client sent before it is not believed
    spoofed = [await _start(client, LOGIN, **{"X-Forwarded-For": f"10.9.9.{i}, 203.0.113.5"})
               for i in range(12)]  # fmt: skip
    assert spoofed == [201] * 10 + [429] * 2
    assert await _start(client, LOGIN, **{"X-Forwarded-For": "198.51.100.9"}) == 201


async def test_without_trusted_proxies_forwarded_for_is_ignored(client: Client) -> None:
    statuses = [await _start(client, LOGIN, **{"X-Forwarded-For": f"203.0.113.{i}"})
                for i in range(12)]  # fmt: skip
    assert statuses == [201] * 10 + [429] * 2


async def test_people_guessing_codes_behind_a_proxy_do_not_lock_out_others(
    aiohttp_client: ClientFactory, tmp_path: Path, clock: FakeClock
) -> None:
    settings = sso_settings(tmp_path, trusted_proxies=["127.0.0.0/8"])
    client = await aiohttp_client(create_app(settings, broker_factory=RecordingBroker, clock=clock))
    for n in range(7):  # seven signed-in people, each typing random codes from their desk
        headers = {**cookie(client, make_session(f"user{n}")), "X-Forwarded-For": f"10.1.0.{n}"}
        statuses = [(await client.get("/login?user_code=BCDF-GHJK", headers=headers)).status
                    for _ in range(12)]  # fmt: skip
        assert statuses.count(404) <= 10 and statuses[-1] == 429
    code, _ = await pending_code(client)
    who = {"issuer": "https://idp.example", "subject": "carol"}
    approve = await client.post(f"{LOGIN}/{code}/approve", headers=AUTH, json=who)
    assert approve.status == 200, await approve.text()  # an admin is never locked out
    code, _ = await pending_code(client, "laptop-2")
    clock.advance(1.0)  # the global bucket refills two lookups a second
    headers = {**cookie(client, make_session("dave")), "X-Forwarded-For": "10.1.0.99"}
    page = await client.get(f"/login?user_code={code}", headers=headers)
    assert page.status == 200 and "laptop-2" in await page.text()


async def test_a_session_signed_out_on_one_replica_is_refused_by_another(
    aiohttp_client: ClientFactory, tmp_path: Path, clock: FakeClock
) -> None:
    settings = sso_settings(tmp_path)
    clients = [
        await aiohttp_client(create_app(settings, broker_factory=RecordingBroker, clock=clock))
        for _ in range(2)
    ]
    me = make_session()
    headers: dict[str, Any] = {**cookie(clients[0], me), "Origin": "http://127.0.0.1:8080"}
    before = await clients[1].get("/devices", headers=cookie(clients[1], me))
    assert before.status == 200
    out = await clients[0].post("/logout", data={"csrf": csrf_token(me)}, headers=headers)
    assert out.status == 200
    after = await clients[1].get("/devices", headers=cookie(clients[1], me))
    assert after.status != 200 and "Sign out" not in await after.text()


async def test_login_and_guess_budgets_hold_across_replicas(
    aiohttp_client: ClientFactory, tmp_path: Path, clock: FakeClock
) -> None:
    settings = sso_settings(tmp_path)  # two replicas on one database
    a, b = [
        await aiohttp_client(create_app(settings, broker_factory=RecordingBroker, clock=clock))
        for _ in range(2)
    ]
    # one address's login requests, alternating replicas: one budget, not one per replica
    statuses = [await _start(client, LOGIN) for client in [a, b] * 6]
    assert statuses == [201] * 10 + [429] * 2
    me = make_session("mallory")
    guesses = [
        (await c.get("/login?user_code=BCDF-GHJK", headers=cookie(c, me))).status
        for c in [a, b] * 6
    ]
    assert guesses == [404] * 10 + [429] * 2


async def test_an_ipv6_client_is_its_slash_64(
    aiohttp_client: ClientFactory, tmp_path: Path, clock: FakeClock
) -> None:
    settings = make_settings(tmp_path, trusted_proxies=["127.0.0.1/32", "::1/128"])
    client = await aiohttp_client(create_app(settings, broker_factory=RecordingBroker, clock=clock))
    same_64 = [await _start(client, LOGIN, **{"X-Forwarded-For": f"2001:db8:1:2::{i:x}"})
               for i in range(1, 13)]  # fmt: skip
    assert same_64 == [201] * 10 + [429] * 2
    assert await _start(client, LOGIN, **{"X-Forwarded-For": "2001:db8:1:3::1"}) == 201
    # a proxy listed in trusted_proxies is skipped, whatever its place in the chain
    chain = "2001:db8:1:2::99, 127.0.0.1"
    assert await _start(client, LOGIN, **{"X-Forwarded-For": chain}) == 429


def test_trusted_proxies_must_be_networks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trusted_proxies"):
        make_settings(tmp_path, trusted_proxies=["10.0.0.1/8"])
