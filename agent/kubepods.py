"""Pod identity: the pods scheduled on this node, reported to the gateway (``pods`` messages).

With ``kubernetes = true`` the agent lists the Pods whose ``spec.nodeName`` is this node
(the official ``kubernetes`` client, field selector), then watches them from the list's
``resourceVersion``, and sends the gateway what identifies each pod that has an IP
(:mod:`wiregate.podwire`): its IPs, namespace, service account and the labels named by
the ``pod_labels`` setting. A list is sent as a ``full`` report; watch events are
coalesced for :data:`COALESCE_SECONDS` and sent as one delta, so 200 pods churning at
once are a message or two. The list is made again (and sent in full) when the watch
ends (the server closes it after :data:`RESYNC_SECONDS`), when the API answers 410 Gone
(the version is too old), or after an error (with a back-off); and the agent sends the
whole book again after every (re)connect of its map stream (:meth:`PodWatcher.full`).

Only ``Pending`` and ``Running`` pods with an IP are reported. Pods on the host's network
are not: they have the node's own address and cannot be told apart from it (logged once
per pod).

:func:`pod_of` and :class:`PodBook` are pure (a Pod document in; reports out);
:class:`KubePodApi` is the thin client layer (the watch runs in a daemon thread);
:class:`PodWatcher` drives them, with the API and the sleep injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

from wiregate.errors import BadInput, Forbidden, Unavailable, WiregateError
from wiregate.kubeclient import api_client
from wiregate.logging import get_logger
from wiregate.podwire import (
    MAX_PODS,
    Pod,
    PodReport,
    PodReportError,
    build_pods,
    pod_key,
    read_pods,
)

__all__ = [
    "COALESCE_SECONDS",
    "RESYNC_SECONDS",
    "Gone",
    "KubePodApi",
    "PodApi",
    "PodBook",
    "PodWatcher",
    "host_network",
    "pod_of",
]

log = get_logger("agent.kubepods")

COALESCE_SECONDS: Final = 0.1  # watch events gathered into one delta
RESYNC_SECONDS: Final = 300  # the watch's server-side timeout: then the list again
REQUEST_TIMEOUT: Final = 10.0
_PHASES: Final = frozenset({"Pending", "Running"})

Event = tuple[str, Mapping[str, Any]]  # (ADDED | MODIFIED | DELETED | BOOKMARK, object)


class Gone(WiregateError):
    """The watch's resourceVersion is too old (410): list again."""


# --------------------------------------------------------------------------- the pure core


def pod_of(document: Mapping[str, Any], label_keys: Iterable[str]) -> Pod | None:
    """The :class:`Pod` a Pod document reports; None for a pod that is not reported
    (not pending or running, no IP yet, on the host's network, or malformed: a name or
    label value the gateway would refuse, logged)."""
    meta, spec, status = (_mapping(document.get(k)) for k in ("metadata", "spec", "status"))
    phase = status.get("phase")
    if not isinstance(phase, str) or phase not in _PHASES or spec.get("hostNetwork") is True:
        return None
    ips = _pod_ips(status)
    namespace, name = meta.get("namespace"), meta.get("name")
    if not ips or not isinstance(namespace, str) or not isinstance(name, str):
        return None
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    labels = _mapping(meta.get("labels"))
    chosen = {k: labels[k] for k in label_keys if isinstance(labels.get(k), str)}
    pod = Pod(namespace, name, ips, str(account), tuple(sorted(chosen.items())))
    return pod if _acceptable(pod) else None


def _acceptable(pod: Pod) -> bool:
    """Whether the gateway would take ``pod`` (one it refuses would cost the whole message)."""
    try:
        read_pods(build_pods(False, [pod]))
    except PodReportError as exc:
        log.warning("pod not reported: malformed", pod=pod.key, error=exc.message)
        return False
    return True


def host_network(document: Mapping[str, Any]) -> str | None:
    """``namespace/name`` of a pod on the host's network (not reported), else None."""
    if _mapping(document.get("spec")).get("hostNetwork") is not True:
        return None
    meta = _mapping(document.get("metadata"))
    return pod_key(str(meta.get("namespace")), str(meta.get("name")))


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _pod_ips(status: Mapping[str, Any]) -> tuple[str, ...]:
    listed = status.get("podIPs")
    texts = [_mapping(i).get("ip") for i in listed] if isinstance(listed, list) else []
    if not texts and status.get("podIP"):
        texts = [status.get("podIP")]
    by_family: dict[int, str] = {}
    for text in texts:
        try:
            ip = ipaddress.ip_address(str(text))
        except ValueError:
            continue
        by_family.setdefault(ip.version, str(ip))  # the first of each family
    return tuple(by_family[v] for v in sorted(by_family))


