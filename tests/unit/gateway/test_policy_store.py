"""Group memberships granted at enrollment survive the store, and the gateway loads the policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app, load_policy_document
from gateway.appkeys import BROKER, POLICY, STORE
from gateway.mapping.netmap import NetworkState, encode_full, full_map
from gateway.store import KeySpec, Store
from identity.policy_file import parse_policy
from identity.principals import grant_for, stored_tags
from wiregate.errors import ConfigError
from wiregate.keys import encode_key, generate_private_key, public_from_private
from wiregate.mapwire import build_full
from wiregate.model import Identity
from wiregate.settings import GatewaySettings

IDP = "https://idp.example.com"
DOC = {
    "groups": {"eng": {"issuer": IDP, "claim": "groups", "values": ["engineering"]}},
    "tag_rules": [{"group": "eng", "tags": ["tag:laptop"]}],
    "acls": [{"src": ["group:eng"], "dst": ["tag:db"], "ports": ["tcp:5432"]}],
}


def pub() -> str:
    return encode_key(public_from_private(generate_private_key()))


async def test_groups_round_trip_through_the_store(tmp_path: Path) -> None:
    doc = parse_policy(DOC)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'g.db'}")
    try:
        now = 1_800_000_000.0
        login = await store.create_login_request(pub(), "laptop", now)
        grant = grant_for(doc, IDP, {"groups": ["engineering"]})
        who = Identity(IDP, "alice")
        approved = await store.approve_login_request(login.record.id, who, stored_tags(grant), now)
        device = approved.record.device
        assert (device.tags, device.groups) == (("tag:laptop",), ("eng",))
        [listed] = [r.device for r in await store.list_devices()]
        assert listed == device
    finally:
        await store.close()
    db = device.__class__(
        id="db", name="db", public_key=pub(), identity=Identity("k", "db"),
        ipv4="100.64.0.9", ipv6="fd7a::9", tags=("tag:db",),
    )  # fmt: skip
    state = NetworkState(doc.policy, [device, db])
    assert full_map(state, "db", 1).peers[device.id].filter == ("tcp:5432",)
    assert "group" not in str(build_full(full_map(state, "db", 1)))


def test_the_gateway_loads_the_policy_file(tmp_path: Path) -> None:
    assert load_policy_document(None).policy.may_peer((), ())
    path = tmp_path / "policy.yaml"
    path.write_text("acls:\n  - {src: ['tag:a'], dst: ['tag:b'], ports: ['icmp']}\n")
    assert load_policy_document(path).policy.directional
    path.write_text("acls:\n  - {src: ['group:x'], dst: ['tag:b']}\n")
    with pytest.raises(ConfigError, match=r'acls\[0\]\.src\[0\]: unknown group "x"'):
        load_policy_document(path)


async def test_enrolled_routes_outside_the_policy_are_withheld(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "acls:\n  - {src: ['*'], dst: ['*']}\n"
        "routes:\n  - {tags: ['tag:node'], allow: ['10.244.0.0/16']}\n"
    )
    settings = GatewaySettings(
        state_dir=tmp_path / "state", admin_socket=tmp_path / "gw.sock", policy_file=policy
    )
    client = await aiohttp_client(create_app(settings))
    ids = []
    for tag, routes in (("tag:node", ["10.244.1.0/24", "10.9.0.0/16"]), ("tag:vm", [])):
        key = await client.app[STORE].create_key(KeySpec(tags=(tag,)))
        body = {"auth_key": key[1], "public_key": pub(), "name": tag[4:], "routes": routes}
        resp = await client.post("/api/v1/enroll", json=body)
        assert resp.status == 201, await resp.text()
        ids.append((await resp.json())["device"]["id"])
    node, vm = ids
    broker = client.app[BROKER]
    vm_map = json.loads(encode_full(broker._state, vm, broker.version))
    [seen] = vm_map["peers"]
    assert "10.244.1.0/24" in seen["allowed_ips"] and "10.9.0.0/16" not in seen["allowed_ips"]
    node_map = json.loads(encode_full(broker._state, node, broker.version))
    assert node_map["self"]["refused_routes"] == ["10.9.0.0/16"]
    assert client.app[POLICY].document.policy.routes is not None
