"""A stand-in Kubernetes API server that replays recorded responses (no cluster runs here).

Serves ``GET /api/v1/nodes/{name}`` from recorded JSON files (lab/kube_responses),
answers like the real API server for the rest: a recorded 401 Status without the
bearer token, a recorded 404 Status for unknown nodes, and any recorded status for a
node listed in ``errors``. The real ``kubernetes`` client is pointed at it through a
kubeconfig (:func:`write_kubeconfig`), so the client layer runs unmodified.

Services (``/api/v1/namespaces/{ns}/services``) and EndpointSlices
(``/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices``) are served from an
in-memory store (:class:`Objects`) with the API server's semantics where a client
depends on them: equality label selectors and ``limit``/``continue`` pages on lists;
``metadata.resourceVersion`` bumped on every write and a stale one refused with the
recorded 409 Conflict; a create of an existing name refused with 409 AlreadyExists;
404 on read, replace and delete of what is not there; a Service's ``clusterIP``
immutable (422); the defaults a reader sees (``protocol``, ``targetPort``, the IP
families of a headless Service). Namespaces in ``forbidden`` answer the recorded
403, and :attr:`Objects.faults` holds one-shot statuses for the next matching calls.

``python -m lab.kubeapi --listen 127.0.0.1:6443 --token T --node NAME=FILE``
runs it as a process (the lab starts it inside a node's namespace).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

RESPONSES = Path(__file__).resolve().parent / "kube_responses"
REQUESTS = web.AppKey("requests", list[dict[str, Any]])


def recorded(name: str) -> bytes:
    return (RESPONSES / name).read_bytes()


def _status(code: int, name: str) -> web.Response:
    body = json.loads(recorded(f"status-{code}.json"))
    if code in (403, 404):
        body["message"] = body["message"].replace(body["details"]["name"], name)
        body["details"]["name"] = name
    return web.json_response(body, status=code)


def kube_api_app(
    nodes: dict[str, bytes],
    *,
    token: str,
    errors: dict[str, int] | None = None,
    namespaces: Iterable[str] = (),
) -> web.Application:
    """The app: ``nodes`` maps a node name to its recorded Node JSON; Services and
    EndpointSlices may be created in ``namespaces`` (see :data:`OBJECTS`)."""
    app = web.Application()
    app[REQUESTS] = []
    app[OBJECTS] = Objects(set(namespaces))
    failing = dict(errors or {})

    async def read_node(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        app[REQUESTS].append({"path": request.path, "headers": dict(request.headers)})
        if request.headers.get("Authorization") != f"Bearer {token}":
            return _status(401, name)
        if name in failing:
            return _status(failing[name], name)
        if name not in nodes:
            return _status(404, name)
        return web.Response(body=nodes[name], content_type="application/json")

    app.router.add_get("/api/v1/nodes/{name}", read_node)
    _object_routes(app, token)
    return app


# --------------------------------------------------------------------------- Services, slices

#: resource -> (API path prefix, group, kind, list kind)
RESOURCES = {
    "services": ("/api/v1", "", "Service", "ServiceList"),
    "endpointslices": ("/apis/discovery.k8s.io/v1", "discovery.k8s.io", "EndpointSlice",
                       "EndpointSliceList"),
}  # fmt: skip


@dataclass
class Objects:
    """The served Services and EndpointSlices, by (resource, namespace, name)."""

    namespaces: set[str]
    items: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    forbidden: set[str] = field(default_factory=set)
    #: (method, resource, status): answered once, instead of the next matching call
    faults: list[tuple[str, str, int]] = field(default_factory=list)
    writes: list[tuple[str, str, str]] = field(default_factory=list)  # (method, resource, name)
    _versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    def of(self, resource: str, namespace: str | None = None) -> dict[str, dict[str, Any]]:
        """The stored objects of ``resource``, by name."""
        return {n: doc for (r, ns, n), doc in sorted(self.items.items())
                if r == resource and namespace in (None, ns)}  # fmt: skip

    def put(self, resource: str, namespace: str, document: dict[str, Any]) -> dict[str, Any]:
        """Store ``document`` as a write by another client would (a new resourceVersion)."""
        meta = document.setdefault("metadata", {})
        meta.update(namespace=namespace, resourceVersion=str(next(self._versions)))
        meta.setdefault("uid", f"uid-{meta['resourceVersion']}")
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        self.items[(resource, namespace, meta["name"])] = _defaulted(resource, document)
        return document

    def dns_records(self, domain: str = "cluster.local") -> list[tuple[str, str]]:
        """(name, address) pairs cluster DNS answers for the headless Services: each
        ready endpoint of the slices labelled with the Service's name, as CoreDNS's
        kubernetes plugin does (``--host-record`` lines for a stand-in dnsmasq)."""
        records = []
        for (resource, ns, name), svc in sorted(self.items.items()):
            if resource != "services" or svc.get("spec", {}).get("clusterIP") != "None":
                continue
            for piece in self.of("endpointslices", ns).values():
                if piece["metadata"].get("labels", {}).get("kubernetes.io/service-name") != name:
                    continue
                for endpoint in piece.get("endpoints") or ():
                    if (endpoint.get("conditions") or {}).get("ready", True):
                        fqdn = f"{name}.{ns}.svc.{domain}"
                        records += [(fqdn, address) for address in endpoint["addresses"]]
        return records

    def fault(self, method: str, resource: str) -> int | None:
        for i, (m, r, status) in enumerate(self.faults):
            if (m, r) == (method, resource):
                del self.faults[i]
                return status
        return None


OBJECTS = web.AppKey("objects", Objects)


def _defaulted(resource: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The defaults the API server fills in that a reader would see."""
    if resource == "services":
        spec = doc.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or ():
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
        if spec.get("clusterIP") == "None":
            spec["clusterIPs"] = ["None"]
            if not spec.get("selector"):
                spec.setdefault("ipFamilyPolicy", "RequireDualStack")
                spec.setdefault("ipFamilies", ["IPv4", "IPv6"])
    else:
        for port in doc.get("ports") or ():
            port.setdefault("protocol", "TCP")
    return doc


