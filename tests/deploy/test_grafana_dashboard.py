"""deploy/grafana/wiregate.json: importable, and every metric it queries really exists.

The metric names and labels are collected by scraping the real processes' metrics
apps: the gateway (API and metrics apps through aiohttp's test server, with one
relay configured and some refused requests), a relay (STUN and forwarding on
127.0.0.1) and the agent's collector fed a status document. A metric or label
renamed in the code without the dashboard fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import metrics_registry
from gateway.app import create_app, create_metrics_app
from lab.agent_status import status_document
from lab.api_client import Client, ClientFactory, RecordingBroker, enroll, make_settings
from lab.fakes import FakeClock
from lab.metrics_text import scrape
from lab.relay_net import start

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "wiregate.json"
DS = "${DS_PROMETHEUS}"
# Labels Prometheus adds to every scraped series, and the histogram bucket label.
TARGET_LABELS = frozenset({"instance", "job", "le"})
PROMQL_WORDS = frozenset(
    {"sum", "max", "min", "count", "avg", "rate", "increase", "histogram_quantile", "topk",
     "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
     "Inf", "NaN"}
)  # fmt: skip

Exposed = dict[str, set[str]]  # metric (sample) name -> label names seen


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def graph_panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        if panel["type"] != "row":
            yield panel
        yield from panel.get("panels", [])


def expressions(doc: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in graph_panels(doc) for t in p["targets"]]


def names_in(text: str) -> Exposed:
    """Every name a Prometheus text page makes queryable, with the labels of its samples."""
    exposed: Exposed = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            exposed.setdefault(family.name + suffix, set())
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    return exposed


def merge(*pages: str) -> Exposed:
    merged: Exposed = {}
    for page in pages:
        for name, labels in names_in(page).items():
            merged.setdefault(name, set()).update(labels)
    return merged


def metrics_of(expr: str) -> list[tuple[str, set[str]]]:
    """The metric names an expression selects, each with the label names it matches on."""
    expr = re.sub(r"\[[^\]]*\]", "", re.sub(r'"[^"]*"', '""', expr))  # no strings, ranges
    found = []
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?", expr):
        name, matchers = match.group(1), match.group(2) or ""
        before = expr[: match.start()].rstrip()
        if name in PROMQL_WORDS or (before.endswith(("(", ",")) and _in_grouping(before)):
            continue
        if expr[match.end() :].lstrip().startswith("("):  # a function call
            continue
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
        found.append((name, labels))
    return found


def _in_grouping(before: str) -> bool:
    """Whether the text before a name leaves it inside ``by (...)`` or a similar clause."""
    opened = before.rfind("(")
    return re.search(r"\b(by|without|on|ignoring)\s*\($", before[: opened + 1]) is not None


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
        for label in clause.split(",")
        if label.strip()
    }


@pytest.fixture
async def exposed(aiohttp_client: ClientFactory, tmp_path: Path) -> Exposed:
    settings = make_settings(tmp_path, relays=["relay-1=127.0.0.1:9"])
    api: Client = await aiohttp_client(
        create_app(settings, broker_factory=lambda _p: RecordingBroker())
    )
    metrics: Client = await aiohttp_client(create_metrics_app(api.app))
    assert (await enroll(api, "wgk_not-a-real-key")).status == 401  # a refusal, labelled
    gateway = await (await metrics.get("/metrics")).text()
    async for relay in start(True, FakeClock()):
        assert relay.metrics_address is not None
        relay_page = await scrape("http://{}:{}/metrics".format(*relay.metrics_address))
    agent = generate_latest(metrics_registry(status_document)).decode()
    return merge(gateway, relay_page, agent)


def test_the_dashboard_is_importable() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] >= 36 and doc["uid"] and doc["title"]
    assert [i["name"] for i in doc["__inputs"]] == ["DS_PROMETHEUS"]
    assert doc["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in graph_panels(doc):
        assert panel["datasource"]["uid"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DS and target["expr"], panel["title"]
    titles = {p["title"] for p in doc["panels"] if p["type"] == "row"}
    assert titles == {"Control plane", "Relays", "Agents"}


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


def test_the_expression_reader_finds_names_and_labels() -> None:
    expr = 'sum by (route, status) (rate(wiregate_http_requests_total{status=~"4..|5.."}[5m]))'
    assert metrics_of(expr) == [("wiregate_http_requests_total", {"status"})]
    assert grouping_labels(expr) == {"route", "status"}
    assert [n for n, _ in metrics_of("max(a_b) - min(c_d < +Inf)")] == ["a_b", "c_d"]


async def test_every_metric_and_label_in_the_dashboard_is_exposed(exposed: Exposed) -> None:
    for expr in expressions(dashboard()):
        selected = metrics_of(expr)
        assert selected, expr
        labels: set[str] = set()
        for name, matched in selected:
            assert name in exposed, f"{name} (in {expr}) is exposed by no process"
            assert matched <= exposed[name] | TARGET_LABELS, f"{name}: labels {matched}"
            labels |= exposed[name]
        missing = grouping_labels(expr) - labels - TARGET_LABELS
        assert not missing, f"{expr}: grouped by {missing}, which no metric in it carries"


async def test_the_scrape_covers_each_process(exposed: Exposed) -> None:
    gateway = ("wiregate_broker_fanout_seconds_bucket", "wiregate_relay_up")
    others = ("wiregate_relay_forwarded_bytes_total", "wiregate_agent_peer_handshake_age_seconds")
    for name in gateway + others:
        assert name in exposed
    assert {"route", "status", "reason"} <= exposed["wiregate_api_rejected_total"]
