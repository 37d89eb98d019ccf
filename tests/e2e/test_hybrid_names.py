"""End to end: names both ways between a cluster and a VM (lab/hybriddemo.py).

A pod resolves the VM's mesh name through the cluster DNS (dnsmasq standing in for
CoreDNS, with ``wg.internal`` as a stub domain toward the ``wiregate-dns`` Service,
whose endpoint is the node agent on the node's InternalIP) and completes a TCP
exchange with the VM by that name; the VM resolves a cluster Service's name through
its agent (split DNS over the tunnel) and completes one with the Service. The
gateway's peer-Services controller writes the VM's Service and EndpointSlices to the
cluster's API stand-in, a watcher hands the slices to the cluster DNS (as CoreDNS's
kubernetes plugin would), and the pod calls the VM by that Service name too.
"""

from __future__ import annotations

import pytest

from lab.cluster import DNS_IP
from lab.harness import Lab
from lab.hybriddemo import (
    MESH_DOMAIN,
    ORDERS,
    PEER_SERVICE,
    PORT,
    VM_NAME,
    call_by_name,
    calls,
    hybrid,
)

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]


def test_a_pod_calls_the_vm_by_name_and_the_vm_a_service_by_name(lab: Lab) -> None:
    with hybrid(lab) as hl:
        vm_name = f"{VM_NAME}.{MESH_DOMAIN}"
        # the pod: its resolver (the cluster DNS) asks the node agent for the mesh domain
        assert calls(hl.client, vm_name, PORT) == (hl.vm_addr, "hello")
        asked = ["dig", f"@{DNS_IP}", vm_name, "+short", "+time=2", "+tries=2"]
        assert hl.client.run(asked, timeout=20).stdout.strip() == hl.vm_addr
        # a name the node's map does not hold: NXDOMAIN through the stub, not a timeout
        missing = hl.client.run(["dig", f"@{DNS_IP}", f"nobody.{MESH_DOMAIN}", "+time=2"],
                                timeout=20).stdout  # fmt: skip
        assert "status: NXDOMAIN" in missing, missing
        # the VM: its agent forwards cluster.local over the tunnel to the cluster DNS
        assert calls(hl.vm_host, ORDERS.fqdn, ORDERS.port) == (ORDERS.cluster_ip, "hello")
        # only the node's pods (and the node) may ask the node agent on its InternalIP
        node_ip = hl.node.host.addr
        probe = ["dig", f"@{node_ip}", vm_name, "+short", "+time=1", "+tries=1"]
        assert hl.node.host.run(probe, timeout=20).stdout.strip() == hl.vm_addr
        refused = hl.vm_host.run(probe, check=False, timeout=20).stdout
        assert hl.vm_addr not in refused, refused
        status = hl.gateway.status(hl.node_agent)["dns"]
        assert f"{node_ip}:53" in status["listen"] and status["refused_source"] >= 1
        # the peer-Services controller's name for the VM (written after the rename)
        assert calls(hl.client, PEER_SERVICE, PORT) == (hl.vm_addr, "hello")
        assert call_by_name(hl.client, vm_name, PORT) == (hl.vm_addr, "hello")
