"""A policy change made on one replica reaches agents streaming from the other (real
PostgreSQL): set through the API, or by editing one replica's policy file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import gateway.livepolicy
from gateway.app import create_app
from gateway.appkeys import BROKER, FOLLOWER, POLICY
from lab.pg import PgServer
from tests.service.test_replicas import (
    AUTH,
    Client,
    ClientFactory,
    enroll,
    receive,
    settings,
    wait_for,
)

OPEN = "acls:\n  - {src: ['*'], dst: ['*']}\n"
CLOSED = "acls: []\n"


@pytest.fixture
def db_url(pg_server: PgServer) -> str:
    return pg_server.create_database()


@pytest.fixture
async def replicas(
    aiohttp_client: ClientFactory, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Client, Client]]:
    monkeypatch.setattr(gateway.livepolicy, "FILE_POLL_S", 0.1)
    clients: list[Client] = []
    for name in ("a", "b"):
        policy = tmp_path / f"policy-{name}.yaml"
        policy.write_text(OPEN)
        config = settings(tmp_path, name, db_url).model_copy(update={"policy_file": policy})
        clients.append(await aiohttp_client(create_app(config)))
    a, b = clients
    await wait_for(lambda: a.app[FOLLOWER].listening and b.app[FOLLOWER].listening, 10)
    yield a, b


async def two_devices(a: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    response = await a.post("/api/v1/keys", json={"reusable": True}, headers=AUTH)
    secret = (await response.json())["secret"]
    return await enroll(a, secret, "one"), await enroll(a, secret, "two")


async def test_an_api_set_policy_reaches_agents_on_the_other_replica(
    replicas: tuple[Client, Client],
) -> None:
    a, b = replicas
    one, two = await two_devices(a)
    headers = {"Authorization": f"Bearer {one['token']}"}
    async with b.ws_connect("/api/v1/stream", headers=headers) as ws:
        full = await receive(ws)
        assert [p["id"] for p in full["peers"]] == [two["device"]["id"]]
        response = await a.put("/api/v1/policy", json={"document": CLOSED}, headers=AUTH)
        assert response.status == 200, await response.text()
        version = (await response.json())["policy"]["version"]
        delta = await receive(ws)
        assert delta["remove"] == [two["device"]["id"]]
        assert delta["version"] == version == b.app[BROKER].version
    got = await (await b.get("/api/v1/policy", headers=AUTH)).json()
    assert (got["policy"]["source"], got["policy"]["document"]) == ("api", CLOSED)
    await wait_for(lambda: a.app[BROKER].version == b.app[BROKER].version == version, 5)
    assert b.app[POLICY].document.policy.rules == ()  # enrollments on b use it too


async def test_a_file_edit_on_one_replica_reaches_agents_on_the_other(
    replicas: tuple[Client, Client], tmp_path: Path
) -> None:
    a, b = replicas
    one, two = await two_devices(a)
    headers = {"Authorization": f"Bearer {two['token']}"}
    async with b.ws_connect("/api/v1/stream", headers=headers) as ws:
        assert len((await receive(ws))["peers"]) == 1
        (tmp_path / "policy-a.yaml").write_text(CLOSED)  # only replica a's file
        delta = await receive(ws)
        assert delta["remove"] == [one["device"]["id"]]
    await wait_for(lambda: a.app[BROKER].version == b.app[BROKER].version, 5)
    assert a.app[POLICY].stored == b.app[POLICY].stored
