"""A Kubernetes-like cluster in the lab: nodes, pods, Services, cluster DNS, the API.

Nothing here is a Kubernetes component, but each part does what its counterpart does
on a node, with the same kernel mechanisms:

* **CNI** (bridge plugin, host-gw routing): each node is a lab host (its InternalIP
  is its underlay address) with a bridge ``cni0`` holding ``10.244.N.1/24``; each
  pod is a namespace on a veth pair into that bridge, its default route via the
  bridge; every node routes the other nodes' pod CIDRs to their InternalIPs.
* **kube-proxy** (nftables mode): ``table ip kube-proxy`` on every node DNATs
  ``ClusterIP:port`` to a random endpoint pod, and masquerades hairpin connections
  and, with ``--cluster-cidr``, those from outside the cluster CIDR, by mark 0x4000,
  as kube-proxy's ``mark-for-masquerade`` / ``masquerading`` chains do.
* **cluster DNS**: Debian's ``dnsmasq`` in a pod behind the Service ``10.96.0.10``
  (UDP and TCP 53), authoritative for ``cluster.local``, answering
  ``NAME.NAMESPACE.svc.cluster.local`` with each Service's ClusterIP, and forwarding
  stub domains (CoreDNS's ``forward`` blocks) such as the mesh domain.
* **the API server**: :mod:`lab.kubeapi`'s stand-in (recorded responses) in the
  internet namespace, serving each Node and the NodeList, for the real
  ``kubernetes`` client in the agents, and taking Services and EndpointSlices in
  ``wiregate-peers`` (the gateway's peer-Services controller writes them there).
* **CoreDNS's kubernetes plugin**: a watcher lists those EndpointSlices from the
  API and hands each one's addresses to dnsmasq as
  ``SERVICE.wiregate-peers.svc.cluster.local`` (a hosts directory it rereads).

``python -m lab.cluster --listen H:P --token T --nodes FILE`` is that API process.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from lab.harness import (
    INTERNET_GATEWAY,
    WG_PORT,
    Agent,
    Host,
    Lab,
    Namespace,
    Process,
    Wiregate,
    add_bridge,
    poll,
    wiregate_command,
)
from lab.kubeapi import REQUESTS, kube_api_app, recorded, write_kubeconfig
from lab.podapi import PodStore, add_pod_routes, pod_document
from lab.tcp_listener import LISTENER

__all__ = [
    "CLUSTER_CIDR",
    "DNS_IP",
    "DOMAIN",
    "PEERS_NAMESPACE",
    "SERVICE_CIDR",
    "Cluster",
    "Service",
    "kube_proxy_ruleset",
    "tcp_exchange",
]

REPO = Path(__file__).resolve().parents[1]
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/12"
DNS_IP = "10.96.0.10"
DOMAIN = "cluster.local"
KUBE_API = f"{INTERNET_GATEWAY}:6443"
KUBE_TOKEN = "lab-cluster-token"
MASQ_MARK = 0x4000  # kube-proxy's
PEERS_NAMESPACE = "wiregate-peers"  # where the peer-Services controller writes

# Lists the EndpointSlices of a namespace every 0.5 s (argv: API URL, token, namespace,
# hosts directory) and writes "ADDRESS SERVICE.NAMESPACE.svc.cluster.local" lines there.
SLICES_TO_HOSTS = """\
import json, os, sys, time, urllib.request
api, token, namespace, hostsdir = sys.argv[1:5]
url = f"{api}/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
last = None
while True:
    try:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        items = json.load(urllib.request.urlopen(req, timeout=5))["items"]
        lines = sorted(
            f"{a} {s['metadata']['labels']['kubernetes.io/service-name']}.{namespace}"
            ".svc.cluster.local\\n"
            for s in items for e in s.get("endpoints") or [] for a in e.get("addresses") or []
        )
        if lines != last:
            with open(hostsdir + ".new", "w") as f:  # outside the directory dnsmasq reads
                f.writelines(lines)
            os.replace(hostsdir + ".new", os.path.join(hostsdir, "slices"))
            last = lines
            print("records", len(lines), flush=True)
    except Exception as exc:
        print("not listed:", exc, flush=True)
    time.sleep(0.5)
"""

# Connects, sends a line, prints what the server said ("hello") or why it failed.
CLIENT = """\
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
        print(s.recv(16).decode() or "closed")
except OSError as exc:
    print(type(exc).__name__)
