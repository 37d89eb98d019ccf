"""Names both ways in the lab: a VM calls a cluster Service by name, a pod calls the VM by name.

:func:`hybrid` builds a gateway node (lab/cluster.py) with two pods, ``orders``
(behind the Service ``orders.shop.svc.cluster.local``) and ``client``, the cluster
DNS (dnsmasq as CoreDNS's stand-in, with the mesh domain as a stub domain toward
the ``wiregate-dns`` Service), and a VM named ``vm-db`` listening on tcp:5432.

* The VM's resolver is its agent (the ``resolv.conf`` mode on the VM's own file),
  which forwards ``cluster.local`` over the tunnel to the cluster DNS Service.
* The pod's resolver is the cluster DNS (a kubelet-style resolv.conf), which
  forwards ``wg.internal`` to ``wiregate-dns``: a Service whose endpoint on each
  node is that node's InternalIP:53, where the node agent also listens
  (``dns_listen``) and answers its node's pod CIDR (``dns_allow_pods``). Kubernetes
  would pick the endpoint on the asker's node (``internalTrafficPolicy: Local``);
  this lab's one node makes its endpoint the only one.

* The gateway's peer-Services controller writes a Service and EndpointSlices for the
  VM to the cluster's API; the cluster DNS learns them from there, so a pod also
  calls the VM as ``vm-db.wiregate-peers.svc.cluster.local``.

Each call is :func:`call_by_name` (glibc's ``getaddrinfo``, then a TCP exchange).
Used by ``tests/e2e/test_hybrid_names.py`` and ``scripts/demo.py``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from lab.cluster import DNS_IP, PEERS_NAMESPACE, SERVICE_CIDR, Cluster, Node, Service
from lab.harness import Agent, Host, Lab, Namespace, Wiregate, poll
from lab.tcp_listener import LISTENER

__all__ = [
    "MESH_DOMAIN",
    "ORDERS",
    "PEER_SERVICE",
    "POLICY",
    "PORT",
    "VM_NAME",
    "HybridLab",
    "call_by_name",
    "calls",
    "hybrid",
]

POLICY = """\
acls:
  - {src: ["tag:node"], dst: ["tag:node"]}
  - {src: ["tag:vm"], dst: ["tag:node"]}
  - src: [{pods: {namespace: shop, labels: {app: client}}}]
    dst: ["tag:vm"]
    ports: ["tcp:5432"]
routes:
  - tags: ["tag:node"]
    allow: ["10.244.0.0/16", "10.96.0.0/12"]
"""
MESH_DOMAIN = "wg.internal"
VM_NAME = "vm-db"
PORT = 5432
PEER_SERVICE = f"{VM_NAME}.{PEERS_NAMESPACE}.svc.cluster.local"  # the controller's Service
ORDERS = Service("orders", "shop", "10.96.12.34", 8080, ("10.244.1.20",), 8080)
WIREGATE_DNS_IP = "10.96.0.53"
# what kubelet writes into a pod of namespace shop (ClusterFirst)
POD_RESOLV_CONF = f"""\
search shop.svc.cluster.local svc.cluster.local cluster.local
nameserver {DNS_IP}
options ndots:5
"""
VM_RESOLV_CONF = "nameserver 192.0.2.53\n"  # the VM's original: its agent goes first

# Resolves argv[1] with getaddrinfo (the namespace's resolv.conf), connects to argv[2]:
# prints "ADDRESS SAID" ("-" and the error's name when the name did not resolve).
CALLER = """\
import socket, sys
name, port = sys.argv[1], int(sys.argv[2])
try:
    addr = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
except OSError as exc:
    print("-", type(exc).__name__)
    sys.exit()
try:
    with socket.create_connection((addr, port), timeout=3) as s:
        print(addr, s.recv(16).decode() or "closed")
except OSError as exc:
    print(addr, type(exc).__name__)
"""


@dataclass
class HybridLab:
    """The scenario's parts, once every agent holds the map."""

    gateway: Wiregate
    cluster: Cluster
    node: Node
    node_agent: Agent
    client: Namespace  # the pod calling the VM
    vm_host: Host
    vm: Agent
    vm_addr: str  # the VM's tunnel address


