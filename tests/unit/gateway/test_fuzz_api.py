"""The API's JSON request bodies under fuzzing, through the real aiohttp app and its store.

One gateway (SQLite in a temporary directory, two relays answering a scripted
probe) serves every example: enroll, login request, login poll, login
approval, key creation, key rotation and relay tickets get bodies that are
valid templates with one field replaced, removed or added, arbitrary JSON
documents, or arbitrary bytes. Every answer is 2xx, or 4xx with the JSON
error envelope ``{"error", "message"}``, never 5xx; and a 4xx changed nothing
in the store (devices, keys, map version compared before and after).
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.api.common import device_json, key_json
from gateway.app import create_app
from gateway.appkeys import RELAY_PROBE, STORE
from lab.api_client import AUTH, Client, make_settings
from lab.fakes import FakeClock, new_key
from lab.relay_api import RELAYS, both_up

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass
class Gateway:
    """A running app on a private event loop, with what the templates need."""

    runner: asyncio.Runner
    client: Client
    secret: str = ""
    device_token: str = ""
    peer_id: str = ""
    user_code: str = ""
    poll_token: str = ""

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)


async def _start(tmp: Path) -> Client:
    app = create_app(make_settings(tmp, relays=RELAYS), clock=FakeClock())
    app[RELAY_PROBE] = both_up()
    client: Client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def _post(client: Client, path: str, body: Any, headers: dict[str, str]) -> Any:
    resp = await client.post(path, json=body, headers=headers)
    assert resp.status in (200, 201), await resp.text()
    return await resp.json()


async def _prepare(gw: Gateway) -> None:
    key = await _post(gw.client, "/api/v1/keys", {"reusable": True, "tags": ["tag:a"]}, AUTH)
    gw.secret = key["secret"]
    enrolled = []
    for name in ("fuzz-a", "fuzz-b"):
        body = {"auth_key": gw.secret, "public_key": new_key(), "name": name}
        enrolled.append(await _post(gw.client, "/api/v1/enroll", body, {}))
    gw.device_token, gw.peer_id = enrolled[0]["token"], enrolled[1]["device"]["id"]
    login = await _post(
        gw.client, "/api/v1/login/requests", {"public_key": new_key(), "name": "fuzz-l"}, {}
    )
    gw.user_code, gw.poll_token = login["user_code"], login["poll_token"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    runner = asyncio.Runner()
    client = runner.run(_start(tmp_path_factory.mktemp("api-fuzz")))
    gw = Gateway(runner, client)
    try:
        gw.run(_prepare(gw))
        yield gw
    finally:
        runner.run(client.close())
        runner.close()


async def store_state(client: Client) -> Any:
    store = client.app[STORE]
    devices = [device_json(r) for r in await store.list_devices()]
    for d in devices:
        d.pop("last_seen")  # a read by token may touch it; not a change of the device
    keys = [key_json(k) for k in await store.list_keys()]
    return devices, keys, await store.map_version()


async def exchange(client: Client, path: str, data: bytes, headers: dict[str, str]) -> Any:
    before = await store_state(client)
    resp = await client.post(
        path, data=data, headers={"Content-Type": "application/json", **headers}
    )
    text = await resp.text()
    after = await store_state(client)
    return resp.status, resp.content_type, text, before, after


def check(gw: Gateway, path: str, data: bytes, headers: dict[str, str]) -> None:
    status, content_type, text, before, after = gw.run(exchange(gw.client, path, data, headers))
    event(f"{path.rsplit('/', 1)[-1]} {status}")
    assert status < 500, (status, text, data[:300])
    assert 200 <= status < 300 or 400 <= status < 500, status
    assert content_type == "application/json", (status, text)
    body = json.loads(text)
    if status >= 400:
        assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str)
        assert before == after, f"a {status} changed the store: {text}"


NEAR_VALID = [
    "", "tag:a", "tag:Bad", "vm-1", "-vm", "a" * 64, "192.0.2.1:51820", "[2001:db8::1]:51820",
    "127.0.0.1:1", "169.254.169.254:80", "10.9.0.0/16", "100.64.0.0/10", "0.0.0.0/0",
    "https://idp.example.com", "relay-1", "relay 2", "AAAA", "=" * 44, "\u0000", "\ud7ff",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=70),
    st.sampled_from(NEAR_VALID),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=10,
)


def templates(gw: Gateway) -> dict[str, tuple[str, dict[str, str], dict[str, Any]]]:
    """Per route: path, headers, a valid body (its public keys are replaced per example)."""
    device = {"Authorization": f"Bearer {gw.device_token}"}
    return {
        "enroll": (
            "/api/v1/enroll",
            {},
            {
                "auth_key": gw.secret,
                "public_key": "",
                "name": "vm-fuzz",
                "endpoints": ["192.0.2.7:51820", "[2001:db8::7]:51820"],
                "routes": ["10.77.0.0/16"],
            },
        ),
        "login": ("/api/v1/login/requests", {}, {"public_key": "", "name": "vm-login"}),
        "poll": ("/api/v1/login/poll", {}, {"poll_token": gw.poll_token}),
        "approve": (
            f"/api/v1/login/requests/{gw.user_code}/approve",
            AUTH,
            {"issuer": "https://idp.example.com", "subject": "alice", "tags": ["tag:a"]},
        ),
        "keys": (
            "/api/v1/keys",
            AUTH,
            {
                "tags": ["tag:a", "tag:b"],
                "expiry": 600,
                "reusable": False,
                "ephemeral": True,
                "description": "fuzz",
                "device_key_expiry": 3600,
            },
        ),
        "rotate": ("/api/v1/devices/self/rotate", device, {"public_key": ""}),
        "ticket": ("/api/v1/relay/tickets", device, {"peer": gw.peer_id, "avoid": ["relay-2"]}),
    }


ROUTES = ["enroll", "login", "poll", "approve", "keys", "rotate", "ticket"]
mutation = st.one_of(
    st.tuples(st.just("replace"), st.integers(0, 20), json_values),
    st.tuples(st.just("delete"), st.integers(0, 20), st.none()),
    st.tuples(st.just("add"), st.text(max_size=12), json_values),
)


def with_keys(body: dict[str, Any]) -> dict[str, Any]:
    return {k: new_key() if k == "public_key" and v == "" else v for k, v in body.items()}


@pytest.mark.parametrize("route", ROUTES)
def test_the_templates_are_accepted(gateway: Gateway, route: str) -> None:
    """The mutations start from valid bodies: each template alone gets a 2xx (so the
    refusals above are refusals of the mutation, not of the template)."""
    path, headers, template = templates(gateway)[route]
    status, _, text, _, _ = gateway.run(
        exchange(gateway.client, path, json.dumps(with_keys(template)).encode(), headers)
    )
    assert 200 <= status < 300, (route, status, text)


@FUZZ
@given(st.sampled_from(ROUTES), st.lists(mutation, max_size=3))
def test_mutated_bodies_get_2xx_or_a_4xx_that_changed_nothing(
    gateway: Gateway, route: str, mutations: list[tuple[str, Any, Any]]
) -> None:
    path, headers, template = templates(gateway)[route]
    body = with_keys(copy.deepcopy(template))
    for op, where, value in mutations:
        fields = sorted(body)
        if op == "add":
            body[where] = value
        elif fields:
            field = fields[where % len(fields)]
            if op == "delete":
                del body[field]
            else:
                body[field] = value
    check(gateway, path, json.dumps(body).encode(), headers)


@FUZZ
@given(st.sampled_from(ROUTES), json_values)
def test_arbitrary_json_documents_are_refused_cleanly(
    gateway: Gateway, route: str, document: Any
) -> None:
    path, headers, _ = templates(gateway)[route]
    check(gateway, path, json.dumps(document).encode(), headers)


@FUZZ
@given(st.sampled_from(ROUTES), st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_cleanly(gateway: Gateway, route: str, data: bytes) -> None:
    path, headers, _ = templates(gateway)[route]
    check(gateway, path, data, headers)


# --- regressions found by fuzzing ----------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_regression_deeply_nested_json_is_a_400(gateway: Gateway, route: str) -> None:
    """Nesting deeper than the JSON decoder's recursion limit was a 500 (RecursionError)."""
    path, headers, _ = templates(gateway)[route]
    status, _, text, before, after = gateway.run(
        exchange(gateway.client, path, b"[" * 4000, headers)
    )
    assert status == 400 and json.loads(text)["error"] == "bad_input"
    assert before == after
