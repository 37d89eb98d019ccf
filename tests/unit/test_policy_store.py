"""Group memberships granted at enrollment survive the store, and the gateway loads the policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.app import load_policy, load_policy_document
from gateway.errors import ConfigError
from gateway.model import Identity
from gateway.netmap import NetworkState, full_map
from gateway.store import Store
from gateway.wgkey import encode_key, generate_private_key, public_from_private
from identity.policy_file import parse_policy
from identity.principals import grant_for, stored_tags

IDP = "https://idp.example.com"
POLICY = {
    "groups": {"eng": {"issuer": IDP, "claim": "groups", "values": ["engineering"]}},
    "tag_rules": [{"group": "eng", "tags": ["tag:laptop"]}],
    "acls": [{"src": ["group:eng"], "dst": ["tag:db"], "ports": ["tcp:5432"]}],
}


def pub() -> str:
    return encode_key(public_from_private(generate_private_key()))


async def test_groups_round_trip_through_the_store(tmp_path: Path) -> None:
    doc = parse_policy(POLICY)
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
    assert "group" not in str(full_map(state, "db", 1).to_wire())


def test_the_gateway_loads_the_policy_file(tmp_path: Path) -> None:
    assert load_policy(None) is None
    assert load_policy_document(None).policy.may_peer((), ())
    path = tmp_path / "policy.yaml"
    path.write_text("acls:\n  - {src: ['tag:a'], dst: ['tag:b'], ports: ['icmp']}\n")
    assert load_policy_document(path).policy.directional
    path.write_text("acls:\n  - {src: ['group:x'], dst: ['tag:b']}\n")
    with pytest.raises(ConfigError, match=r'acls\[0\]\.src\[0\]: unknown group "x"'):
        load_policy(path)
