"""Host traffic from the agent's settings (agent.hostsetup) and its status lines."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from pydantic import ValidationError

from agent.hostsetup import (
    advertised_host_routes,
    gateway_addresses,
    gateway_host,
    host_policy,
    host_routes,
)
from wiregate.cli.device import format_host_traffic, format_status
from wiregate.settings import AgentSettings


def settings(**kw: object) -> AgentSettings:
    return AgentSettings(**kw)  # type: ignore[arg-type]


def test_host_routes_are_single_addresses_without_loopback_or_link_local() -> None:
    texts = ["10.0.0.12", "10.0.0.12/24", "2001:db8::1", "127.0.0.1", "fe80::1", "0.0.0.0"]
    assert host_routes(texts) == ["10.0.0.12/32", "2001:db8::1/128"]


def test_nothing_is_advertised_when_off() -> None:
    off = settings(host_addresses=["10.0.0.12"])
    assert asyncio.run(advertised_host_routes(off)) == []
    on = settings(host_traffic="nonstrict", host_addresses=["10.0.0.12"])
    assert asyncio.run(advertised_host_routes(on)) == ["10.0.0.12/32"]


def test_gateway_literal_and_name() -> None:
    assert gateway_host("https://[2001:db8::5]:8443/x") == "2001:db8::5"
    assert gateway_addresses("http://192.0.2.7:8080") == {ipaddress.ip_network("192.0.2.7/32")}
    assert ipaddress.ip_network("127.0.0.1/32") in gateway_addresses("http://localhost:8080")
    assert gateway_addresses("http://does-not-resolve.invalid:1") == frozenset()
    assert gateway_addresses("no url") == frozenset()


def test_policy_exempts_the_settings_list_and_the_gateway() -> None:
    s = settings(host_traffic="strict", host_traffic_exempt=["10.0.0.1", "10.1.0.0/16"])
    policy = host_policy(s, {ipaddress.ip_network("192.0.2.7/32")})
    assert policy.mode == "strict" and policy.node_tag == "tag:node"
    assert {str(n) for n in policy.exempt} == {"10.0.0.1/32", "10.1.0.0/16", "192.0.2.7/32"}


@pytest.mark.parametrize(
    "kw",
    [
        {"host_traffic": "always"},
        {"host_addresses": ["not-an-ip"]},
        {"host_traffic_exempt": ["10.0.0.1/8"]},  # host bits set
        {"host_traffic_fresh": 0},
        {"host_traffic_fresh": 600},  # longer than WireGuard keeps a session
    ],
)
def test_bad_settings_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        settings(**kw)


def test_status_lists_each_destination_and_whether_it_is_encrypted() -> None:
    doc = {
        "mode": "nonstrict",
        "fallbacks": 2,
        "counts": {"encrypted": 1, "clear": 1, "held": 0, "exempt": 1},
        "destinations": [
            {"address": "10.0.0.1/32", "peer": "cp-1", "state": "exempt"},
            {"address": "10.0.0.2/32", "peer": "node-2", "state": "encrypted"},
            {"address": "10.0.0.3/32", "peer": "node-3", "state": "clear"},
        ],
    }
    text = "\n".join(format_host_traffic(doc))
    assert "host traffic nonstrict: 1 encrypted, 1 in clear" in text and "2 fallbacks" in text
    assert "10.0.0.2" in text and "encrypted (tunnel)" in text
    assert "10.0.0.3" in text and "IN CLEAR" in text
    assert "exempt" in text
    assert format_host_traffic(None) == [] and format_host_traffic({"mode": "off"}) == []
    assert "host traffic" in format_status({"host_traffic": doc})
