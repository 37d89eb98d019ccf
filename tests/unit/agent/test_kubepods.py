"""agent.kubepods: Pod documents to reports (pure), and the real ``kubernetes`` client's list
and watch against a served Pods API (lab/podapi.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from agent.kubepods import KubePodApi, PodBook, PodWatcher, pod_of
from agent.podreport import PodReporter
from lab.kubeapi import recorded, write_kubeconfig
from lab.podapi import PodStore, pod_api_app, pod_document
from wiregate.podwire import MAX_PODS, Pod, PodReport, build_pods, parse_pods

LABELS = ("app", "app.kubernetes.io/name")


def _recorded() -> dict[str, Any]:
    return dict(json.loads(recorded("pod-kind.json")))


def test_a_running_pod_reports_its_ips_account_and_selected_labels() -> None:
    assert pod_of(_recorded(), LABELS) == Pod(
        "payments", "billing-7d9f5c6b8-x2k4q", ("10.244.1.5", "fd00:10:244:1::5"), "billing",
        (("app", "ledger"), ("app.kubernetes.io/name", "billing")),
    )  # fmt: skip
    assert pod_of(_recorded(), ())  == Pod(
        "payments", "billing-7d9f5c6b8-x2k4q", ("10.244.1.5", "fd00:10:244:1::5"), "billing"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("status", "phase"), "Succeeded"),
        (("status", "phase"), "Failed"),
        (("spec", "hostNetwork"), True),
        (("status", "podIPs"), []),
        (("metadata", "name"), None),
    ],
)
def test_pods_not_reported(path: tuple[str, str], value: Any) -> None:
    doc = _recorded()
    doc[path[0]][path[1]] = value
    if path == ("status", "podIPs"):
        doc["status"].pop("podIP")
    assert pod_of(doc, LABELS) is None


def test_a_pod_the_gateway_would_refuse_is_not_reported() -> None:
    doc = _recorded()
    doc["spec"]["serviceAccountName"] = {"not": "a name"}
    assert pod_of(doc, LABELS) is None
    doc = _recorded()
    doc["metadata"]["labels"]["app"] = "x" * 64  # longer than a label value may be
    assert pod_of(doc, LABELS) is None


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
NAMES = st.sampled_from(["web", "a-b", "x.y", "Web", "-a", "a" * 64, ""]) | JSON
IPS = st.sampled_from(["10.244.1.5", "fd00::5", "10.244.1.005", "::ffff:10.0.0.1", "x"]) | JSON
META = {
    "name": NAMES,
    "namespace": NAMES,
    "labels": st.dictionaries(st.sampled_from(LABELS), NAMES),
}
SPEC = {"hostNetwork": JSON, "serviceAccountName": NAMES}
STATUS = {
    "phase": st.sampled_from(["Running", "Pending"]) | JSON,
    "podIP": IPS,
    "podIPs": st.lists(st.fixed_dictionaries({"ip": IPS}), max_size=3) | JSON,
}


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "metadata": st.fixed_dictionaries({}, optional=META) | JSON,
            "spec": st.fixed_dictionaries({}, optional=SPEC) | JSON,
            "status": st.fixed_dictionaries({}, optional=STATUS) | JSON,
        },
    ),
    st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]),
)
def test_any_document_is_a_pod_the_gateway_takes_or_none(doc: dict[str, Any], kind: str) -> None:
    pod = pod_of(doc, LABELS)
    book = PodBook(LABELS)
    book.event(kind, doc)
    for report in book.take() + ([PodReport(False, (pod,))] if pod else []):
        parse_pods(json.dumps(build_pods(report.full, report.upsert, report.remove)))


def test_a_pending_pod_with_only_pod_ip_is_reported() -> None:
    doc = _recorded()
    doc["status"] = {"phase": "Pending", "podIP": "10.244.1.9"}
    pod = pod_of(doc, LABELS)
    assert pod is not None and pod.ips == ("10.244.1.9",)


def _doc(i: int, ip: str | None = None, app: str = "web") -> dict[str, Any]:
    return pod_document("shop", f"web-{i}", ip or f"10.244.1.{i}", labels={"app": app})


def test_the_book_sends_a_full_then_coalesced_deltas() -> None:
    book = PodBook(LABELS)
    [full] = book.listed([_doc(1), _doc(2)], "100")
    assert full.full and [p.name for p in full.upsert] == ["web-1", "web-2"]
    book.event("MODIFIED", _doc(1))  # nothing reported changed
    assert not book.pending and book.take() == []
    book.event("MODIFIED", _doc(1, app="api"))
    book.event("ADDED", _doc(3))
    book.event("DELETED", _doc(3))  # came and went within the window: just gone
    book.event("DELETED", _doc(2))
    book.event("BOOKMARK", {"metadata": {"resourceVersion": "140"}})
    [delta] = book.take()
    assert delta == PodReport(False, (pod_of(_doc(1, app="api"), LABELS),), ("shop/web-2",))  # type: ignore[arg-type]
    assert book.resource_version == "140"
    parse_pods(json.dumps(build_pods(delta.full, delta.upsert, delta.remove)))  # well formed


def test_more_pods_than_a_message_holds_are_a_full_then_deltas() -> None:
    book = PodBook(())
    docs = [pod_document("big", f"p-{i}", f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
            for i in range(MAX_PODS + 5)]  # fmt: skip
    reports = book.listed(docs, "1")
    assert [(r.full, len(r.upsert)) for r in reports] == [(True, MAX_PODS), (False, 5)]


# --------------------------------------------------------------------------- the real client


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[PodStore, KubePodApi]]:
    store = PodStore()
    runner = web.AppRunner(pod_api_app(store))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}", "t")
    yield store, KubePodApi("kind-worker", kubeconfig)
    store.close_watches()  # the open watches end, so the server stops at once
    await runner.cleanup()


@contextlib.asynccontextmanager
async def _watching(
    api: KubePodApi, coalesce: float
) -> AsyncIterator[tuple[PodWatcher, list[PodReport]]]:
    """A watcher running; the reports it emitted so far."""
    reports: list[PodReport] = []

    async def emit(batch: list[PodReport]) -> None:
        reports.extend(batch)

    watcher = PodWatcher(api, LABELS, coalesce=coalesce)
    task = asyncio.create_task(watcher.run(emit))
    try:
        yield watcher, reports
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _until(reports: list[PodReport], count: int) -> None:
    for _ in range(200):
        if len(reports) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(reports)} reports, not {count}")


async def test_the_watcher_lists_watches_and_coalesces_a_churn(
    served: tuple[PodStore, KubePodApi],
) -> None:
    store, api = served
    store.put(_doc(1))
    store.put(pod_document("shop", "other", "10.244.2.1", node="kind-worker2"))  # not ours
    async with _watching(api, 0.2) as (watcher, reports):
        await _until(reports, 1)
        assert reports[0].full and [p.name for p in reports[0].upsert] == ["web-1"]
        for i in range(2, 202):  # 200 pods at once
            store.put(_doc(i, ip=f"10.244.{1 + i // 250}.{i % 250}"))
        for _ in range(200):
            if sum(len(r.upsert) for r in reports[1:]) >= 200:
                break
            await asyncio.sleep(0.02)
        deltas = reports[1:]
        assert sum(len(r.upsert) for r in deltas) == 200 and len(deltas) < 10
        store.delete("shop", "web-1")
        await _until(reports, len(reports) + 1)
        assert reports[-1].remove == ("shop/web-1",)
        assert len(watcher.full()[0].upsert) == 200


async def test_a_gone_or_ended_watch_lists_again(served: tuple[PodStore, KubePodApi]) -> None:
    store, api = served
    store.put(_doc(1))
    async with _watching(api, 0.01) as (_, reports):
        await _until(reports, 1)
        store.close_watches()  # the server ends the watch: a list, a full again
        await _until(reports, 2)
        assert reports[1].full and store.lists == 2
        for _ in range(200):  # the second watch open
            if store.watches == 2:
                break
            await asyncio.sleep(0.02)
        store.put(_doc(2))
        store.compact()  # and the next watch's version is too old: 410, a list again
        store.close_watches()
        await _until(reports, 3)
        assert reports[-1].full and {p.name for p in reports[-1].upsert} == {"web-1", "web-2"}


async def test_an_unreachable_api_is_retried(tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "k", "http://127.0.0.1:9", "t")  # discard: closed
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            raise asyncio.CancelledError

    async def emit(batch: list[PodReport]) -> None:
        raise AssertionError("nothing to report")

    watcher = PodWatcher(KubePodApi("n", kubeconfig), LABELS, sleep=sleep)
    with pytest.raises(asyncio.CancelledError):
        await watcher.run(emit)
    assert slept == [1.0, 2.0, 4.0]


# --------------------------------------------------------------------------- on the map stream


class FakeStream:
    """The map stream's websocket, recording what the agent sends."""

    def __init__(self, *, failing: bool = False) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed = False
        self.failing = failing

    async def send_json(self, data: Any) -> None:
        if self.failing:
            raise ConnectionResetError("gone")
        self.sent.append(data)


