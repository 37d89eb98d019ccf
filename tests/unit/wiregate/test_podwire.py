"""The ``pods`` message codec: round trip, and every malformed field refused by name."""

from __future__ import annotations

import json
from typing import Any

import pytest

from wiregate.mapwire import MalformedMessage, build_peer, parse_agent_frame, read_peer
from wiregate.model import Peer
from wiregate.podwire import MAX_PODS, Pod, PodReport, PodReportError, build_pods, parse_pods

POD = Pod("payments", "billing-7d9f", ("10.244.1.5", "fd00:10:244:1::5"), "billing",
          (("app", "ledger"), ("example.com/tier", "api")))  # fmt: skip


def doc(**over: Any) -> dict[str, Any]:
    message = build_pods(False, [POD], ["shop/orders-1"])
    message["upsert"][0].update(over)
    return message


def test_a_report_round_trips_through_its_text() -> None:
    report = parse_pods(json.dumps(build_pods(False, [POD], ["shop/orders-1"])))
    assert report == PodReport(False, (POD,), ("shop/orders-1",))
    assert report.upsert[0].key == "payments/billing-7d9f"
    assert parse_agent_frame(json.dumps(build_pods(True, [POD]))) == PodReport(True, (POD,))


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"namespace": "Payments"}, "namespace"),
        ({"name": "a" * 254}, "name"),
        ({"service_account": ""}, "service_account"),
        ({"ips": ["10.244.1.5", "10.244.1.6"]}, "ips"),
        ({"ips": ["10.244.001.5"]}, "ips"),
        ({"ips": ["fd00:10:244:1:0:0:0:5"]}, "normal form"),
        ({"labels": {"app": "x" * 64}}, "labels"),
        ({"labels": {"-app": "x"}}, "label key"),
        ({"extra": 1}, "extra"),
    ],
)
def test_a_malformed_pod_is_refused_naming_the_field(over: dict[str, Any], field: str) -> None:
    with pytest.raises(PodReportError, match=field):
        parse_pods(json.dumps(doc(**over)))


def test_a_message_that_is_wrong_as_a_whole_is_refused() -> None:
    with pytest.raises(PodReportError, match="named twice"):
        parse_pods(json.dumps(build_pods(False, [POD], [POD.key])))
    with pytest.raises(PodReportError, match="empty in a full"):
        parse_pods(json.dumps(build_pods(True, [POD], ["shop/a"])))
    with pytest.raises(PodReportError, match="appears twice"):
        parse_pods('{"type":"pods","full":true,"full":false,"upsert":[],"remove":[]}')
    with pytest.raises(PodReportError, match="more than"):
        parse_pods(json.dumps(build_pods(False, [], [f"ns/p{i}" for i in range(MAX_PODS + 1)])))
    with pytest.raises(PodReportError, match="NaN"):
        parse_pods('{"type":"pods","full":NaN,"upsert":[],"remove":[]}')


def test_a_peer_carries_its_pod_rules_both_ways() -> None:
    peer = Peer("dev_1", "node-1", "k" * 43 + "=", ("100.64.0.2/32",), ("100.64.0.2/32",),
                filter=(), pods_from=(("10.244.1.5", ("tcp:5432",)),),
                pods_to=(("10.244.1.9", ("tcp:8080", "icmp")),))  # fmt: skip
    wire = build_peer(peer)
    assert wire["pods_from"] == {"10.244.1.5": ["tcp:5432"]}
    assert read_peer(json.loads(json.dumps(wire))) == peer
    assert "pods_from" not in build_peer(Peer("d", "n", "k", (), ()))
    with pytest.raises(MalformedMessage, match="not an IP address"):
        read_peer({**wire, "pods_to": {"10.244.1.0/24": []}})
