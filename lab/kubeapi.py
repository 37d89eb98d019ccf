"""A stand-in Kubernetes API server that replays recorded responses (no cluster runs here).

Serves ``GET /api/v1/nodes/{name}`` from recorded JSON files (lab/kube_responses),
answers like the real API server for the rest: a recorded 401 Status without the
bearer token, a recorded 404 Status for unknown nodes, and any recorded status for a
node listed in ``errors``. The real ``kubernetes`` client is pointed at it through a
kubeconfig (:func:`write_kubeconfig`), so the client layer runs unmodified.

``python -m lab.kubeapi --listen 127.0.0.1:6443 --token T --node NAME=FILE``
runs it as a process (the lab starts it inside a node's namespace).
"""

from __future__ import annotations

import argparse
import json
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
    nodes: dict[str, bytes], *, token: str, errors: dict[str, int] | None = None
) -> web.Application:
    """The app: ``nodes`` maps a node name to its recorded Node JSON."""
    app = web.Application()
    app[REQUESTS] = []
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
    return app


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