async def test_each_stream_gets_a_full_then_the_deltas(
    served: tuple[PodStore, KubePodApi],
) -> None:
    store, api = served
    store.put(_doc(1))
    reporter = PodReporter(PodWatcher(api, LABELS, coalesce=0.01))
    first = FakeStream()
    await reporter.stream_started(first)  # before the first list: nothing yet
    task = asyncio.create_task(reporter.run())
    try:
        for _ in range(200):
            if first.sent:
                break
            await asyncio.sleep(0.02)
        store.put(_doc(2))
        for _ in range(200):
            if len(first.sent) == 2:
                break
            await asyncio.sleep(0.02)
        assert [(m["full"], len(m["upsert"])) for m in first.sent] == [(True, 1), (False, 1)]
        await reporter.stream_started(FakeStream(failing=True))  # a stream that breaks
        store.put(_doc(3))  # not sent: no stream holds the full
        for _ in range(200):
            if len(reporter.watcher.book.pods) == 3 and not reporter.watcher.book.pending:
                break
            await asyncio.sleep(0.02)
        second = FakeStream()
        await reporter.stream_started(second)  # reconnected: the whole book
        assert [(m["full"], len(m["upsert"])) for m in second.sent] == [(True, 3)]
        assert reporter.to_dict() | {"messages": 0} == {
            "reported": 3, "lists": 1, "messages": 0, "refused": False,
        }  # fmt: skip
        assert len(first.sent) == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_gateway_refusing_pods_turns_the_reports_off() -> None:
    reporter = PodReporter(PodWatcher(KubePodApi("n", None), LABELS))  # never started
    reporter.watcher.lists = 1
    reporter.watcher.book.listed([_doc(1)], "5")
    assert not reporter.stream_ended(1008)  # nothing sent on that stream: not over pods
    stream = FakeStream()
    await reporter.stream_started(stream)
    assert len(stream.sent) == 1
    assert not reporter.stream_ended(1006) and reporter.stream_ended(1008)
    again = FakeStream()
    await reporter.stream_started(again)
    assert again.sent == [] and reporter.refused
