"""A stand-in for the API server's Pods of one node: the list and the watch (no cluster here).

``GET /api/v1/pods?fieldSelector=spec.nodeName=NODE`` answers a PodList of the stored
pods on NODE with the current ``resourceVersion``; with ``watch=true`` it streams the
events after ``resourceVersion`` (JSON lines, as the API server does) until
``timeoutSeconds`` or :meth:`PodStore.close_watches`, and answers a 410 Gone ERROR event
when the version is older than the store keeps (:attr:`PodStore.oldest`). The real
``kubernetes`` client is pointed at it with :func:`lab.kubeapi.write_kubeconfig`.
"""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from lab.kubeapi import recorded


def pod_document(
    namespace: str,
    name: str,
    ip: str,
    account: str = "default",
    node: str = "kind-worker",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The recorded Pod with these fields."""
    doc: dict[str, Any] = json.loads(recorded("pod-kind.json"))
    doc["metadata"].update(namespace=namespace, name=name, labels=labels or {})
    doc["spec"].update(serviceAccountName=account, serviceAccount=account, nodeName=node)
    doc["status"].update(podIP=ip, podIPs=[{"ip": ip}])
    return doc


@dataclass
class PodStore:
    """The served pods and the events since :attr:`oldest`."""

    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    version: int = 1000
    oldest: int = 1000  # events before this version are forgotten (410)
    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    lists: int = 0
    watches: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _closing: int = 0

    def put(self, doc: dict[str, Any], kind: str | None = None) -> None:
        """Create or replace a pod (ADDED or MODIFIED), as the API server would."""
        meta = doc["metadata"]
        key = (meta["namespace"], meta["name"])
        kind = kind or ("MODIFIED" if key in self.pods else "ADDED")
        self._write(key, doc, kind)

    def delete(self, namespace: str, name: str) -> None:
        self._write((namespace, name), self.pods[(namespace, name)], "DELETED")

    def _write(self, key: tuple[str, str], doc: dict[str, Any], kind: str) -> None:
        self.version += 1
        doc = copy.deepcopy(doc)
        doc["metadata"]["resourceVersion"] = str(self.version)
        if kind == "DELETED":
            self.pods.pop(key, None)
        else:
            self.pods[key] = doc
        self.events.append((self.version, kind, doc))
        self._changed.set()

    def compact(self) -> None:
        """Forget the events so far: a watch from before now answers 410 Gone."""
        self.oldest, self.events = self.version, []

    def close_watches(self) -> None:
        """End every open watch (as the API server does at its timeout)."""
        self._closing += 1
        self._changed.set()

    def on(self, node: str) -> list[dict[str, Any]]:
        return [d for d in self.pods.values() if d["spec"].get("nodeName") == node]


STORE = web.AppKey("pod_store", PodStore)


def pod_api_app(store: PodStore) -> web.Application:
    app = web.Application()
    add_pod_routes(app, store)
    return app


def add_pod_routes(app: web.Application, store: PodStore) -> None:
    """Serve ``store``'s pods on ``app`` (the list and the watch)."""
    app[STORE] = store

    async def pods(request: web.Request) -> web.StreamResponse:
        selector = request.query.get("fieldSelector", "")
        node = selector.removeprefix("spec.nodeName=")
        if request.query.get("watch") in ("true", "1", "True"):
            return await _watch(request, store, node)
        store.lists += 1
        body = {
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(store.version)},
            "items": store.on(node),
        }
        return web.json_response(body)

    async def replace(request: web.Request) -> web.Response:
        """``PUT /api/v1/namespaces/NS/pods/NAME``: create or replace (a relabel)."""
        doc = await request.json()
        meta = doc.get("metadata", {})
        if (meta.get("namespace"), meta.get("name")) != (
            request.match_info["namespace"],
            request.match_info["name"],
        ):
            return web.json_response({"kind": "Status", "code": 400}, status=400)
        store.put(doc)
        return web.json_response(store.pods[(meta["namespace"], meta["name"])])

    async def remove(request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        if key not in store.pods:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        store.delete(*key)
        return web.json_response({"kind": "Status", "status": "Success"})

    app.router.add_get("/api/v1/pods", pods)
    app.router.add_put("/api/v1/namespaces/{namespace}/pods/{name}", replace)
    app.router.add_delete("/api/v1/namespaces/{namespace}/pods/{name}", remove)


async def _watch(request: web.Request, store: PodStore, node: str) -> web.StreamResponse:
    store.watches += 1
    closing = store._closing  # a close_watches() from now on ends this watch
    since = int(request.query.get("resourceVersion") or store.version)
    timeout = float(request.query.get("timeoutSeconds") or 300)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    if since < store.oldest:
        gone = {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "code": 410,
            "reason": "Expired",
            "message": f"too old resource version: {since}",
        }
        await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
        return response
    deadline = asyncio.get_running_loop().time() + timeout
    while store._closing == closing:
        for version, kind, doc in list(store.events):
            if version > since and doc["spec"].get("nodeName") == node:
                line = json.dumps({"type": kind, "object": doc}).encode() + b"\n"
                await response.write(line)
            since = max(since, version)
        store._changed.clear()
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            break
        try:
            await asyncio.wait_for(store._changed.wait(), left)
        except TimeoutError:
            break
    await response.write_eof()
    return response