"""


@dataclass(frozen=True)
class Service:
    """A ClusterIP Service: ``port`` on ``cluster_ip`` to ``target_port`` on each endpoint."""

    name: str
    namespace: str
    cluster_ip: str
    port: int
    endpoints: tuple[str, ...]
    target_port: int
    protocols: tuple[str, ...] = ("tcp",)

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{DOMAIN}"


@dataclass
class Node:
    """A cluster node: a lab host with a pod bridge."""

    host: Host
    index: int
    labels: dict[str, str]
    pods: dict[str, Namespace] = field(default_factory=dict)
    pod_ips: dict[str, str] = field(default_factory=dict)  # pod name -> its address
    # pod name -> its Pod document as the API serves it (namespace, account, labels)
    pod_docs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def bridge_ip(self) -> str:
        return f"10.244.{self.index}.1"


def kube_proxy_ruleset(services: list[Service], cluster_cidr: str | None = CLUSTER_CIDR) -> str:
    """kube-proxy's nftables shape for ``services`` (one table, replaced as a whole).

    ``cluster_cidr`` is kube-proxy's ``--cluster-cidr``: connections from outside it are
    masqueraded; None (kube-proxy without it) masquerades hairpin connections only.
    """
    mark = f"{MASQ_MARK:#x}"
    services_chain: list[str] = []
    chains: list[str] = []
    for i, svc in enumerate(services):
        for proto in svc.protocols:
            name = f"svc-{i}-{proto}"
            services_chain.append(f"ip daddr {svc.cluster_ip} {proto} dport {svc.port} goto {name}")
            eps = [f"ep-{i}-{j}-{proto}" for j in range(len(svc.endpoints))]
            vmap = ", ".join(f"{j} : goto {ep}" for j, ep in enumerate(eps))
            off_cluster = (
                f"    ip saddr != {cluster_cidr} jump mark-for-masquerade\n" if cluster_cidr else ""
            )
            chains.append(
                f"  chain {name} {{\n{off_cluster}"
                f"    numgen random mod {len(eps)} vmap {{ {vmap} }}\n  }}"
            )
            for ep, addr in zip(eps, svc.endpoints, strict=True):
                chains.append(
                    f"  chain {ep} {{\n"
                    f"    ip saddr {addr} jump mark-for-masquerade\n"
                    f"    meta l4proto {proto} dnat to {addr}:{svc.target_port}\n  }}"
                )
    body = "\n".join(
        [
            "table ip kube-proxy {",
            f"  chain mark-for-masquerade {{\n    meta mark set meta mark or {mark}\n  }}",
            "  chain masquerading {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    meta mark & {mark} == 0 return",
            f"    meta mark set meta mark xor {mark}",
            "    masquerade fully-random",
            "  }",
            "  chain nat-prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            "    jump services",
            "  }",
            "  chain nat-output {",
            "    type nat hook output priority -100; policy accept;",
            "    jump services",
            "  }",
            "  chain services {",
            *(f"    {rule}" for rule in services_chain),
            "  }",
            *chains,
            "}",
        ]
    )
    return f"table ip kube-proxy\ndelete table ip kube-proxy\n{body}\n"


def tcp_exchange(host: Namespace, addr: str, port: int) -> str:
    """Connect from ``host`` to ``addr:port``: what the server said, or the error's name."""
    cmd = [sys.executable, "-c", CLIENT, addr, str(port)]
    return host.run(cmd, timeout=20).stdout.strip()


def node_document(node: Node) -> dict[str, object]:
    """The recorded kind Node, renamed, labelled and readdressed for ``node``."""
    doc = json.loads(recorded("node-kind-worker.json"))
    doc["metadata"]["name"] = node.host.name
    doc["metadata"].setdefault("labels", {}).update(node.labels)
    doc["spec"]["podCIDR"], doc["spec"]["podCIDRs"] = node.pod_cidr, [node.pod_cidr]
    doc["status"]["addresses"] = [{"type": "InternalIP", "address": node.host.addr},
                                  {"type": "Hostname", "address": node.host.name}]  # fmt: skip
    return dict(doc)


