"""l4proxy: a sidecar traffic-shifting proxy for Kubernetes pods.

Istio-style weighted version routing (RouteRule, VirtualService,
DestinationRule, ServiceEntry, Ingress) from a mounted rule file, iptables
capture by ``l4proxy-init``, and a compiled splice for the bytes.
"""

__version__ = "0.1.0"
