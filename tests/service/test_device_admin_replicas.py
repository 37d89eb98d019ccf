"""Device renames and expiries made on one replica reach agents streaming from another,
and every replica reports as online the agents streaming from any (real PostgreSQL)."""

from __future__ import annotations

from tests.service.test_replicas import (
    AUTH,
    Client,
    db_url,
    enroll,
    receive,
    replicas,
    reusable_key,
)

__all__ = ["db_url", "replicas"]  # the fixtures these tests take


async def test_rename_and_expire_on_one_replica_reach_the_other(
    replicas: tuple[Client, Client],
) -> None:
    a, b = replicas
    secret = await reusable_key(a)
    watcher, changed = await enroll(a, secret, "watcher"), await enroll(a, secret, "web")
    changed_id = changed["device"]["id"]
    headers = {"Authorization": f"Bearer {watcher['token']}"}
    async with b.ws_connect("/api/v1/stream", headers=headers) as ws:
        full = await receive(ws)
        assert {p["id"]: p["name"] for p in full["peers"]} == {changed_id: "web"}
        listed = await (await a.get("/api/v1/devices?online=true", headers=AUTH)).json()
        assert [d["name"] for d in listed["devices"]] == ["watcher"]  # streaming from b
        resp = await a.patch(f"/api/v1/devices/{changed_id}", json={"name": "db-main"},
                             headers=AUTH)  # fmt: skip
        assert resp.status == 200, await resp.text()
        delta = await receive(ws)
        assert {p["id"]: p["name"] for p in delta["upsert"]} == {changed_id: "db-main"}
        assert delta["version"] == (await resp.json())["map_version"]
        taken = await b.patch(f"/api/v1/devices/{watcher['device']['id']}",
                              json={"name": "db-main"}, headers=AUTH)  # fmt: skip
        assert taken.status == 409 and (await taken.json())["error"] == "name_taken"
        resp = await a.post(f"/api/v1/devices/{changed_id}/expire", headers=AUTH)
        assert resp.status == 200, await resp.text()
        removal = await receive(ws)
        assert removal["remove"] == [changed_id]
