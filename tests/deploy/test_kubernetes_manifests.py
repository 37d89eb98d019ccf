"""deploy/kubernetes: every kustomization renders, is valid against the real
Kubernetes schemas (strict: unknown fields fail), and keeps its security properties.

Needs ``kubectl`` (``kubectl kustomize``) and ``kubernetes-validate``; both are
installed by scripts/setup.sh. A missing tool fails the test, it never skips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from lab.manifests import ROOT, Doc, container, env_of, find, pod_spec, render, render_dir

KUBERNETES_VERSION = "1.30.0"
OVERLAYS = sorted(p.parent.name for p in (ROOT / "overlays").glob("*/kustomization.yaml"))
TARGETS = ["base"] + [f"overlays/{o}" for o in OVERLAYS]
COMPONENTS = sorted(p.parent.name for p in (ROOT / "components").glob("*/kustomization.yaml"))
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job", "CronJob", "Pod"}
SETUP_HINT = "run scripts/setup.sh (as root) to install it"


def _validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"the Python package kubernetes-validate is not installed: {SETUP_HINT}")
    return kubernetes_validate


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def test_the_shipped_overlays_are_tested() -> None:
    assert {"mesh", "gateway-mode", "relay", "ha", "ingress", "loadbalancer"} <= set(OVERLAYS)
    assert {"agent", "gateway-mode", "relay", "ha", "ingress", "loadbalancer"} <= set(COMPONENTS)
    assert "relay-loadbalancer" in COMPONENTS


def render_site(tmp_path: Path, components: list[str]) -> list[Doc]:
    """A site overlay of its own (outside the tree) of the base and ``components``."""

    def rel(path: Path) -> str:  # kustomize takes relative paths only
        return os.path.relpath(path, tmp_path)

    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{rel(ROOT / 'base')}]\ncomponents:\n"
        + "".join(f"  - {rel(ROOT / 'components' / c)}\n" for c in components)
    )
    return render_dir(tmp_path)


def valid_site(tmp_path: Path, components: list[str]) -> list[Doc]:
    """:func:`render_site`, each document checked against the strict schemas."""
    docs = render_site(tmp_path, components)
    kv = _validator()
    for doc in docs:
        kv.validate(doc, KUBERNETES_VERSION, strict=True)
    return docs


def test_every_component_combines_with_every_other(tmp_path: Path) -> None:
    kv = _validator()
    everything = [c for c in COMPONENTS if c != "gateway-mode"] + ["gateway-mode"]
    docs = render_site(tmp_path, everything)
    for doc in docs:
        kv.validate(doc, KUBERNETES_VERSION, strict=True)
    gw = find(docs, "Deployment", "wiregate-gateway")
    volumes = {v["name"] for v in pod_spec(gw)["volumes"]}
    assert {"state", "policy"} <= volumes
    find(docs, "Ingress", "wiregate-gateway")
    find(docs, "Service", "wiregate-gateway-public")
    find(docs, "Service", "wiregate-relay-public")


# -- every target ------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_is_valid_against_the_kubernetes_schemas(target: str) -> None:
    kv = _validator()
    for doc in render(target):
        where = f"{target}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kv.validate(doc, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{where} is invalid for Kubernetes {KUBERNETES_VERSION}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: no schema: {exc}")


@pytest.mark.parametrize("target", TARGETS)
def test_everything_is_in_the_wiregate_namespace(target: str) -> None:
    docs = render(target)
    find(docs, "Namespace", "wiregate")
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for doc in docs:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace") == "wiregate", doc["metadata"]["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_every_workload_has_its_own_service_account(target: str) -> None:
    docs = render(target)
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    used: list[str] = []
    for w in workloads(docs):
        sa = pod_spec(w).get("serviceAccountName")
        assert sa, f"{w['metadata']['name']} runs as the default ServiceAccount"
        assert sa in accounts, f"{w['metadata']['name']}: ServiceAccount {sa} is not defined"
        used.append(sa)
    assert len(used) == len(set(used)), f"workloads share a ServiceAccount: {used}"


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_values_in_the_manifests(target: str) -> None:
    docs = render(target)
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["kind"] != "Secret", f"{name}: Secrets are created out of band, not shipped"
        if doc["kind"] == "ConfigMap":
            for key, value in doc.get("data", {}).items():
                lowered = key.lower()
                assert not any(w in lowered for w in ("password", "secret", "token", "key")), (
                    f"{name}: {key} looks like a secret"
                )
                assert "://" not in value or "@" not in value, f"{name}: {key} has credentials"
                assert key != "WIREGATE_DATABASE_URL", f"{name}: database URL belongs in a Secret"
    for w in workloads(docs):
        for c in pod_spec(w)["containers"]:
            for e in c.get("env", []):
                assert not any(s in e["name"] for s in ("PASSWORD", "SECRET", "AUTH_KEY")) or (
                    "valueFrom" in e or str(e.get("value", "")).startswith("file:")
                ), f"{w['metadata']['name']}: env {e['name']} is a literal secret"
            if "WIREGATE_DATABASE_URL" in env_of(c):
                assert "secretKeyRef" in env_of(c)["WIREGATE_DATABASE_URL"].get("valueFrom", {})


@pytest.mark.parametrize("target", TARGETS)
def test_rbac_is_minimal(target: str) -> None:
    docs = render(target)
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    for role in roles:
        assert role["metadata"]["name"] == "wiregate-agent", (
            f"only the agent has RBAC, found {role['metadata']['name']}"
        )
        verbs = ["get", "list"] if target == "overlays/gateway-mode" else ["get"]  # the NodeList
        assert role["rules"] == [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": verbs},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        ]  # pods: the pods of the agent's own node (agent/kubepods.py)
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "wiregate-agent", "namespace": "wiregate"}
        ]


# -- gateway and relay: unprivileged -----------------------------------------


def assert_unprivileged(doc: Doc, name: str) -> None:
    spec = pod_spec(doc)
    pod_sc = spec.get("securityContext", {})
    c = container(doc, name)
    sc = c.get("securityContext", {})
    where = doc["metadata"]["name"]
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: may run as root"
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) not in (0, None), f"{where}: uid 0"
    assert sc.get("readOnlyRootFilesystem") is True, f"{where}: writable root filesystem"
    assert sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation"
    assert sc.get("privileged", False) is False, f"{where}: privileged"
    assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped"
    assert not sc.get("capabilities", {}).get("add"), f"{where}: adds capabilities"
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
    assert seccomp.get("type") == "RuntimeDefault", f"{where}: no RuntimeDefault seccomp"


@pytest.mark.parametrize("target", TARGETS)
def test_gateway_is_unprivileged_with_health_probes(target: str) -> None:
    gw = find(render(target), "Deployment", "wiregate-gateway")
    assert_unprivileged(gw, "gateway")
    c = container(gw, "gateway")
    assert c["args"][:3] == ["gateway", "--listen", "0.0.0.0:8080"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert not pod_spec(gw).get("hostNetwork", False)
    svc = find(render(target), "Service", "wiregate-gateway")
    assert [p["port"] for p in svc["spec"]["ports"]] == [8080]


def test_base_keeps_sqlite_on_a_volume_with_one_replica() -> None:
    docs = render("base")
    gw = find(docs, "Deployment", "wiregate-gateway")
    assert gw["spec"]["replicas"] == 1
    assert gw["spec"]["strategy"]["type"] == "Recreate"
    find(docs, "PersistentVolumeClaim", "wiregate-gateway-state")
    volumes = {v["name"]: v for v in pod_spec(gw)["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "wiregate-gateway-state"


def test_relay_is_unprivileged_and_exposes_its_udp_ports() -> None:
    docs = render("overlays/relay")
    relay = find(docs, "Deployment", "wiregate-relay")
    assert_unprivileged(relay, "relay")
    assert pod_spec(relay)["automountServiceAccountToken"] is False
    svc = find(docs, "Service", "wiregate-relay")
    assert {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]} == {
        (3478, "UDP"),
        (3479, "UDP"),
        (3480, "UDP"),
    }


# -- agent: root with exactly NET_ADMIN, NET_RAW and NET_BIND_SERVICE (mesh names) --


AGENT_TARGETS = ["overlays/mesh", "overlays/gateway-mode", "overlays/ingress"]


@pytest.mark.parametrize("target", AGENT_TARGETS)
def test_agent_daemonset_security(target: str) -> None:
    docs = render(target)
    ds = find(docs, "DaemonSet", "wiregate-agent")
    spec = pod_spec(ds)
    c = container(ds, "agent")
    sc = c["securityContext"]
    assert sc.get("privileged") is False
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW"]
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert not spec.get("hostPID") and not spec.get("hostIPC")

    env = env_of(c)
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert c["args"][:3] == ["agent", "--server", "http://wiregate-gateway.wiregate.svc:8080"]

    volumes = {v["name"]: v for v in spec["volumes"]}
    host_paths = {v["hostPath"]["path"]: v["hostPath"] for v in volumes.values() if "hostPath" in v}
    assert host_paths["/var/lib/wiregate/agent"]["type"] == "DirectoryOrCreate"
    assert "/run/wireguard" in host_paths
    assert set(host_paths) == {"/var/lib/wiregate/agent", "/run/wireguard"}

    tokens = [
        (name, s["serviceAccountToken"])
        for name, v in volumes.items()
        for s in v.get("projected", {}).get("sources", [])
        if "serviceAccountToken" in s
    ]
    assert len(tokens) == 1, "one projected token for the gateway"
    vol_name, token = tokens[0]
    assert token["audience"] == "wiregate-gateway"
    assert token["expirationSeconds"] == 3600
    mount = next(m for m in c["volumeMounts"] if m["name"] == vol_name)
    token_file = f"{mount['mountPath']}/{token['path']}"
    assert env["WIREGATE_WORKLOAD_TOKEN"]["value"] == f"file:{token_file}"

    # The enrollment key, if any, is a file from a Secret volume: never env or args.
    secret_mounts = {
        m["mountPath"]
        for m in c["volumeMounts"]
        if "secret" in volumes[m["name"]]
        or any("secret" in s for s in volumes[m["name"]].get("projected", {}).get("sources", []))
    }
    assert not any("--auth-key=" in a and "file:" not in a for a in c["args"])
    if "--auth-key" in c["args"]:
        value = c["args"][c["args"].index("--auth-key") + 1]
        assert value.startswith("file:"), "--auth-key must be file:PATH"
        assert any(value[5:].startswith(p + "/") for p in secret_mounts), "key not from a Secret"
    if "WIREGATE_AUTH_KEY" in env:
        value = env["WIREGATE_AUTH_KEY"].get("value", "")
        assert value.startswith("file:"), "WIREGATE_AUTH_KEY must be file:PATH"
        assert any(value[5:].startswith(p + "/") for p in secret_mounts), "key not from a Secret"

    ns = find(docs, "Namespace", "wiregate")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_mesh_runs_the_agent_on_every_node() -> None:
    ds = find(render("overlays/mesh"), "DaemonSet", "wiregate-agent")
    assert not pod_spec(ds).get("nodeSelector")
    assert not pod_spec(ds).get("affinity")


def test_gateway_mode_runs_agents_only_on_gateway_nodes() -> None:
    ds = find(render("overlays/gateway-mode"), "DaemonSet", "wiregate-agent")
    assert pod_spec(ds)["nodeSelector"] == {"wiregate.io/gateway": "true"}
    assert pod_spec(ds)["hostNetwork"] is True


def test_base_and_gateway_only_overlays_have_no_agent_or_relay() -> None:
    for target in ("base", "overlays/ha"):
        kinds = {(d["kind"], d["metadata"]["name"]) for d in render(target)}
        assert ("DaemonSet", "wiregate-agent") not in kinds
        assert ("Deployment", "wiregate-relay") not in kinds
        ns = find(render(target), "Namespace", "wiregate")
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# -- ha ----------------------------------------------------------------------


def test_ha_runs_several_gateways_on_postgresql() -> None:
    docs = render("overlays/ha")
    gw = find(docs, "Deployment", "wiregate-gateway")
    assert gw["spec"]["replicas"] > 1
    assert gw["spec"]["strategy"]["type"] == "RollingUpdate"
    env = env_of(container(gw, "gateway"))
    ref = env["WIREGATE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "wiregate-gateway-database", "key": "url"}
    assert not any(d["kind"] == "PersistentVolumeClaim" for d in docs), "SQLite PVC left over"
    volumes = {v["name"]: v for v in pod_spec(gw)["volumes"]}
    assert "persistentVolumeClaim" not in volumes["state"]
    anti = pod_spec(gw)["affinity"]["podAntiAffinity"]
    terms = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0]["topologyKey"] == "kubernetes.io/hostname"
    pdb = find(docs, "PodDisruptionBudget", "wiregate-gateway")
    assert pdb["spec"]["selector"]["matchLabels"] == gw["spec"]["selector"]["matchLabels"]
    assert 0 < pdb["spec"]["minAvailable"] < gw["spec"]["replicas"]


# -- reaching the gateway and the relay ------------------------------------------


def test_relay_fetches_its_signers_from_the_gateway_service() -> None:
    docs = render("overlays/relay")
    data = find(docs, "ConfigMap", "wiregate-relay")["data"]
    assert "WIREGATE_VERIFY_KEYS_FILE" not in data
    url = data["WIREGATE_SIGNERS_URL"]
    assert url == "http://wiregate-gateway.wiregate.svc:8080/api/v1/relay/signers"
    svc = find(docs, "Service", "wiregate-gateway")
    assert 8080 in [p["port"] for p in svc["spec"]["ports"]]


def test_the_agent_component_makes_the_gateway_trust_the_cluster_issuer() -> None:
    docs = render("overlays/mesh")
    data = find(docs, "ConfigMap", "wiregate-gateway")["data"]
    (issuer,) = json.loads(data["WIREGATE_WORKLOAD_ISSUERS"])
    assert issuer["kind"] == "kubernetes"
    assert issuer["issuer"] == "https://kubernetes.default.svc.cluster.local"
    ds = find(docs, "DaemonSet", "wiregate-agent")
    audiences = [
        s["serviceAccountToken"]["audience"]
        for v in pod_spec(ds)["volumes"]
        for s in v.get("projected", {}).get("sources", [])
        if "serviceAccountToken" in s
    ]
    assert audiences == [issuer["audience"]]
    assert issuer["ca_bundle"] == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    gw = find(docs, "Deployment", "wiregate-gateway")
    assert pod_spec(gw)["serviceAccountName"] == "wiregate-gateway"
    policy_file = data["WIREGATE_POLICY_FILE"]
    mount = next(m for m in container(gw, "gateway")["volumeMounts"] if m["name"] == "policy")
    assert policy_file.startswith(mount["mountPath"] + "/")
    policy = next(
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("wiregate-gateway-policy")
    )
    text = policy["data"]["policy.yaml"]
    assert issuer["issuer"] in text and "system:serviceaccount:wiregate:wiregate-agent" in text


def test_ingress_has_tls_for_the_gateway_service() -> None:
    docs = render("overlays/ingress")
    ing = find(docs, "Ingress", "wiregate-gateway")
    (tls,) = ing["spec"]["tls"]
    assert tls["secretName"] == "wiregate-gateway-tls"
    (rule,) = ing["spec"]["rules"]
    assert rule["host"] in tls["hosts"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "wiregate-gateway"
    public = find(docs, "ConfigMap", "wiregate-gateway")["data"]["WIREGATE_PUBLIC_URL"]
    assert public == f"https://{rule['host']}"


def test_load_balancers_for_the_gateway_and_the_relay() -> None:
    docs = render("overlays/loadbalancer")
    gw = find(docs, "Service", "wiregate-gateway-public")
    assert gw["spec"]["type"] == "LoadBalancer"
    assert gw["spec"]["selector"] == {"app.kubernetes.io/name": "wiregate-gateway"}
    relay = find(docs, "Service", "wiregate-relay-public")
    assert relay["spec"]["type"] == "LoadBalancer"
    assert relay["spec"]["externalTrafficPolicy"] == "Local"
    assert {(p["port"], p["protocol"]) for p in relay["spec"]["ports"]} == {
        (3478, "UDP"),
        (3479, "UDP"),
        (3480, "UDP"),
    }
    ports = {
        p["name"] for p in container(find(docs, "Deployment", "wiregate-relay"), "relay")["ports"]
    }
    assert {p["targetPort"] for p in relay["spec"]["ports"]} <= ports
