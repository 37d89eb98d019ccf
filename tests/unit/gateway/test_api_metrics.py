"""The gateway's refusal and enrollment counters, scraped from its real metrics app."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.app import create_app, create_metrics_app
from lab.api_client import Client, ClientFactory, RecordingBroker, create_key, enroll, make_settings
from lab.metrics_text import Samples, parse, value


@pytest.fixture
async def gateway(aiohttp_client: ClientFactory, tmp_path: Path) -> tuple[Client, Client]:
    """The API app and the metrics app serving its counters."""
    api = await aiohttp_client(
        create_app(make_settings(tmp_path), broker_factory=lambda _p: RecordingBroker())
    )
    return api, await aiohttp_client(create_metrics_app(api.app))


async def scrape(metrics: Client) -> Samples:
    resp = await metrics.get("/metrics")
    assert resp.status == 200
    return parse(await resp.text())


def counted(samples: Samples, name: str, **labels: str) -> float:
    """A counter's value, 0 when the label set was never counted."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_refused_enrollments_are_counted_by_reason(gateway: tuple[Client, Client]) -> None:
    api, metrics = gateway
    before = await scrape(metrics)
    assert (await enroll(api, "wgk_not-a-real-key")).status == 401
    assert (await api.get("/api/v1/stream")).status == 401  # no device token
    assert (await api.post("/api/v1/enroll", data=b"{}")).status == 415
    after = await scrape(metrics)

    def delta(name: str, **labels: str) -> float:
        return counted(after, name, **labels) - counted(before, name, **labels)

    enroll_route = {"route": "/api/v1/enroll"}
    assert (
        delta(
            "wiregate_api_rejected_total", **enroll_route, status="401", reason="invalid_auth_key"
        )
        == 1
    )
    assert (
        delta(
            "wiregate_api_rejected_total",
            **enroll_route,
            status="415",
            reason="unsupported_media_type",
        )
        == 1
    )
    assert (
        delta(
            "wiregate_api_rejected_total",
            route="/api/v1/stream",
            status="401",
            reason="invalid_token",
        )
        == 1
    )
    assert (
        delta("wiregate_enrollment_refusals_total", method="auth_key", reason="invalid_auth_key")
        == 1
    )
    assert delta("wiregate_enrollments_total", method="auth_key") == 0


async def test_enrollments_are_counted_by_method(gateway: tuple[Client, Client]) -> None:
    api, metrics = gateway
    secret = (await create_key(api))["secret"]
    before = await scrape(metrics)
    assert (await enroll(api, secret)).status == 201
    after = await scrape(metrics)
    key = ("wiregate_enrollments_total", frozenset({("method", "auth_key")}))
    assert after[key] - before[key] == 1
    unused = ("wiregate_enrollments_total", frozenset({("method", "workload_token")}))
    assert unused in after  # every method is shown from the start, at its count
    assert value(after, "wiregate_broker_connected_agents") == 0
