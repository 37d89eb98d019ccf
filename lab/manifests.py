"""The Kubernetes manifests under deploy/kubernetes, rendered by ``kubectl kustomize``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


Doc = dict[str, Any]


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl not found (needed for `kubectl kustomize` with components, kubectl >= 1.21);"
            " Debian 12 packages only kubernetes-client 1.20, whose kustomize lacks components;"
            " install a current kubectl (this project's CI machine image ships one)"
        )
    return path


def render_dir(path: Path) -> list[Doc]:
    done = subprocess.run(
        [_kubectl(), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    docs = [d for d in yaml.safe_load_all(done.stdout) if d is not None]
    assert docs, f"{path} rendered nothing"
    return docs


_cache: dict[str, list[Doc]] = {}


def render(target: str) -> list[Doc]:
    if target not in _cache:
        _cache[target] = render_dir(ROOT / target)
    return _cache[target]


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]


def container(doc: Doc, name: str) -> Doc:
    hits = [c for c in pod_spec(doc)["containers"] if c["name"] == name]
    assert len(hits) == 1, f"{doc['metadata']['name']}: no single container {name}"
    return hits[0]


def env_of(c: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in c.get("env", [])}
