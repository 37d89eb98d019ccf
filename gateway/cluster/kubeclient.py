"""The thin client layer of the peer Services: the official ``kubernetes`` client, one
namespace, two kinds (Services, EndpointSlices), JSON documents in and out.

Every call is blocking (the client is synchronous; callers use a thread) and maps the
API's refusals onto the error tree: 403 :class:`~wiregate.errors.Forbidden` (the RBAC
of deploy/kubernetes/components/peer-services is missing), 409
:class:`~wiregate.errors.Conflict`, 404 :class:`~wiregate.errors.NotFound`, 401
:class:`~wiregate.errors.ConfigError`, anything else or no answer
:class:`~wiregate.errors.Unavailable`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.cluster.peers import LABEL_MANAGED_BY, LABEL_SLICE_MANAGED_BY, MANAGED_BY, Kind
from wiregate.errors import (
    BadInput,
    ConfigError,
    Conflict,
    Forbidden,
    NotFound,
    Unavailable,
    WiregateError,
)
from wiregate.kubeclient import api_client

__all__ = ["PeerApi", "connect"]

REQUEST_TIMEOUT = 10.0
PAGE = 500
_SELECTOR = {
    Kind.SERVICE: f"{LABEL_MANAGED_BY}={MANAGED_BY}",
    Kind.SLICE: f"{LABEL_SLICE_MANAGED_BY}={MANAGED_BY}",
}
_RESOURCE = {Kind.SERVICE: "services", Kind.SLICE: "endpointslices"}


def connect(kubeconfig: Path | None, namespace: str) -> PeerApi:
    """A client for ``namespace`` from ``kubeconfig``, or the pod's ServiceAccount."""
    api = api_client(kubeconfig, setting="peer_services_kubeconfig", what="peer_services")
    return PeerApi(api, namespace)


class PeerApi:
    """Services and EndpointSlices of one namespace, through ``api`` (an ApiClient)."""

    def __init__(self, api: Any, namespace: str) -> None:
        from kubernetes import client

        self.namespace = namespace
        self._api = api
        self._core = client.CoreV1Api(api)
        self._discovery = client.DiscoveryV1Api(api)

    def close(self) -> None:
        self._api.close()

    def list(self, kind: Kind) -> list[dict[str, Any]]:
        """Every object of ``kind`` carrying this controller's managed-by label."""
        call = self._call(kind, "list")
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            extra = {"_continue": token} if token else {}
            with self._errors(kind, ""):
                page = _json(call(self.namespace, label_selector=_SELECTOR[kind], limit=PAGE,
                                  **extra, **_RAW))  # fmt: skip
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    def read(self, kind: Kind, name: str) -> dict[str, Any] | None:
        """The object, None if there is none."""
        try:
            with self._errors(kind, name):
                return _json(self._call(kind, "read")(name, self.namespace, **_RAW))
        except NotFound:
            return None

    def create(self, kind: Kind, body: Mapping[str, Any]) -> dict[str, Any]:
        with self._errors(kind, body["metadata"]["name"]):
            return _json(self._call(kind, "create")(self.namespace, body, **_RAW))

    def replace(self, kind: Kind, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        with self._errors(kind, name):
            return _json(self._call(kind, "replace")(name, self.namespace, body, **_RAW))

    def delete(self, kind: Kind, name: str) -> bool:
        """Delete the object; False if it was already gone."""
        try:
            with self._errors(kind, name):
                _json(self._call(kind, "delete")(name, self.namespace, **_RAW))
        except NotFound:
            return False
        return True

    def _call(self, kind: Kind, verb: str) -> Callable[..., Any]:
        if kind is Kind.SERVICE:
            return getattr(self._core, f"{verb}_namespaced_service")  # type: ignore[no-any-return]
        return getattr(self._discovery, f"{verb}_namespaced_endpoint_slice")  # type: ignore[no-any-return]

    @contextmanager
    def _errors(self, kind: Kind, name: str) -> Iterator[None]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            yield
        except ApiException as exc:
            raise api_error(exc.status, kind, name, self.namespace) from exc
        except (HTTPError, OSError) as exc:
            raise Unavailable(f"Kubernetes API unreachable: {exc}") from exc


# Without preloading, the raw urllib3 response: its JSON as sent, no model round trip.
_RAW: dict[str, Any] = {"_preload_content": False, "_request_timeout": REQUEST_TIMEOUT}


def _json(response: Any) -> dict[str, Any]:
    try:
        document = json.loads(response.data)
        response.release_conn()  # read in full: the connection goes back to the pool
    except ValueError as exc:
        raise BadInput(f"the Kubernetes API answered with no JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise BadInput("the Kubernetes API answered with no object")
    return document


def api_error(status: int | None, kind: Kind, name: str, namespace: str) -> WiregateError:
    """The error for an API status; ``name`` empty for a list."""
    what = f"{kind} {name!r}" if name else f"{_RESOURCE[kind]}"
    if status == 401:
        return ConfigError(
            "the Kubernetes API refused the gateway's credentials (401)",
            hint="check the gateway's ServiceAccount token or peer_services_kubeconfig's user",
        )
    if status == 403:
        return Forbidden(
            f"the gateway may not manage {what} in namespace {namespace!r} (403)",
            hint="apply deploy/kubernetes/components/peer-services (a Role on services and"
            " endpointslices in that namespace, bound to the gateway's ServiceAccount)",
        )
    if status == 404:
        return NotFound(f"no {what} in namespace {namespace!r} (404)")
    if status == 409:
        return Conflict(f"{what} in namespace {namespace!r} changed or exists (409)")
    return Unavailable(f"the Kubernetes API answered {status} for {what}")