class Cluster:
    """Nodes with pods, Services through kube-proxy rules, a DNS Service and the API."""

    def __init__(self, lab: Lab, cluster_cidr: str | None = CLUSTER_CIDR) -> None:
        """``cluster_cidr``: kube-proxy's ``--cluster-cidr`` (see :func:`kube_proxy_ruleset`)."""
        self.lab = lab
        self.cluster_cidr = cluster_cidr
        self.nodes: dict[str, Node] = {}
        self.services: list[Service] = []
        self.api: Process | None = None
        self.kubeconfig = lab.workdir / "kubeconfig-cluster"

    # -- topology

    def add_node(self, name: str, labels: dict[str, str] | None = None) -> Node:
        host = self.lab.add_host(name)
        node = Node(host, len(self.nodes) + 1, dict(labels or {}))
        self.nodes[name] = node
        add_bridge(host, "cni0")
        host.run(["ip", "addr", "add", f"{node.bridge_ip}/24", "dev", "cni0"])
        host.run(["ip", "link", "set", "cni0", "up"])
        host.sysctl("net.ipv4.ip_forward", "1")
        return node

    def add_pod(
        self,
        node: Node,
        name: str,
        host_octet: int,
        *,
        namespace: str = "default",
        account: str = "default",
        labels: dict[str, str] | None = None,
    ) -> tuple[Namespace, str]:
        """A pod namespace on ``node``'s bridge at ``10.244.N.host_octet``, served by the
        API as Pod ``namespace/name`` of ``account`` with ``labels`` (default app=lab)."""
        pod = Namespace(self.lab, name)
        self.lab._add_namespace(pod)
        veth = f"veth{len(node.pods)}"
        node.host.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                       "netns", pod.netns])  # fmt: skip
        node.host.run(["ip", "link", "set", veth, "master", "cni0", "up"])
        addr = f"10.244.{node.index}.{host_octet}"
        pod.run(["ip", "addr", "add", f"{addr}/24", "dev", "eth0"])
        pod.run(["ip", "link", "set", "eth0", "up"])
        pod.run(["ip", "route", "add", "default", "via", node.bridge_ip])
        node.pods[name] = pod
        node.pod_ips[name] = addr
        node.pod_docs[name] = pod_document(
            namespace, re.sub(r"[^a-z0-9-]", "-", name.lower()), addr, account,
            node=node.host.name, labels={"app": "lab"} if labels is None else labels,
        )  # fmt: skip
        return pod, addr

    def put_pod(self, node: Node, name: str, *, labels: dict[str, str]) -> None:
        """Relabel pod ``name`` of ``node`` at the API (a watch event for its agent)."""
        doc = node.pod_docs[name]
        doc["metadata"]["labels"] = labels
        self.put_document(doc)

    def put_document(self, doc: dict[str, Any]) -> None:
        """Create or replace the Pod ``doc`` at the API (PUT, as ``kubectl replace``)."""
        meta = doc["metadata"]
        self._api_call("PUT", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", doc)

    def _api_call(self, method: str, path: str, doc: dict[str, Any]) -> None:
        script = (
            "import sys, urllib.request; r = urllib.request.Request(sys.argv[1], "
            "data=sys.stdin.buffer.read(), method=sys.argv[2], "
            "headers={'Content-Type': 'application/json'}); urllib.request.urlopen(r, timeout=5)"
        )
        self.lab.internet.run(
            [sys.executable, "-c", script, f"http://{KUBE_API}{path}", method],
            input=json.dumps(doc),
        )

    def add_service(self, service: Service) -> Service:
        self.services.append(service)
        return service

    def serve_tcp(self, pod: Namespace, port: int) -> Process:
        """A workload in ``pod`` answering ``hello`` on ``port``."""
        proc = pod.spawn([sys.executable, "-c", LISTENER, str(port)], name=f"{pod.name}-tcp")
        poll(lambda: "listening" in proc.output(), timeout=20, what=f"{pod.name} listening")
        return proc

    # -- the cluster's own machinery

    def start(self) -> None:
        """Routes between nodes, kube-proxy rules on each, the DNS pod and the API."""
        for node in self.nodes.values():
            for other in self.nodes.values():
                if other is not node:
                    node.host.run(["ip", "route", "add", other.pod_cidr, "via", other.host.addr])
            node.host.run(
                ["nft", "-f", "-"], input=kube_proxy_ruleset(self.services, self.cluster_cidr)
            )
        self._start_api()

    def start_dns(self, node: Node, stubs: dict[str, str] | None = None) -> Service:
        """``dnsmasq`` in a pod on ``node``, behind the Service ``DNS_IP`` (call before start).

        ``stubs``: domain -> nameserver address, forwarded there as CoreDNS's stub domains
        are (``wg.internal`` -> the wiregate-dns Service, deploy/kubernetes/README.md).
        """
        pod, addr = self.add_pod(node, f"dns{node.index}", 53)
        records = [f"--host-record={s.fqdn},{s.cluster_ip}" for s in self.services]
        records += [f"--server=/{domain}/{server}" for domain, server in (stubs or {}).items()]
        hostsdir = self.lab.workdir / "cluster-dns-hosts"
        hostsdir.mkdir(exist_ok=True)
        records.append(f"--hostsdir={hostsdir}")
        self.lab.internet.spawn(
            [sys.executable, "-c", SLICES_TO_HOSTS, f"http://{KUBE_API}", KUBE_TOKEN,
             PEERS_NAMESPACE, str(hostsdir)],
            name="endpointslices-to-dns",
        )  # fmt: skip
        proc = pod.spawn(
            ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
             "--bind-interfaces", f"--listen-address={addr}", "--port=53", "--user=root",
             "--pid-file", f"--local=/{DOMAIN}/", "--log-facility=-", "--log-queries",
             *records],
            name=f"dnsmasq-{node.host.name}",
        )  # fmt: skip
        poll(lambda: "started, version" in proc.output(), timeout=20, what="dnsmasq")
        return self.add_service(
            Service("kube-dns", "kube-system", DNS_IP, 53, (addr,), 53, ("udp", "tcp"))
        )

    def _start_api(self) -> None:
        nodes = self.lab.workdir / "nodes.json"
        nodes.write_text(json.dumps({n: node_document(v) for n, v in self.nodes.items()}))
        pods = self.lab.workdir / "pods.json"
        pods.write_text(
            json.dumps([doc for node in self.nodes.values() for doc in node.pod_docs.values()])
        )
        self.api = self.lab.internet.spawn(
            [sys.executable, "-m", "lab.cluster", "--listen", KUBE_API, "--token", KUBE_TOKEN,
             "--nodes", str(nodes), "--pods", str(pods)],
            env={"PYTHONPATH": str(REPO)}, name="kubeapi",
        )  # fmt: skip
        api = self.api
        poll(lambda: "Running on" in api.output(), timeout=30, what="the Kubernetes API stand-in")
        write_kubeconfig(self.kubeconfig, f"http://{KUBE_API}", KUBE_TOKEN)

    def start_agent(
        self, gateway: Wiregate, node: Node, key_file: Path, env: dict[str, str] | None = None
    ) -> Agent:
        """``wiregate agent`` on ``node`` with ``kubernetes = true`` (and ``env`` settings)."""
        host = node.host
        agent = Agent(host, self.lab.workdir / "agents" / host.name, key_file)
        gateway.agents[host.name] = agent
        agent.proc = host.spawn(
            [*wiregate_command(), "agent", "--server", gateway.server,
             "--auth-key", f"file:{key_file}", "--interface", agent.iface,
             "--hostname", host.name, "--state-dir", str(agent.state_dir),
             "--run-dir", str(agent.run_dir), "--listen-port", str(WG_PORT),
             "--log-format", "json"],
            env={"WIREGATE_KUBERNETES": "true", "NODE_NAME": host.name,
                 "WIREGATE_KUBECONFIG": str(self.kubeconfig), **(env or {})},
            name=f"agent-{host.name}",
        )  # fmt: skip
        return agent


