"""A rendered container, prepared to run on this host as the kubelet would start it.

:func:`prepare` takes one container of a rendered workload and gives back its
exact arguments and environment (``envFrom`` and ``env`` resolved from the
rendered ConfigMaps, ``$(VAR)`` expanded, downward-API fields and Secret values
faked) with every mounted volume materialised under a temporary root: ConfigMap
files as rendered, Secret items and the kubelet's own files (ServiceAccount
token, ``ca.crt``) as fakes, emptyDir, hostPath and PVC volumes as empty
directories. Every mount path in the environment and arguments is rewritten to
its directory under the root, every listening address to 127.0.0.1 with the
container's ports remapped to free ones, and every in-cluster Service address
the caller knows to where that Service's pods listen here.
"""

from __future__ import annotations

import base64
import datetime
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lab.manifests import Doc, container, find, pod_spec

__all__ = [
    "KUBELET_SA_DIR",
    "Prepared",
    "fake_ca_pem",
    "fake_secret",
    "free_port",
    "prepare",
    "service_address",
]

KUBELET_SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
FAKE_NODE = "node-a"
FAKE_POD_IP = "127.0.0.1"
FAKE_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJmYWtlIn0.ZmFrZQ"
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# HOST:PORT with HOST an IPv4 address or a DNS name (a Service's in-cluster name)
_HOSTPORT = re.compile(r"(?P<host>\d+\.\d+\.\d+\.\d+|[a-z0-9][a-z0-9.-]*[a-z0-9]):(?P<port>\d+)\b")
_WILDCARD_HOSTS = {"0.0.0.0", FAKE_POD_IP}

SecretValue = Callable[[str, str], str]


@dataclass
class Prepared:
    """How to start one container here: ``args`` after the image's entrypoint."""

    process: str  # args[0]: gateway, relay, agent
    args: list[str]
    env: dict[str, str]
    root: Path
    ports: dict[tuple[int, str], int] = field(default_factory=dict)  # (port, proto) -> here
    files: dict[str, Path] = field(default_factory=dict)  # mounted file (pod path) -> here
    named: dict[str, tuple[int, str]] = field(default_factory=dict)  # port name -> port, proto

    def port(self, container_port: int, protocol: str = "TCP") -> int:
        return self.ports[(container_port, protocol)]


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_udp_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def fake_secret(name: str, key: str, root: Path) -> str:
    """A stand-in for a Secret's value: a database URL (SQLite here), else a 32-byte key."""
    if key == "url":
        return f"sqlite+aiosqlite:///{root / 'fake-secret-db.sqlite'}"
    return base64.b64encode(bytes(range(32))).decode() + "\n"


