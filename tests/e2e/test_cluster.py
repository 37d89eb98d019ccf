"""End to end: a VM reaches cluster Services and every node's pods through a gateway node.

The lab cluster (lab/cluster.py): nodes with pods behind a bridge, kube-proxy's
nftables DNAT for Service IPs on every node, dnsmasq as the cluster DNS behind
10.96.0.10, and the recorded-response API stand-in answering the real ``kubernetes``
client in the agents. The gateway's policy approves pod and Service CIDRs for
``tag:node`` only, as any route.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lab.cluster import DNS_IP, SERVICE_CIDR, Cluster, Service, tcp_exchange
from lab.harness import Host, Lab, Wiregate, poll

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]

POLICY = """\
acls:
  - {src: ["tag:node"], dst: ["tag:node"]}
  - {src: ["tag:vm"], dst: ["tag:node"]}
routes:
  - tags: ["tag:node"]
    allow: ["10.244.0.0/16", "10.96.0.0/12"]
"""
ORDERS = Service("orders", "shop", "10.96.12.34", 8080, ("10.244.2.20",), 8080)


@pytest.fixture
def gateway(lab: Lab, tmp_path: Path) -> Wiregate:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    wiregate = Wiregate(lab)
    wiregate.gateway_env["WIREGATE_POLICY_FILE"] = str(policy)
    # split DNS: the agents forward the cluster's zone to the cluster DNS Service
    wiregate.gateway_env["WIREGATE_DNS_ZONES"] = f'{{"cluster.local": ["{DNS_IP}"]}}'
    wiregate.start_gateway()
    return wiregate


def table(host: Host) -> str:
    return host.run(["ip", "route", "show", "table", "51820"]).stdout


def resolve(host: Host, name: str, *flags: str, server: str = DNS_IP) -> str:
    cmd = ["dig", f"@{server}", name, "+short", "+time=2", "+tries=2", *flags]
    return host.run(cmd, check=False, timeout=20).stdout.strip()


def test_a_vm_reaches_services_and_every_nodes_pods_through_a_gateway_node(
    lab: Lab, gateway: Wiregate
) -> None:
    cluster = Cluster(lab)
    gw_node = cluster.add_node("n1", labels={"wiregate.io/gateway": "true"})
    plain = cluster.add_node("n2")  # no agent: reached onward through n1
    orders_pod, orders_ip = cluster.add_pod(plain, "orders", 20)
    cluster.add_service(ORDERS)
    cluster.start_dns(gw_node)
    cluster.start()
    cluster.serve_tcp(orders_pod, 8080)
    vm_host = lab.add_host("vm")

    node_key = gateway.create_key(tags="tag:node")
    vm_key = gateway.create_key(tags="tag:vm")
    node = cluster.start_agent(gateway, gw_node, node_key, {
        "WIREGATE_KUBE_GATEWAY": "true", "WIREGATE_KUBE_SERVICE_CIDRS": f'["{SERVICE_CIDR}"]',
    })  # fmt: skip
    vm = gateway.start_agent(vm_host, vm_key)
    statuses = gateway.wait_mesh([node, vm], timeout=60)

    # n1 carries its own pods, n2's (learned from the NodeList) and the Service CIDR
    (peer,) = statuses["vm"]["peers"]
    assert peer["name"] == "n1"
    vm_routes = table(vm_host)
    for cidr in ("10.244.1.0/24", "10.244.2.0/24", SERVICE_CIDR):
        assert f"{cidr} dev {vm.iface}" in vm_routes, vm_routes
    assert "10.244" not in vm_host.run(["ip", "route", "show", "table", "main"]).stdout
    # the tunnel address pool is one route, not a host route per peer address
    pooled = [r for r in vm_routes.splitlines() if r.startswith("100.64.")]
    assert len(pooled) == 1 and pooled[0].startswith(f"100.64.0.0/16 dev {vm.iface}"), vm_routes

    # a Service by its ClusterIP: n1's kube-proxy rules send it to the pod on n2
    said = poll(lambda: tcp_exchange(vm_host, ORDERS.cluster_ip, 8080) == "hello" or None,
                timeout=30, what="VM -> orders ClusterIP")  # fmt: skip
    assert said
    # a pod on the node without an agent, by its pod IP
    assert tcp_exchange(vm_host, orders_ip, 8080) == "hello"
    # the cluster DNS, itself a Service, answers through the tunnel (UDP and TCP)
    assert resolve(vm_host, ORDERS.fqdn) == ORDERS.cluster_ip
    assert resolve(vm_host, ORDERS.fqdn, "+tcp") == ORDERS.cluster_ip
    assert resolve(vm_host, "missing.shop.svc.cluster.local") == ""
    # by name, as the VM's resolver asks: its own agent forwards cluster.local over the tunnel
    vm_tunnel = statuses["vm"]["device"]["addresses"][0].split("/")[0]
    by_name = resolve(vm_host, ORDERS.fqdn, server=vm_tunnel)
    assert by_name == ORDERS.cluster_ip
    assert tcp_exchange(vm_host, by_name, ORDERS.port) == "hello"
    # both went through WireGuard: no cluster address on the VM's underlay routes
    transfer = vm_host.run(["wg", "show", vm.iface, "transfer"]).stdout.split()
    assert int(transfer[1]) > 0 and int(transfer[2]) > 0

    # n1 reports its own pod (the DNS pod) on its map stream, and only its own
    pods = poll(lambda: (gateway.status(node).get("pods") or {}).get("messages") or None,
                timeout=30, what="n1's pods reported")  # fmt: skip
    assert pods and gateway.status(node)["pods"]["reported"] == 1

    # the pod on n2 saw n1, not the VM: the reply had to come back through n1
    conntrack = plain.host.run(["conntrack", "-L", "-p", "tcp", "--dport", "8080"]).stdout
    assert f"src={gw_node.host.addr} dst={orders_ip}" in conntrack, conntrack
    assert vm_tunnel not in conntrack


def service_carrier(vm_host: Host, iface: str, statuses: dict[str, Any]) -> str | None:
    """The name of the VM's peer whose allowed IPs hold the Service CIDR."""
    names = {p["public_key"]: p["name"] for p in statuses["vm"]["peers"]}
    for line in vm_host.run(["wg", "show", iface, "allowed-ips"]).stdout.splitlines():
        key, *allowed = line.split()
        if SERVICE_CIDR in allowed:
            return names.get(key)
    return None