# --------------------------------------------------------------------------- the API process


def cluster_api_app(
    nodes: dict[str, bytes], *, token: str, pods: list[dict[str, Any]] | None = None
) -> web.Application:
    """:func:`lab.kubeapi.kube_api_app` (Services and EndpointSlices in
    :data:`PEERS_NAMESPACE`) plus ``GET /api/v1/nodes`` (the NodeList) and the ``pods``
    of the nodes (:mod:`lab.podapi`: the list and the watch)."""
    app = kube_api_app(nodes, token=token, namespaces=[PEERS_NAMESPACE])
    store = PodStore()
    for doc in pods or ():
        store.put(doc)
    add_pod_routes(app, store)

    async def list_nodes(request: web.Request) -> web.Response:
        app[REQUESTS].append({"path": request.path, "headers": dict(request.headers)})
        if request.headers.get("Authorization") != f"Bearer {token}":
            return web.json_response(json.loads(recorded("status-401.json")), status=401)
        items = [json.loads(doc) for doc in nodes.values()]
        body = {"kind": "NodeList", "apiVersion": "v1",
                "metadata": {"resourceVersion": "1"}, "items": items}  # fmt: skip
        return web.json_response(body)

    app.router.add_get("/api/v1/nodes", list_nodes)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--token", required=True)
    parser.add_argument("--nodes", required=True, type=Path, help="JSON file: {name: Node}")
    parser.add_argument("--pods", type=Path, help="JSON file: [Pod, ...]")
    args = parser.parse_args()
    documents = json.loads(args.nodes.read_text())
    nodes = {name: json.dumps(doc).encode() for name, doc in documents.items()}
    host, _, port = args.listen.rpartition(":")
    pods = json.loads(args.pods.read_text()) if args.pods else []
    app = cluster_api_app(nodes, token=args.token, pods=pods)
    web.run_app(app, host=str(ipaddress.ip_address(host)), port=int(port), print=print)


if __name__ == "__main__":
    main()
