"""The peer-services component: a Role in wiregate-peers only, bound to the gateway,
and settings the gateway reads."""

from __future__ import annotations

from pathlib import Path

from lab.manifests import Doc, find
from tests.deploy.test_kubernetes_manifests import valid_site
from wiregate.settings import GatewaySettings


def _site(tmp_path: Path) -> list[Doc]:
    return valid_site(tmp_path, ["agent", "peer-services"])


def test_the_component_is_valid_and_its_rbac_is_one_namespaced_role(tmp_path: Path) -> None:
    docs = _site(tmp_path)
    find(docs, "Namespace", "wiregate-peers")
    role = find(docs, "Role", "wiregate-gateway-peers")
    assert role["metadata"]["namespace"] == "wiregate-peers"
    verbs = ["get", "list", "create", "update", "delete"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["services"], "verbs": verbs},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": verbs},
    ]
    binding = find(docs, "RoleBinding", "wiregate-gateway-peers")
    assert binding["metadata"]["namespace"] == "wiregate-peers"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "wiregate-gateway-peers"}  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "wiregate-gateway", "namespace": "wiregate"}
    ]
    gateway_roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")
                     and d["metadata"]["name"].startswith("wiregate-gateway")]  # fmt: skip
    assert gateway_roles == [role]  # nothing cluster-wide for the gateway


def test_the_gateway_is_switched_on_by_its_configmap(tmp_path: Path) -> None:
    data = find(_site(tmp_path), "ConfigMap", "wiregate-gateway")["data"]
    env = {k: v for k, v in data.items() if k.startswith("WIREGATE_PEER_SERVICES")}
    assert env == {"WIREGATE_PEER_SERVICES": "true",
                   "WIREGATE_PEER_SERVICES_NAMESPACE": "wiregate-peers",
                   "WIREGATE_PEER_SERVICES_TAG": "tag:vm"}  # fmt: skip
    settings = GatewaySettings.model_validate(
        {k.removeprefix("WIREGATE_").lower(): v for k, v in env.items()}
    )
    assert settings.peer_services is True
    assert settings.peer_services_namespace == "wiregate-peers"