class PodBook:
    """This node's reported pods, and the changes not sent yet (pure)."""

    def __init__(self, label_keys: Iterable[str]) -> None:
        self.label_keys = tuple(label_keys)
        self.pods: dict[str, Pod] = {}
        self.resource_version = ""
        self._upsert: dict[str, Pod] = {}
        self._remove: set[str] = set()
        self._sent: set[str] = set()  # the pods the last reports told of
        self._host_network: set[str] = set()  # logged once each

    def listed(self, items: Iterable[Mapping[str, Any]], resource_version: str) -> list[PodReport]:
        """A fresh list: it replaces the book; the ``full`` reports that say so."""
        pods = (self._reported(doc) for doc in items)
        self.pods = {p.key: p for p in pods if p is not None}
        self.resource_version = resource_version
        self._upsert, self._remove = {}, set()
        return self.full()

    def event(self, kind: str, document: Mapping[str, Any]) -> None:
        """A watch event: the book changes, the change is kept for :meth:`take`."""
        version = _mapping(document.get("metadata")).get("resourceVersion")
        if isinstance(version, str) and version:
            self.resource_version = version
        if kind == "BOOKMARK":
            return
        meta = _mapping(document.get("metadata"))
        key = pod_key(str(meta.get("namespace")), str(meta.get("name")))
        pod = None if kind == "DELETED" else self._reported(document)
        if pod is None:
            if self.pods.pop(key, None) is not None:
                self._upsert.pop(key, None)
                if key in self._sent:  # (one that came and went unreported: nothing)
                    self._remove.add(key)
        elif self.pods.get(key) != pod:
            self.pods[key] = pod
            self._remove.discard(key)
            self._upsert[key] = pod

    def _reported(self, document: Mapping[str, Any]) -> Pod | None:
        hosted = host_network(document)
        if hosted is not None and hosted not in self._host_network:
            self._host_network.add(hosted)
            log.info("pod on the host's network not reported (it has the node's address)",
                     pod=hosted)  # fmt: skip
        return pod_of(document, self.label_keys)

    @property
    def pending(self) -> bool:
        return bool(self._upsert or self._remove)

    def take(self) -> list[PodReport]:
        """The changes since the last call, as deltas of at most MAX_PODS pods each."""
        upsert, remove = list(self._upsert.values()), sorted(self._remove)
        self._upsert, self._remove = {}, set()
        self._sent = (self._sent - set(remove)) | {p.key for p in upsert}
        return _deltas(upsert, remove)

    def full(self) -> list[PodReport]:
        """Everything: a ``full`` report, then deltas if there are more than MAX_PODS."""
        pods = [self.pods[k] for k in sorted(self.pods)]
        self._sent = set(self.pods)
        return [PodReport(True, tuple(pods[:MAX_PODS])), *_deltas(pods[MAX_PODS:], [])]


def _deltas(upsert: list[Pod], remove: list[str]) -> list[PodReport]:
    items: list[Pod | str] = [*upsert, *remove]
    chunks = (items[i : i + MAX_PODS] for i in range(0, len(items), MAX_PODS))
    return [
        PodReport(
            False,
            tuple(p for p in chunk if isinstance(p, Pod)),
            tuple(k for k in chunk if isinstance(k, str)),
        )
        for chunk in chunks
    ]


# --------------------------------------------------------------------------- the client layer


class PodApi(Protocol):
    """The list and the watch of this node's pods."""

    def list(self) -> tuple[list[Mapping[str, Any]], str]:
        """The pods (documents) and the list's resourceVersion."""
        ...

    def watch(self, resource_version: str, timeout: int) -> Iterator[Event]:
        """Events from ``resource_version`` until the server ends the watch; :class:`Gone`
        when that version is too old (blocking: run in a thread)."""
        ...

    def stop(self) -> None:
        """End a running :meth:`watch` (from another thread)."""
        ...