def fake_ca_pem() -> bytes:
    """A self-signed CA certificate, as the kubelet's ``ca.crt`` stands in for the cluster's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def service_address(docs: list[Doc], name: str, port: int, pod: Prepared) -> str:
    """Where ``Service/name:port`` answers here: the remapped port of the pod behind it."""
    svc = find(docs, "Service", name)
    entry = next(p for p in svc["spec"]["ports"] if p["port"] == port)
    target = entry.get("targetPort", port)
    proto = entry.get("protocol", "TCP")
    if isinstance(target, str):
        target, proto = pod.named[target]
    return f"127.0.0.1:{pod.port(int(target), proto)}"


def _write(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def prepare(
    docs: list[Doc],
    workload: Doc,
    name: str,
    root: Path,
    *,
    secrets: SecretValue | None = None,
    services: Mapping[str, str] | None = None,
) -> Prepared:
    """``container name`` of ``workload`` ready to start under ``root`` (see the module doc).

    ``services`` maps an in-cluster ``HOST:PORT`` (``NAME.NAMESPACE.svc:PORT``) to the
    address it has here; any other in-cluster address left in the result fails.
    """
    spec = pod_spec(workload)
    c = container(workload, name)
    namespace = workload["metadata"].get("namespace", "default")
    secret = secrets or (lambda n, k: fake_secret(n, k, root))
    assert "command" not in c, "the image's entrypoint (wiregate) runs: no command override"
    assert c.get("args"), f"{name}: no args"

    mounts: dict[str, Path] = {}  # pod path -> here
    files: dict[str, Path] = {}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        assert "subPath" not in m, "subPath mounts are not modelled"
        here = root / m["mountPath"].lstrip("/")
        here.mkdir(parents=True, exist_ok=True)
        mounts[m["mountPath"]] = here
        for rel, data in _volume_files(docs, volumes[m["name"]], secret).items():
            _write(here / rel, data)
            files[f"{m['mountPath'].rstrip('/')}/{rel}"] = here / rel
    if _automount(docs, spec, namespace) and KUBELET_SA_DIR not in mounts:
        here = root / KUBELET_SA_DIR.lstrip("/")
        mounts[KUBELET_SA_DIR] = here
        for rel, data in {
            "token": FAKE_TOKEN,
            "ca.crt": fake_ca_pem(),
            "namespace": namespace,
        }.items():
            _write(here / rel, data, 0o644)
            files[f"{KUBELET_SA_DIR}/{rel}"] = here / rel

    env = _environment(docs, c, namespace, secret)
    ports = _remap_ports(c)
    named = {p["name"]: (p["containerPort"], p.get("protocol", "TCP")) for p in c.get("ports", [])}
    prepared = Prepared(c["args"][0], [], {}, root, ports, files, named)

    # one pass, longest first, whole path components only: /tmp is not /tmp/x's prefix
    # once rewritten, and /run/wiregate is not /run/wiregate-x
    paths = (
        re.compile(
            r"(?<![\w./-])("
            + "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
            + r")(?=/|$|[^\w.-])"
        )
        if mounts
        else None
    )

    def rewrite(key: str, value: str) -> str:
        if key == "WIREGATE_RELAY_PORTS":
            from wiregate.settings import parse_port_range

            return ",".join(str(p) for p in free_udp_ports(len(parse_port_range(value))))
        if paths is not None:
            value = paths.sub(lambda m: str(mounts[m[0]]), value)
        return _HOSTPORT.sub(lambda m: _address(m, ports, services or {}), value)

    prepared.env = {k: rewrite(k, v) for k, v in env.items()}
    prepared.args = [rewrite("", a) for a in c["args"]]
    return prepared


def _address(
    m: re.Match[str], ports: Mapping[tuple[int, str], int], services: Mapping[str, str]
) -> str:
    host, port = m["host"], int(m["port"])
    if host in _WILDCARD_HOSTS:
        for proto in ("TCP", "UDP"):
            if (port, proto) in ports:
                return f"127.0.0.1:{ports[(port, proto)]}"
        raise AssertionError(f"{m[0]}: listens on port {port}, which is not a container port")
    if m[0] in services:
        return services[m[0]]
    if ".svc" in host:
        raise AssertionError(f"{m[0]}: an in-cluster address this test does not serve")
    return m[0]


def _remap_ports(c: Doc) -> dict[tuple[int, str], int]:
    out: dict[tuple[int, str], int] = {}
    for p in c.get("ports", []):
        proto = p.get("protocol", "TCP")
        kind = socket.SOCK_DGRAM if proto == "UDP" else socket.SOCK_STREAM
        out[(int(p["containerPort"]), proto)] = free_port(kind)
    return out


def _automount(docs: list[Doc], spec: Doc, namespace: str) -> bool:
    if "automountServiceAccountToken" in spec:
        return bool(spec["automountServiceAccountToken"])
    sa_name = spec.get("serviceAccountName", "default")
    for d in docs:
        if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == sa_name:
            return bool(d.get("automountServiceAccountToken", True))
    return True


def _config_map(docs: list[Doc], name: str) -> dict[str, str]:
    return dict(find(docs, "ConfigMap", name).get("data", {}))


def _volume_files(docs: list[Doc], volume: Doc, secret: SecretValue) -> dict[str, str | bytes]:
    if "configMap" in volume:
        return _items(_config_map(docs, volume["configMap"]["name"]), volume["configMap"])
    if "secret" in volume:
        src = volume["secret"]
        assert src.get("items"), "a Secret volume lists its items (the keys it needs)"
        return {i["path"]: secret(src["secretName"], i["key"]) for i in src["items"]}
    if "projected" in volume:
        out: dict[str, str | bytes] = {}
        for s in volume["projected"]["sources"]:
            if "serviceAccountToken" in s:
                out[s["serviceAccountToken"]["path"]] = FAKE_TOKEN
            elif "configMap" in s:
                out.update(_items(_config_map(docs, s["configMap"]["name"]), s["configMap"]))
            elif "secret" in s:
                src = s["secret"]
                assert src.get("items"), "a projected Secret lists its items"
                out.update({i["path"]: secret(src["name"], i["key"]) for i in src["items"]})
            else:
                raise AssertionError(f"projected source not modelled: {sorted(s)}")
        return out
    assert any(k in volume for k in ("emptyDir", "hostPath", "persistentVolumeClaim")), volume
    return {}


def _items(data: dict[str, str], src: Doc) -> dict[str, str | bytes]:
    if not src.get("items"):
        return dict(data)
    return {i["path"]: data[i["key"]] for i in src["items"]}


def _environment(docs: list[Doc], c: Doc, namespace: str, secret: SecretValue) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        assert "configMapRef" in source, "envFrom: only ConfigMaps are modelled"
        prefix = source.get("prefix", "")
        for key, value in _config_map(docs, source["configMapRef"]["name"]).items():
            env[prefix + key] = value
    fields = {
        "spec.nodeName": FAKE_NODE,
        "status.podIP": FAKE_POD_IP,
        "metadata.namespace": namespace,
        "metadata.name": "pod-0",
    }
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = _expand(str(e["value"]), env)
            continue
        ref = e.get("valueFrom", {})
        if "fieldRef" in ref:
            env[e["name"]] = fields[ref["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in ref:
            env[e["name"]] = secret(ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
        elif "configMapKeyRef" in ref:
            r = ref["configMapKeyRef"]
            env[e["name"]] = _config_map(docs, r["name"])[r["key"]]
        elif "value" not in e and not ref:
            env[e["name"]] = ""
        else:
            raise AssertionError(f"env {e['name']}: source not modelled: {sorted(ref)}")
    return env


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)``: defined variables expand, others stay as written; ``$$`` is ``$``."""
    parts = value.split("$$")
    return "$".join(_VAR.sub(lambda m: env.get(m[1], m[0]), p) for p in parts)
