"""The gateway's Kubernetes side: peer Services, so that pods reach devices by name.

:mod:`gateway.cluster.peers` is the pure core (devices in, Services and
EndpointSlices out, a diff against what the API holds), :mod:`gateway.cluster.kubeclient`
the thin client layer, and :mod:`gateway.cluster.runner` the lease-holding loop the
gateway runs when ``peer_services`` is on.
"""

from __future__ import annotations

from gateway.cluster.runner import PEER_SERVICES, PeerServices, peer_services_ctx

__all__ = ["PEER_SERVICES", "PeerServices", "peer_services_ctx"]