class KubePodApi:
    """:class:`PodApi` with the official client (field selector ``spec.nodeName``)."""

    def __init__(self, node_name: str, kubeconfig: Path | None) -> None:
        self.selector = f"spec.nodeName={node_name}"
        self.kubeconfig = kubeconfig
        self._watch: Any = None

    def list(self) -> tuple[list[Mapping[str, Any]], str]:
        from kubernetes import client

        with _errors("list"):
            api = api_client(self.kubeconfig)
            try:
                raw: Any = client.CoreV1Api(api).list_pod_for_all_namespaces(
                    field_selector=self.selector,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
                doc = json.loads(raw.data)
            finally:
                api.close()
        if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
            raise BadInput("the Kubernetes API did not answer with a PodList")
        version = _mapping(doc.get("metadata")).get("resourceVersion")
        return [_mapping(i) for i in doc["items"]], str(version or "")

    def watch(self, resource_version: str, timeout: int) -> Iterator[Event]:
        from kubernetes import client, watch

        with _errors("watch"):
            api = api_client(self.kubeconfig)
            self._watch = watcher = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                stream = watcher.stream(  # type: ignore[no-untyped-call]
                    client.CoreV1Api(api).list_pod_for_all_namespaces,
                    field_selector=self.selector,
                    resource_version=resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=timeout,
                    deserialize=False,
                    _request_timeout=(REQUEST_TIMEOUT, timeout + REQUEST_TIMEOUT),
                )
                for event in stream:
                    yield str(event.get("type")), _mapping(event.get("object"))
            finally:
                if self._watch is watcher:  # (not a later watch's)
                    self._watch = None
                api.close()

    def stop(self) -> None:
        watcher = self._watch
        if watcher is not None:
            watcher.stop()


class _errors:
    """The client's exceptions onto the error tree."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        if isinstance(exc, ApiException):
            if exc.status == 410:
                raise Gone("the pod watch's version is too old (410)") from exc
            if exc.status == 403:
                raise Forbidden(
                    f"the agent may not {self.what} pods (403)",
                    hint="give the agent's ClusterRole get, list and watch on pods "
                    "(deploy/kubernetes/components/agent)",
                ) from exc
            raise Unavailable(f"the Kubernetes API answered {exc.status} to the pod {self.what}")
        if isinstance(exc, (HTTPError, OSError)):
            raise Unavailable(f"Kubernetes API unreachable: {exc}") from exc
        if isinstance(exc, ValueError):
            raise BadInput(f"the Kubernetes API answered with no JSON: {exc}") from exc


# --------------------------------------------------------------------------- the watcher

Emit = Callable[[list[PodReport]], Awaitable[None]]


class PodWatcher:
    """Lists, watches and reports this node's pods until cancelled."""

    def __init__(
        self,
        api: PodApi,
        label_keys: Iterable[str],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        coalesce: float = COALESCE_SECONDS,
        resync: int = RESYNC_SECONDS,
    ) -> None:
        self.api, self.sleep = api, sleep
        self.book = PodBook(label_keys)
        self.coalesce, self.resync = coalesce, resync
        self.lists = 0  # lists made (the first, and each resync)

    def full(self) -> list[PodReport]:
        """Everything known now (the agent sends it after each (re)connect)."""
        return self.book.full()

    async def run(self, emit: Emit) -> None:
        """List, then watch; again after each end, 410 or error (backing off)."""
        delay = 1.0
        while True:
            try:
                items, version = await asyncio.to_thread(self.api.list)
                self.lists += 1
                await emit(self.book.listed(items, version))
                await self._watch(emit)
                delay = 1.0
            except Gone:
                log.info("pod watch too old; listing again")
            except Exception as exc:  # a client fault must not end the reports for good
                if isinstance(exc, WiregateError):
                    log.warning("pods not read", error=exc.message, hint=exc.hint)
                else:
                    log.warning("pods not read", error=repr(exc))
                await self.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _watch(self, emit: Emit) -> None:
        """One watch from the book's version, its events sent as coalesced deltas."""
        queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()
        thread = _WatchThread(self.api, self.book.resource_version, self.resync, queue)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.book.event(*item)
                if self.book.pending:
                    await self.sleep(self.coalesce)
                    ended = _drain(queue, self.book)
                    await emit(self.book.take())
                    if isinstance(ended, BaseException):
                        raise ended
                    if ended:
                        return
        finally:
            self.api.stop()


def _drain(
    queue: asyncio.Queue[Event | BaseException | None], book: PodBook
) -> BaseException | bool | None:
    """Take the events queued meanwhile; what ended the watch: True if it closed, the
    exception if it failed; None while it runs."""
    while not queue.empty():
        item = queue.get_nowait()
        if item is None:
            return True
        if isinstance(item, BaseException):
            return item
        book.event(*item)
    return None


class _WatchThread(threading.Thread):
    """The blocking watch in a daemon thread (it never holds the agent's exit),
    its events handed to the loop; None when it ends, or the exception."""

    def __init__(
        self,
        api: PodApi,
        version: str,
        timeout: int,
        queue: asyncio.Queue[Event | BaseException | None],
    ) -> None:
        super().__init__(name="pod-watch", daemon=True)
        self.api, self.version, self.timeout = api, version, timeout
        self.loop, self.queue = asyncio.get_running_loop(), queue

    def run(self) -> None:
        try:
            for event in self.api.watch(self.version, self.timeout):
                self._hand(event)
        except Exception as exc:  # handed to the loop, which raises it
            self._hand(exc)
            return
        self._hand(None)

    def _hand(self, item: Event | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is exiting
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
