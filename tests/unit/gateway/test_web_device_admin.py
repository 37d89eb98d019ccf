"""The admin page's device tools (rename, set tags, expire now) and the device pages'
tags and presence, through real form posts (session cookie, CSRF token, Origin)."""

from __future__ import annotations

from gateway.appkeys import BROKER, STORE
from gateway.web.sessions import Session, csrf_token
from lab.api_client import RecordingBroker
from tests.unit.gateway.test_web_pages import (
    Client,
    cookie,
    enroll_for,
    form_headers,
    make_session,
    snapshot,
    web_client,
)
from wiregate.model import Identity

__all__ = ["web_client"]  # the fixture these tests take

BOB = Identity("https://idp.example", "bob")


async def post(client: Client, who: Session, path: str, **form: str) -> int:
    data = {**form, "csrf": csrf_token(who)}
    resp = await client.post(path, data=data, headers=form_headers(client, who),
                             allow_redirects=False)  # fmt: skip
    return resp.status


async def test_an_admin_renames_tags_and_expires_any_device(web_client: Client) -> None:
    admin = make_session("carol", ("ops",))
    device = await enroll_for(web_client, BOB, "bob-pc")
    await enroll_for(web_client, BOB, "bob-phone")
    store, broker = web_client.app[STORE], web_client.app[BROKER]
    assert isinstance(broker, RecordingBroker)
    assert await post(web_client, admin, f"/admin/devices/{device}/rename", name="build-1") == 303
    assert await post(web_client, admin, f"/admin/devices/{device}/tags",
                      tags="tag:ci, tag:linux") == 303  # fmt: skip
    changed = (await store.get_device(device)).device
    assert (changed.name, changed.tags) == ("build-1", ("tag:ci", "tag:linux"))
    page = await (await web_client.get("/admin", headers=cookie(web_client, admin))).text()
    assert 'value="build-1"' in page and 'value="tag:ci tag:linux"' in page
    assert '<td class="online">offline</td>' in page
    assert await post(web_client, admin, f"/admin/devices/{device}/expire") == 303
    assert [r.device.name for r in await store.list_devices()] == ["bob-phone"]
    version = await store.map_version()
    assert broker.events[-3:] == [
        ("upsert", device, version - 2),
        ("upsert", device, version - 1),
        ("remove", device, version),
    ]
    assert broker.reasons[-1] == "key expired"
    actions = [(e.actor, e.action) for e in await store.list_audit()]
    actor = "oidc:https://idp.example#carol"
    assert {(actor, "device.rename"), (actor, "device.tags"), (actor, "device.expire")} <= set(
        actions
    )


async def test_refused_device_forms_change_nothing(web_client: Client) -> None:
    admin, user = make_session("carol", ("ops",)), make_session("dave", ("eng",))
    device = await enroll_for(web_client, BOB, "bob-pc")
    await enroll_for(web_client, BOB, "bob-phone")
    before = await snapshot(web_client)
    refusals = [
        (user, "rename", {"name": "x"}, 403),
        (user, "tags", {"tags": "tag:x"}, 403),
        (user, "expire", {}, 403),
        (admin, "rename", {"name": "Bob_PC"}, 400),
        (admin, "rename", {"name": "bob-phone"}, 409),
        (admin, "tags", {"tags": "ci"}, 400),
        (admin, "tags", {"tags": " ".join(f"tag:t{i}" for i in range(33))}, 400),
    ]
    for who, action, form, status in refusals:
        got = await post(web_client, who, f"/admin/devices/{device}/{action}", **form)
        assert got == status, (action, form)
    assert await post(web_client, admin, "/admin/devices/dev_nope/expire") == 404
    assert await snapshot(web_client) == before
    assert (await web_client.app[STORE].get_device(device)).device.name == "bob-pc"


async def test_my_devices_show_tags_and_presence_and_names_are_labels(web_client: Client) -> None:
    me = make_session()
    mine = await enroll_for(web_client, me.identity, "laptop")
    page = await (await web_client.get("/devices", headers=cookie(web_client, me))).text()
    assert '<td class="online">offline</td>' in page and '<td class="tags"></td>' in page
    assert await post(web_client, me, f"/devices/{mine}/rename", name="My_Laptop") == 400
    assert await post(web_client, me, f"/devices/{mine}/rename", name="my-laptop") == 303
    assert (await web_client.app[STORE].get_device(mine)).device.name == "my-laptop"