def _object_status(file: str, resource: str, name: str, **values: str) -> web.Response:
    """A recorded Status (its example names replaced by this call's)."""
    group = RESOURCES[resource][1]
    text = (
        recorded(file)
        .decode()
        .replace(
            'resource \\"services\\" in API group \\"\\"',
            f'resource \\"{resource}\\" in API group \\"{group}\\"',
        )
    )
    text = text.replace('\\"db-vm\\"', f'\\"{name}\\"').replace(
        '"name":"db-vm"', f'"name":"{name}"'
    )
    text = text.replace("services", f"{resource}.{group}" if group else resource)
    for key, value in values.items():
        text = text.replace(key, value)
    body = json.loads(text)
    body["details"]["kind"] = resource
    if group:
        body["details"]["group"] = group
    return web.json_response(body, status=body["code"])


def _matches(doc: dict[str, Any], selector: str) -> bool:
    labels = doc.get("metadata", {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _object_routes(app: web.Application, token: str) -> None:
    objects = app[OBJECTS]

    def refusal(request: web.Request, resource: str, name: str) -> web.Response | None:
        app[REQUESTS].append({"path": request.path, "method": request.method,
                              "headers": dict(request.headers)})  # fmt: skip
        namespace = request.match_info["namespace"]
        if request.headers.get("Authorization") != f"Bearer {token}":
            return _status(401, name)
        if namespace in objects.forbidden:
            verb = {"GET": "list" if not name else "get", "POST": "create", "PUT": "update",
                    "DELETE": "delete"}[request.method]  # fmt: skip
            return _object_status("status-403-list.json", resource, name,
                                  **{"cannot list": f"cannot {verb}",
                                     "wiregate-peers": namespace})  # fmt: skip
        status = objects.fault(request.method, resource)
        if status == 409:
            return _object_status("status-409-conflict.json", resource, name)
        if status is not None:
            return _status(status, name)
        return None

    def not_found(resource: str, name: str) -> web.Response:
        group = RESOURCES[resource][1]
        qualified = f"{resource}.{group}" if group else resource
        return _object_status("status-404.json", resource, name,
                              **{"nodes": qualified, "no-such-node": name})  # fmt: skip

    async def listing(request: web.Request) -> web.Response:
        resource = request.match_info["resource"]
        if (refused := refusal(request, resource, "")) is not None:
            return refused
        selector = request.query.get("labelSelector", "")
        found = [d for d in objects.of(resource, request.match_info["namespace"]).values()
                 if _matches(d, selector)]  # fmt: skip
        start = int(request.query.get("continue") or 0)
        limit = int(request.query.get("limit") or 0) or len(found) or 1
        page, more = found[start : start + limit], start + limit < len(found)
        list_kind = RESOURCES[resource][3]
        meta = {"resourceVersion": "999", **({"continue": str(start + limit)} if more else {})}
        return web.json_response({"kind": list_kind, "apiVersion": _api_version(resource),
                                  "metadata": meta, "items": page})  # fmt: skip

    async def create(request: web.Request) -> web.Response:
        resource, namespace = request.match_info["resource"], request.match_info["namespace"]
        doc = await request.json()
        name = doc.get("metadata", {}).get("name", "")
        if (refused := refusal(request, resource, name)) is not None:
            return refused
        if namespace not in objects.namespaces:
            return _status(404, namespace)
        if (resource, namespace, name) in objects.items:
            return _object_status("status-409-exists.json", resource, name)
        doc.setdefault("metadata", {}).pop("resourceVersion", None)
        objects.writes.append(("POST", resource, name))
        return web.json_response(objects.put(resource, namespace, doc), status=201)

    async def one(request: web.Request) -> web.Response:
        resource, namespace = request.match_info["resource"], request.match_info["namespace"]
        name = request.match_info["name"]
        if (refused := refusal(request, resource, name)) is not None:
            return refused
        key = (resource, namespace, name)
        current = objects.items.get(key)
        if current is None:
            return not_found(resource, name)
        if request.method == "GET":
            return web.json_response(current)
        if request.method == "DELETE":
            del objects.items[key]
            objects.writes.append(("DELETE", resource, name))
            return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                      "status": "Success", "details": {"name": name}})  # fmt: skip
        return await replace(request, key, current)

    async def replace(
        request: web.Request, key: tuple[str, str, str], current: dict[str, Any]
    ) -> web.Response:
        resource, namespace, name = key
        doc = await request.json()
        if doc.get("metadata", {}).get("resourceVersion") != current["metadata"]["resourceVersion"]:
            return _object_status("status-409-conflict.json", resource, name)
        if resource == "services" and (doc.get("spec") or {}).get("clusterIP") != current[
            "spec"
        ].get("clusterIP"):
            return _object_status("status-422-immutable.json", resource, name)
        objects.writes.append(("PUT", resource, name))
        return web.json_response(objects.put(resource, namespace, doc))

    for resource, (prefix, *_rest) in RESOURCES.items():
        base = f"{prefix}/namespaces/{{namespace}}/{{resource:{resource}}}"
        app.router.add_get(base, listing)
        app.router.add_post(base, create)
        app.router.add_route("*", base + "/{name}", one)


def _api_version(resource: str) -> str:
    group = RESOURCES[resource][1]
    return f"{group}/v1" if group else "v1"


def write_kubeconfig(path: Path, server: str, token: str) -> Path:
    """A kubeconfig naming ``server`` with a bearer token (as ``kubectl config`` writes it)."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "recorded", "cluster": {"server": server}}],
        "users": [{"name": "agent", "user": {"token": token}}],
        "contexts": [{"name": "recorded", "context": {"cluster": "recorded", "user": "agent"}}],
        "current-context": "recorded",
    }
    path.write_text(json.dumps(doc))  # JSON is YAML
    path.chmod(0o600)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--token", required=True)
    parser.add_argument("--node", action="append", default=[], help="NAME=FILE (repeatable)")
    args = parser.parse_args()
    nodes = {}
    for item in args.node:
        name, _, file = item.partition("=")
        nodes[name] = Path(file).read_bytes()
    host, _, port = args.listen.rpartition(":")
    web.run_app(kube_api_app(nodes, token=args.token), host=host, port=int(port), print=print)


if __name__ == "__main__":
    main()
