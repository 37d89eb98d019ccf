"""GET /api/v1/relay/revocations: the devices removed within the window, as relays parse
them, with a conditional GET; the signers document is unchanged (older relays)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.api.relay import REVOCATIONS
from gateway.appkeys import CLOCK, RELAY_SIGNER, STORE
from lab.api_client import AUTH, Client, ClientFactory
from lab.relay_api import start, two_devices
from relay.aio.forwarding import parse_signers
from relay.revocations import WINDOW, parse_revocations

URL = "/api/v1/relay/revocations"


async def listed(client: Client, **headers: str) -> tuple[int, Any, str]:
    resp = await client.get(URL, headers=headers)
    body = await resp.json() if resp.status == 200 else await resp.read()
    return resp.status, body, resp.headers.get("ETag", "")


async def fresh(aiohttp_client: ClientFactory, tmp_path: Path) -> Client:
    client = await start(aiohttp_client, tmp_path)
    client.app[REVOCATIONS].ttl = 0.0  # read the store on every request
    return client


async def test_a_deleted_device_is_listed_with_when_until_the_window_ends(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await fresh(aiohttp_client, tmp_path)
    status, body, _ = await listed(client)
    assert status == 200 and body == {"revoked": [], "window": WINDOW}
    a, b = await two_devices(client)
    gone = a["device"]["id"]
    clock = client.app[CLOCK]
    resp = await client.delete(f"/api/v1/devices/{gone}", headers=AUTH)
    assert resp.status in (200, 204), await resp.text()
    removed_at = clock()
    status, body, _ = await listed(client)
    tenant = client.app[RELAY_SIGNER].tenant
    assert parse_revocations(body) == {(tenant, gone): removed_at}
    assert b["device"]["id"] not in str(body)
    clock.advance(WINDOW - 1)  # type: ignore[attr-defined]
    assert parse_revocations((await listed(client))[1]) == {(tenant, gone): removed_at}
    clock.advance(2)  # type: ignore[attr-defined]
    assert (await listed(client))[1]["revoked"] == []


async def test_devices_of_a_disabled_identity_are_listed(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await fresh(aiohttp_client, tmp_path)
    a, _ = await two_devices(client)
    store = client.app[STORE]
    record = await store.get_device(a["device"]["id"])
    await store.set_identity_disabled(record.device.identity, True, actor="admin:socket")
    revoked = parse_revocations((await listed(client))[1])
    assert {device for _, device in revoked} == {a["device"]["id"]}


async def test_an_unchanged_list_is_a_304_without_a_body(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await fresh(aiohttp_client, tmp_path)
    _, _, etag = await listed(client)
    assert etag.startswith('"') and etag.endswith('"')
    status, body, same = await listed(client, **{"If-None-Match": etag})
    assert (status, body, same) == (304, b"", etag)
    a, _ = await two_devices(client)
    await client.delete(f"/api/v1/devices/{a['device']['id']}", headers=AUTH)
    status, body, changed = await listed(client, **{"If-None-Match": etag})
    assert status == 200 and changed != etag and len(body["revoked"]) == 1
    assert (await listed(client, **{"If-None-Match": f'"other", W/{changed}'}))[0] == 304


async def test_within_the_cache_time_a_replica_reads_the_store_once(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path)
    client.app[REVOCATIONS].ttl = 3600.0
    _, first, _ = await listed(client)
    a, _ = await two_devices(client)
    await client.delete(f"/api/v1/devices/{a['device']['id']}", headers=AUTH)
    assert (await listed(client))[1] == first  # served from the cache
    client.app[REVOCATIONS].ttl = 0.0
    assert len((await listed(client))[1]["revoked"]) == 1


async def test_the_signers_document_keeps_its_exact_shape(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """Relays of every version parse it strictly: nothing is added to it."""
    client = await start(aiohttp_client, tmp_path)
    doc = await (await client.get("/api/v1/relay/signers")).json()
    assert set(doc) == {"signers"}
    assert parse_signers(doc)