def call_by_name(ns: Namespace, name: str, port: int) -> tuple[str, str]:
    """From ``ns``, resolve ``name`` as its programs do and connect: (address, what was said)."""
    out = ns.run([sys.executable, "-c", CALLER, name, str(port)], timeout=30).stdout.split()
    return (out[0], out[1]) if len(out) == 2 else ("-", " ".join(out))


def calls(ns: Namespace, name: str, port: int, timeout: float = 30.0) -> tuple[str, str]:
    """:func:`call_by_name` until the server says ``hello`` (or ``timeout``: the last try)."""
    last: list[tuple[str, str]] = []

    def attempt() -> bool:
        last[:] = [call_by_name(ns, name, port)]
        return last[0][1] == "hello"

    with suppress(TimeoutError):  # the last attempt says what went wrong
        poll(attempt, timeout=timeout, what=f"{ns.name} -> {name}:{port}")
    return last[0]


def _resolv_conf(ns: Namespace, text: str, written: list[Path]) -> None:
    path = Path("/etc/netns") / ns.netns / "resolv.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    written.append(path)
    path.write_text(text)


@contextmanager
def hybrid(lab: Lab) -> Iterator[HybridLab]:
    """The scenario, built in ``lab``; the namespaces' resolv.conf files go at exit."""
    written: list[Path] = []
    try:
        yield _build(lab, written)
    finally:
        for path in written:
            shutil.rmtree(path.parent, ignore_errors=True)


def _build(lab: Lab, written: list[Path]) -> HybridLab:
    cluster = Cluster(lab)
    node = cluster.add_node("n1", labels={"wiregate.io/gateway": "true"})
    orders_pod, _ = cluster.add_pod(node, "orders", 20, namespace="shop")
    client, _ = cluster.add_pod(node, "client", 21, namespace="shop", labels={"app": "client"})
    _resolv_conf(client, POD_RESOLV_CONF, written)
    cluster.add_service(ORDERS)
    # deploy/kubernetes/components/dns: the node agent's names, behind a Service
    cluster.add_service(Service("wiregate-dns", "wiregate", WIREGATE_DNS_IP, 53,
                                (node.host.addr,), 53, ("udp", "tcp")))  # fmt: skip
    cluster.start_dns(node, stubs={MESH_DOMAIN: WIREGATE_DNS_IP})
    cluster.start()
    cluster.serve_tcp(orders_pod, ORDERS.port)
    policy = lab.workdir / "hybrid-policy.yaml"
    policy.write_text(POLICY)
    gateway = Wiregate(lab)
    gateway.gateway_env.update({
        "WIREGATE_POLICY_FILE": str(policy),
        "WIREGATE_DNS_ZONES": f'{{"cluster.local": ["{DNS_IP}"]}}',
        # the peer-Services controller, writing to the cluster's API (PEERS_NAMESPACE)
        "WIREGATE_PEER_SERVICES": "true", "WIREGATE_PEER_SERVICES_TAG": "tag:vm",
        "WIREGATE_PEER_SERVICES_KUBECONFIG": str(cluster.kubeconfig),
    })  # fmt: skip
    gateway.start_gateway()
    vm_host = lab.add_host("vmdb")
    _resolv_conf(vm_host, VM_RESOLV_CONF, written)
    vm_host.spawn([sys.executable, "-c", LISTENER, str(PORT)], name="vm-db")
    node_agent = cluster.start_agent(gateway, node, gateway.create_key(tags="tag:node"), {
        "WIREGATE_KUBE_GATEWAY": "true", "WIREGATE_KUBE_SERVICE_CIDRS": f'["{SERVICE_CIDR}"]',
        "WIREGATE_DNS_LISTEN": f'["{node.host.addr}"]',
        "WIREGATE_DNS_ALLOW_PODS": "true",  # the Node's podCIDR, 10.244.1.0/24
    })  # fmt: skip
    vm = gateway.start_agent(vm_host, gateway.create_key(tags="tag:vm"))
    statuses = gateway.wait_mesh([node_agent, vm], timeout=60)
    gateway.admin("devices", "rename", statuses["vmdb"]["device"]["id"], VM_NAME)
    vm_addr = statuses["vmdb"]["device"]["addresses"][0].split("/")[0]
    return HybridLab(gateway, cluster, node, node_agent, client, vm_host, vm, vm_addr)