def test_every_node_offers_the_service_cidr_one_carries_it_the_next_takes_over(
    lab: Lab, gateway: Wiregate
) -> None:
    """Mesh mode: the Service CIDR from every node; the VM's Service traffic enters at the
    carrier, whose kube-proxy sends it through the tunnel to the pod on the other node.
    This kube-proxy has no ``--cluster-cidr``: the agent's own masquerade brings the
    reply back through the carrier."""
    cluster = Cluster(lab, cluster_cidr=None)
    first, second = cluster.add_node("n1"), cluster.add_node("n2")
    orders_pod, orders_ip = cluster.add_pod(second, "orders", 20)
    cluster.add_service(ORDERS)
    cluster.start()
    cluster.serve_tcp(orders_pod, 8080)
    vm_host = lab.add_host("vm")
    node_key, vm_key = gateway.create_key(tags="tag:node"), gateway.create_key(tags="tag:vm")
    env = {"WIREGATE_KUBE_SERVICE_CIDRS": f'["{SERVICE_CIDR}"]'}
    n1 = cluster.start_agent(gateway, first, node_key, env)
    vm = gateway.start_agent(vm_host, vm_key)
    poll(lambda: "n1" in {d["name"] for d in gateway.devices()} or None, timeout=30,
         what="n1 enrolled first")  # fmt: skip
    n2 = cluster.start_agent(gateway, second, node_key, env)  # the same prefix: enrolled too
    statuses = gateway.wait_mesh([n1, n2, vm], timeout=60)
    assert service_carrier(vm_host, vm.iface, statuses) == "n1"  # the first placed carries it

    said = poll(lambda: tcp_exchange(vm_host, ORDERS.cluster_ip, 8080) == "hello" or None,
                timeout=30, what="VM -> orders ClusterIP through n1")  # fmt: skip
    assert said
    # n1 sent it to n2 through the tunnel, from its own tunnel address (the agent's
    # masquerade of what came from the tunnel and was translated): the reply returns via n1
    n1_tunnel = statuses["n1"]["device"]["addresses"][0].split("/")[0]
    conntrack = second.host.run(["conntrack", "-L", "-p", "tcp", "--dport", "8080"]).stdout
    assert f"src={n1_tunnel} dst={orders_ip}" in conntrack, conntrack

    # n1 leaves: n2, standing by, carries the Service CIDR and translates it itself
    n1_id = statuses["n1"]["device"]["id"]
    assert n1.proc is not None
    n1.proc.stop()
    gateway.admin("devices", "remove", n1_id)
    poll(lambda: service_carrier(vm_host, vm.iface, gateway.statuses([vm, n2])) == "n2" or None,
         timeout=30, what="n2 to carry the Service CIDR")  # fmt: skip
    said = poll(lambda: tcp_exchange(vm_host, ORDERS.cluster_ip, 8080) == "hello" or None,
                timeout=30, what="VM -> orders ClusterIP through n2")  # fmt: skip
    assert said
