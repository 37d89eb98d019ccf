"""The API's one JSON reader: a key twice in an object and bodies that are not UTF-8 are
refused with a clear 400 (415 for another charset) and change nothing."""

from __future__ import annotations

import json

import pytest

from lab.api_client import Client, assert_refused, create_key, snapshot
from lab.fakes import new_key

JSON = {"Content-Type": "application/json"}


async def test_a_duplicate_auth_key_does_not_enroll(client: Client) -> None:
    secret = (await create_key(client))["secret"]
    before = await snapshot(client)
    # the probe's body: the first auth_key is checked by nobody, the last one used to win
    fields = [("auth_key", "wgk_nothing"), ("public_key", new_key()), ("name", "vm-1"),
              ("auth_key", secret)]  # fmt: skip
    body = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in fields) + "}"
    resp = await client.post("/api/v1/enroll", data=body.encode(), headers=JSON)
    await assert_refused(client, resp, 400)
    message = (await resp.json())["message"]
    assert "'auth_key' appears twice" in message and secret not in message
    assert await snapshot(client) == before


async def test_duplicate_keys_in_nested_objects_are_refused(client: Client) -> None:
    body = b'{"public_key": "x", "name": "l", "extra": {"a": 1, "a": 2}}'
    resp = await client.post("/api/v1/login/requests", data=body, headers=JSON)
    await assert_refused(client, resp, 400)
    assert "appears twice" in (await resp.json())["message"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-8-sig"])
async def test_bodies_that_are_not_utf8_are_refused(client: Client, encoding: str) -> None:
    secret = (await create_key(client))["secret"]
    before = await snapshot(client)
    body = json.dumps({"auth_key": secret, "public_key": new_key(), "name": "vm-1"})
    resp = await client.post("/api/v1/enroll", data=body.encode(encoding), headers=JSON)
    await assert_refused(client, resp, 400)
    assert await snapshot(client) == before


async def test_another_charset_is_refused(client: Client) -> None:
    body = json.dumps({"public_key": new_key(), "name": "l"}).encode("utf-16")
    headers = {"Content-Type": "application/json; charset=utf-16"}
    resp = await client.post("/api/v1/login/requests", data=body, headers=headers)
    await assert_refused(client, resp, 415)
    plain = json.dumps({"public_key": new_key(), "name": "l"}).encode()
    headers = {"Content-Type": "application/json; charset=UTF-8"}
    assert (await client.post("/api/v1/login/requests", data=plain, headers=headers)).status == 201
