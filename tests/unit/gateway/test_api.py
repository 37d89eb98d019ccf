"""The REST API through aiohttp's test client, against a temporary SQLite file."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import stat
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from gateway.api.openapi import DOCUMENT
from gateway.app import create_app, create_metrics_app, run_gateway
from gateway.appkeys import STORE
from gateway.web import PAGES
from lab.api_client import (
    ADMIN,
    AUTH,
    Client,
    ClientFactory,
    RecordingBroker,
    assert_refused,
    create_key,
    enroll,
    make_settings,
    snapshot,
)
from lab.fakes import T0, FakeClock, new_key

# -- happy paths --------------------------------------------------------------------


async def test_enroll_happy_path(client: Client, broker: RecordingBroker) -> None:
    created = await create_key(client, tags=["tag:vm", "tag:ci"], description="ci runners")
    assert created["secret"].startswith("wgk_")
    assert created["key"]["used_count"] == 0 and created["key"]["tags"] == ["tag:vm", "tag:ci"]
    resp = await enroll(
        client, created["secret"], endpoints=["192.0.2.7:51820"], routes=["10.20.0.0/24"]
    )
    assert resp.status == 201, await resp.text()
    data = await resp.json()
    device = data["device"]
    assert data["token"].startswith("wgd_") and data["map_version"] == 1
    assert device["addresses"] == ["100.64.0.1", "fd7a:7767:6174::1"]
    assert device["tags"] == ["tag:vm", "tag:ci"]
    assert device["identity"] == {
        "issuer": "wiregate:enrollment-key",
        "subject": created["key"]["id"],
    }
    assert device["created_at"] == "2023-11-14T22:13:20Z" and device["last_seen"] is None
    assert device["endpoints"] == ["192.0.2.7:51820"] and device["routes"] == ["10.20.0.0/24"]
    assert len(device["fingerprint"].split(":")) == 8
    assert broker.events == [("upsert", device["id"], 1)]
    assert set(device) == set(DOCUMENT["components"]["schemas"]["Device"]["properties"])


async def test_admin_device_routes(client: Client, broker: RecordingBroker) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    ids = [(await (await enroll(client, secret)).json())["device"]["id"] for _ in range(2)]
    listed = await (await client.get("/api/v1/devices", headers=AUTH)).json()
    assert sorted(d["id"] for d in listed["devices"]) == sorted(ids)
    one = await client.get(f"/api/v1/devices/{ids[0]}", headers=AUTH)
    assert (await one.json())["id"] == ids[0]
    assert (await client.delete(f"/api/v1/devices/{ids[0]}", headers=AUTH)).status == 204
    assert broker.events[-1] == ("remove", ids[0], 3)
    await assert_refused(client, await client.get(f"/api/v1/devices/{ids[0]}", headers=AUTH), 404)
    before = await snapshot(client)
    await assert_refused(
        client, await client.delete(f"/api/v1/devices/{ids[0]}", headers=AUTH), 404
    )
    assert await snapshot(client) == before


async def test_key_routes(client: Client) -> None:
    created = await create_key(client, expiry=60, reusable=True, ephemeral=True)
    key = created["key"]
    assert key["expires_at"] == "2023-11-14T22:14:20Z" and key["ephemeral"] is True
    listed = await (await client.get("/api/v1/keys", headers=AUTH)).json()
    assert listed["keys"] == [key]
    assert "secret" not in json.dumps(listed) and created["secret"] not in json.dumps(listed)
    assert (await client.delete(f"/api/v1/keys/{key['id']}", headers=AUTH)).status == 204
    listed = await (await client.get("/api/v1/keys", headers=AUTH)).json()
    assert listed["keys"][0]["revoked"] is True
    await assert_refused(client, await client.delete("/api/v1/keys/key_nope", headers=AUTH), 404)


async def test_health(client: Client) -> None:
    assert (await (await client.get("/livez")).json()) == {"status": "ok"}
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["status"] == "ok"


async def test_unknown_route_is_json_404(client: Client) -> None:
    await assert_refused(client, await client.get("/api/v1/nope"), 404)


# -- enrollment refused ---------------------------------------------------------------

ZERO_KEY = base64.b64encode(bytes(32)).decode()
SHORT_KEY = base64.b64encode(bytes(range(1, 32))).decode()
BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("wrong-type-name", {"name": 5}, "invalid_field"),
    ("wrong-type-endpoints", {"endpoints": "192.0.2.1:1"}, "invalid_field"),
    ("wrong-type-route-item", {"routes": [10]}, "invalid_field"),
    ("null-name", {"name": None}, "invalid_field"),
    ("unknown-field", {"admin": True}, "invalid_field"),
    ("bad-name", {"name": "../etc/passwd"}, "invalid_field"),
    ("key-31-bytes", {"public_key": SHORT_KEY}, "bad_key"),
    ("key-not-base64", {"public_key": "!" * 44}, "bad_key"),
    ("key-all-zero", {"public_key": ZERO_KEY}, "bad_key"),
    ("endpoint-loopback", {"endpoints": ["127.0.0.1:51820"]}, "bad_input"),
    ("endpoint-metadata", {"endpoints": ["169.254.169.254:80"]}, "bad_input"),
    ("endpoint-mapped-loopback", {"endpoints": ["[::ffff:127.0.0.1]:1"]}, "bad_input"),
    ("endpoint-multicast", {"endpoints": ["224.0.0.1:1"]}, "bad_input"),
    ("endpoint-unspecified", {"endpoints": ["0.0.0.0:1"]}, "bad_input"),
    ("endpoint-link-local-v6", {"endpoints": ["[fe80::1]:1"]}, "bad_input"),
    ("endpoint-no-port", {"endpoints": ["192.0.2.1"]}, "bad_input"),
    ("endpoint-port-zero", {"endpoints": ["192.0.2.1:0"]}, "bad_input"),
    ("endpoint-v6-unbracketed", {"endpoints": ["2001:db8::1:51820"]}, "bad_input"),
    ("route-default", {"routes": ["0.0.0.0/0"]}, "bad_input"),
    ("route-host-bits", {"routes": ["10.0.0.1/24"]}, "bad_input"),
    ("route-overlaps-pool", {"routes": ["100.64.0.0/24"]}, "bad_input"),
    (
        "too-many-endpoints",
        {"endpoints": [f"192.0.2.1:{p}" for p in range(1, 18)]},
        "invalid_field",
    ),
]


@pytest.mark.parametrize(("field", "code"), [(f, c) for _, f, c in BAD_FIELDS],
                         ids=[i for i, _, _ in BAD_FIELDS])  # fmt: skip
async def test_enroll_bad_fields_change_nothing(
    client: Client, field: dict[str, Any], code: str
) -> None:
    secret = (await create_key(client))["secret"]
    before = await snapshot(client)
    body = {"auth_key": secret, "public_key": new_key(), "name": "vm-1", **field}
    resp = await client.post("/api/v1/enroll", json=body)
    await assert_refused(client, resp, 400)
    assert (await resp.json())["error"] == code
    assert await snapshot(client) == before


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b'{"auth_key": ', "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b'{"auth_key": NaN}', "application/json", 400),
        (b"\xff\xfe", "application/json", 400),
        (b"auth_key=x", "application/x-www-form-urlencoded", 415),
        (b'{"auth_key": "x"}', "text/plain", 415),
        (b'{"name": "' + b"a" * 5000 + b'"}', "application/json", 413),
    ],
    ids=["truncated", "not-object", "nan", "not-utf8", "form", "text", "oversized"],
)
async def test_enroll_bad_bodies_change_nothing(
    client: Client, data: bytes, content_type: str, status: int
) -> None:
    await create_key(client)
    before = await snapshot(client)
    resp = await client.post("/api/v1/enroll", data=data, headers={"Content-Type": content_type})
    await assert_refused(client, resp, status)
    assert await snapshot(client) == before


async def test_oversized_chunked_body_is_refused(client: Client) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    before = await snapshot(client)
    resp = await client.post(
        "/api/v1/enroll", data=chunks(), headers={"Content-Type": "application/json"}
    )
    await assert_refused(client, resp, 413)
    assert await snapshot(client) == before


async def _unusable_key(client: Client, clock: FakeClock, kind: str) -> str:
    if kind == "unknown":
        return "wgk_" + "A" * 43
    if kind == "not-a-key":
        return "hunter2"
    created = await create_key(client, expiry=60)
    if kind == "expired":
        clock.now = T0 + 60
    elif kind == "revoked":
        await client.delete(f"/api/v1/keys/{created['key']['id']}", headers=AUTH)
    elif kind == "used":
        assert (await enroll(client, created["secret"])).status == 201
    return str(created["secret"])


@pytest.mark.parametrize("kind", ["unknown", "not-a-key", "expired", "revoked", "used"])
async def test_unusable_keys_get_one_generic_401(
    client: Client, clock: FakeClock, kind: str
) -> None:
    secret = await _unusable_key(client, clock, kind)
    before = await snapshot(client)
    resp = await enroll(client, secret)
    await assert_refused(client, resp, 401)
    assert (await resp.json())["message"] == "enrollment key is not valid"
    assert await snapshot(client) == before


async def test_key_still_usable_just_before_expiry(client: Client, clock: FakeClock) -> None:
    created = await create_key(client, expiry=60)
    clock.now = T0 + 59.5
    assert (await enroll(client, created["secret"])).status == 201


async def test_duplicate_public_key_is_409(client: Client) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    pk = new_key()
    body = {"auth_key": secret, "public_key": pk, "name": "a"}
    assert (await client.post("/api/v1/enroll", json=body)).status == 201
    before = await snapshot(client)
    # the same key under another name (the same name is a retried enrollment, see
    # test_store.py) is someone else's device
    resp = await client.post("/api/v1/enroll", json={**body, "name": "b"})
    await assert_refused(client, resp, 409)
    assert await snapshot(client) == before


async def test_exhausted_pool_is_409(
    aiohttp_client: ClientFactory, tmp_path: Path, broker: RecordingBroker
) -> None:
    settings = make_settings(tmp_path, ipv4_pool="10.9.0.0/30", ipv6_pool="fd00:9::/120")
    client = await aiohttp_client(create_app(settings, broker_factory=lambda _p: broker))
    secret = (await create_key(client, reusable=True))["secret"]
    assert [(await enroll(client, secret)).status for _ in range(2)] == [201, 201]
    before = await snapshot(client)
    resp = await enroll(client, secret)
    await assert_refused(client, resp, 409)
    assert (await resp.json())["error"] == "pool_exhausted"
    assert await snapshot(client) == before


async def test_concurrent_single_use_enrollment_has_one_winner(client: Client) -> None:
    secret = (await create_key(client))["secret"]
    statuses = sorted(
        r.status for r in await asyncio.gather(*(enroll(client, secret) for _ in range(8)))
    )
    assert statuses == [201] + [401] * 7


# -- admin authentication -------------------------------------------------------------

ADMIN_CALLS = [
    ("GET", "/api/v1/devices", None),
    ("GET", "/api/v1/devices/dev_x", None),
    ("DELETE", "/api/v1/devices/dev_x", None),
    ("GET", "/api/v1/keys", None),
    ("POST", "/api/v1/keys", {"tags": ["tag:x"]}),
    ("DELETE", "/api/v1/keys/key_x", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": ADMIN}],
    ids=["none", "wrong", "no-scheme"],
)
async def test_admin_routes_need_the_token(
    client: Client, method: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    await create_key(client)
    before = await snapshot(client)
    resp = await client.request(method, path, json=body, headers=headers)
    await assert_refused(client, resp, 401)
    assert await snapshot(client) == before


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
async def test_admin_over_tcp_refused_without_token_file(
    aiohttp_client: ClientFactory,
    tmp_path: Path,
    broker: RecordingBroker,
    method: str,
    path: str,
    body: Any,
) -> None:
    app = create_app(make_settings(tmp_path, token=False), broker_factory=lambda _p: broker)
    client = await aiohttp_client(app)
    resp = await client.request(method, path, json=body, headers=AUTH)
    await assert_refused(client, resp, 403)
    assert (await client.app[STORE].list_keys()) == []


async def test_admin_trusted_on_unix_socket(tmp_path: Path, broker: RecordingBroker) -> None:
    app = create_app(make_settings(tmp_path, token=False), broker_factory=lambda _p: broker)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "admin.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:
            resp = await s.post("http://gw/api/v1/keys", json={"tags": ["tag:x"]})
            assert resp.status == 201
            assert (await s.get("http://gw/api/v1/keys")).status == 200
    finally:
        await runner.cleanup()
    assert broker.closed


BAD_KEY_BODIES = [
    {"tags": ["vm"]},
    {"tags": ["tag:UPPER"]},
    {"tags": ["tag:" + "a" * 64]},
    {"expiry": 0},
    {"expiry": 90 * 86400 + 1},
    {"expiry": "3600"},
    {"expiry": 3600.5},
    {"reusable": "yes"},
    {"reusable": 1},
    {"description": 7},
    {"owner": "me"},
]


@pytest.mark.parametrize("body", BAD_KEY_BODIES, ids=[json.dumps(b) for b in BAD_KEY_BODIES])
async def test_bad_key_requests_change_nothing(client: Client, body: dict[str, Any]) -> None:
    resp = await client.post("/api/v1/keys", json=body, headers=AUTH)
    await assert_refused(client, resp, 400)
    assert await client.app[STORE].list_keys() == []


async def test_key_defaults_and_max_expiry(client: Client) -> None:
    key = (await create_key(client))["key"]
    assert key["expires_at"] == "2023-11-14T23:13:20Z"  # one hour
    assert key["reusable"] is False and key["tags"] == []
    assert (await create_key(client, expiry=90 * 86400))["key"]["revoked"] is False


# -- the stream -----------------------------------------------------------------------


async def test_stream_needs_a_device_token(client: Client) -> None:
    await assert_refused(client, await client.get("/api/v1/stream"), 401)
    resp = await client.get("/api/v1/stream", headers={"Authorization": "Bearer wgd_nope"})
    await assert_refused(client, resp, 401)


async def test_stream_serves_and_persists_endpoints(
    client: Client, broker: RecordingBroker, clock: FakeClock
) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    data = await (await enroll(client, secret)).json()
    peer = await (await enroll(client, secret)).json()
    device_id, token = data["device"]["id"], data["token"]
    clock.now = T0 + 30
    bearer = {"Authorization": f"Bearer {token}"}
    bad = await client.get("/api/v1/stream?since=-1", headers=bearer)
    await assert_refused(client, bad, 400)
    async with client.ws_connect("/api/v1/stream", headers=bearer) as ws:
        full = await ws.receive_json()
        assert full["type"] == "full" and full["version"] == 2
        assert [p["id"] for p in full["peers"]] == [peer["device"]["id"]]
        assert full["self"]["pool"] == ["100.64.0.0/16", "fd7a:7767:6174::/64"]
        await ws.send_json({"type": "endpoints", "endpoints": ["198.51.100.4:51820"]})
        for _ in range(100):
            if broker.events[-1][1:] == (device_id, 3):
                break
            await asyncio.sleep(0.01)
    record = await client.app[STORE].get_device(device_id)
    assert record.device.endpoints == ("198.51.100.4:51820",)
    assert record.last_seen == T0 + 30
    assert broker.events[-1] == ("upsert", device_id, 3)
    assert await client.app[STORE].map_version() == 3


async def test_deleted_device_stream_is_revoked(client: Client) -> None:
    secret = (await create_key(client))["secret"]
    data = await (await enroll(client, secret)).json()
    bearer = {"Authorization": f"Bearer {data['token']}"}
    async with client.ws_connect("/api/v1/stream", headers=bearer) as ws:
        assert (await ws.receive_json())["type"] == "full"
        path = f"/api/v1/devices/{data['device']['id']}"
        assert (await client.delete(path, headers=AUTH)).status == 204
        assert (await ws.receive_json())["type"] == "revoked"
    resp = await client.get("/api/v1/stream", headers=bearer)
    await assert_refused(client, resp, 401)


# -- secrets never logged ------------------------------------------------------------


async def test_secrets_never_logged(client: Client, capfd: pytest.CaptureFixture[str]) -> None:
    with structlog.testing.capture_logs() as logs:
        created = await create_key(client, tags=["tag:vm"])
        data = await (await enroll(client, created["secret"])).json()
        await enroll(client, created["secret"])  # refused: used
        headers = {"Authorization": f"Bearer {data['token']}"}
        async with client.ws_connect("/api/v1/stream", headers=headers) as ws:
            assert (await ws.receive_json())["type"] == "full"
    events = {entry["event"] for entry in logs}
    assert {"enrollment_key_created", "device_enrolled", "request_refused"} <= events
    out, err = capfd.readouterr()
    for secret in (created["secret"], data["token"], ADMIN):
        assert secret not in repr(logs) and secret not in out + err


# -- OpenAPI and metrics -------------------------------------------------------------


def _app_routes(app: web.Application) -> set[tuple[str, str]]:
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD":
            found.add((route.method.lower(), str(path)))
    return found


_METHODS = {"get", "post", "put", "patch", "delete"}
_DOC_URI = "urn:wiregate:openapi"
_FORMATS = FormatChecker()


@_FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    """RFC 3339 date-times such as 2023-11-14T22:13:20Z."""
    return not isinstance(value, str) or ("T" in value and bool(datetime.fromisoformat(value)))


async def _served(client: Client) -> dict[str, Any]:
    resp = await client.get("/api/v1/openapi.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    served: dict[str, Any] = await resp.json()
    return served


def _pointer(*parts: str) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _schema_errors(served: dict[str, Any], pointer: str, instance: Any) -> list[str]:
    """Why ``instance`` does not match the schema at ``pointer`` of the served document."""
    registry = Registry().with_resource(_DOC_URI, DRAFT202012.create_resource(served))
    validator = Draft202012Validator(
        {"$ref": f"{_DOC_URI}#{pointer}"},
        registry=registry,
        format_checker=_FORMATS,
    )
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]


def _request_errors(served: dict[str, Any], method: str, path: str, body: Any) -> list[str]:
    pointer = _pointer("paths", path, method, "requestBody", "content", "application/json")
    return _schema_errors(served, pointer + "/schema", body)


async def _documented(
    served: dict[str, Any], method: str, path: str, resp: aiohttp.ClientResponse
) -> Any:
    """The JSON body of a real response, after checking its status and body are documented."""
    responses = served["paths"][path][method]["responses"]
    status = str(resp.status)
    assert status in responses, f"{method} {path} answered an undocumented {status}"
    pointer = _pointer("paths", path, method, "responses", status)
    described = responses[status]
    if "$ref" in described:
        pointer = described["$ref"].removeprefix("#")
        described = served["components"]["responses"][pointer.rsplit("/", 1)[1]]
    if not described.get("content"):
        assert await resp.read() == b""
        return None
    assert resp.content_type in described["content"]
    body = await resp.json()
    schema = pointer + _pointer("content", resp.content_type, "schema")
    errors = _schema_errors(served, schema, body)
    assert not errors, f"{method} {path} {status}: {errors}"
    return body


async def test_openapi_matches_routes(client: Client) -> None:
    served = await _served(client)
    assert served["openapi"].startswith("3.1")
    documented = {(m, p) for p, item in served["paths"].items() for m in item if m in _METHODS}
    # the SSO web pages are HTML, not API: they are exactly gateway.web.PAGES, outside /api/
    assert _app_routes(client.app) >= PAGES and not any(p.startswith("/api/") for _, p in PAGES)
    assert documented == _app_routes(client.app) - PAGES
    for path, item in served["paths"].items():
        ops = [v for k, v in item.items() if k in _METHODS]
        # the path's {parameters} are exactly the documented path parameters
        params = [*item.get("parameters", []), *(q for op in ops for q in op.get("parameters", []))]
        in_path = {q["name"] for q in params if q["in"] == "path"}
        assert in_path == set(re.findall(r"{(\w+)}", path)), path
        for op in ops:
            assert op["responses"] and op["summary"]
    for schema in served["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


async def test_real_requests_and_responses_match_the_openapi_document(client: Client) -> None:
    served = await _served(client)
    key_request = {"tags": ["tag:vm"], "expiry": 600, "reusable": True, "description": "ci"}
    assert not _request_errors(served, "post", "/api/v1/keys", key_request)
    resp = await client.post("/api/v1/keys", json=key_request, headers=AUTH)
    created = await _documented(served, "post", "/api/v1/keys", resp)
    assert resp.status == 201
    listed = await _documented(
        served, "get", "/api/v1/keys", await client.get("/api/v1/keys", headers=AUTH)
    )
    assert [k["id"] for k in listed["keys"]] == [created["key"]["id"]]

    enroll_request = {
        "auth_key": created["secret"],
        "public_key": new_key(),
        "name": "vm-1",
        "endpoints": ["192.0.2.7:51820"],
        "routes": ["10.20.0.0/24"],
    }
    assert not _request_errors(served, "post", "/api/v1/enroll", enroll_request)
    resp = await client.post("/api/v1/enroll", json=enroll_request)
    enrolled = await _documented(served, "post", "/api/v1/enroll", resp)
    assert resp.status == 201
    device_id = enrolled["device"]["id"]
    device_auth = {"Authorization": f"Bearer {enrolled['token']}"}

    for method, path, url, headers in [
        ("get", "/api/v1/devices", "/api/v1/devices", AUTH),
        ("get", "/api/v1/devices/{id}", f"/api/v1/devices/{device_id}", AUTH),
        ("get", "/api/v1/relays", "/api/v1/relays", device_auth),
        ("get", "/api/v1/relay/signers", "/api/v1/relay/signers", {}),
        ("get", "/livez", "/livez", {}),
        ("get", "/readyz", "/readyz", {}),
    ]:
        resp = await client.request(method, url, headers=headers)
        assert resp.status == 200, f"{method} {url}: {resp.status}"
        await _documented(served, method, path, resp)

    # requests the document does not allow are refused, with a documented error
    for body in (
        {k: v for k, v in enroll_request.items() if k != "name"},
        {**enroll_request, "name": "not a name!"},
        {**enroll_request, "unknown": 1},
    ):
        assert _request_errors(served, "post", "/api/v1/enroll", body)
        resp = await client.post("/api/v1/enroll", json=body)
        await _documented(served, "post", "/api/v1/enroll", resp)
        assert resp.status == 400
    for body in ({"expiry": 0}, {"tags": ["vm"]}, {"reusable": "yes"}):
        assert _request_errors(served, "post", "/api/v1/keys", body)
        resp = await client.post("/api/v1/keys", json=body, headers=AUTH)
        await _documented(served, "post", "/api/v1/keys", resp)
        assert resp.status == 400

    for method, path, url, headers, status in [
        ("get", "/api/v1/devices", "/api/v1/devices", {}, 401),
        ("get", "/api/v1/devices/{id}", "/api/v1/devices/dev_nope", AUTH, 404),
        ("delete", "/api/v1/keys/{id}", "/api/v1/keys/key_nope", AUTH, 404),
        ("delete", "/api/v1/keys/{id}", f"/api/v1/keys/{created['key']['id']}", AUTH, 204),
        ("delete", "/api/v1/devices/{id}", f"/api/v1/devices/{device_id}", AUTH, 204),
    ]:
        resp = await client.request(method, url, headers=headers)
        assert resp.status == status, f"{method} {url}: {resp.status}"
        await _documented(served, method, path, resp)


async def test_metrics_app_counts_requests(aiohttp_client: ClientFactory, client: Client) -> None:
    await client.get("/livez")
    metrics = await aiohttp_client(create_metrics_app(client.app))
    text = await (await metrics.get("/metrics")).text()
    assert 'wiregate_http_requests_total{method="GET",route="/livez",status="200"} 1.0' in text
    assert "wiregate_broker_connected_agents" in text


# -- the whole process ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_run_gateway_serves_tcp_unix_and_metrics(tmp_path: Path) -> None:
    api, metrics = _free_port(), _free_port()
    settings = make_settings(
        tmp_path, listen=f"127.0.0.1:{api}", metrics_listen=f"127.0.0.1:{metrics}"
    )
    task = asyncio.create_task(run_gateway(settings, broker_factory=lambda _p: RecordingBroker()))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    resp = await http.get(f"http://127.0.0.1:{api}/livez")
                    break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.05)
            assert resp.status == 200
            assert (await http.get(f"http://127.0.0.1:{api}/api/v1/keys")).status == 401
            assert (await http.get(f"http://127.0.0.1:{metrics}/metrics")).status == 200
        mode = stat.S_IMODE(os.stat(settings.admin_socket).st_mode)
        assert stat.S_ISSOCK(os.stat(settings.admin_socket).st_mode) and mode == 0o600
        connector = aiohttp.UnixConnector(path=str(settings.admin_socket))
        async with aiohttp.ClientSession(connector=connector) as unix:
            assert (await unix.get("http://gw/api/v1/keys")).status == 200
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
