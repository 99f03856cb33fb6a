"""The rule files l4proxy runs with in the bench: bootcamp v1/v2 behind a 50/50 RouteRule.

The same three documents a user of the tutorial writes: a ServiceEntry (the
registry: VIP 198.19.0.10:8080, one endpoint per version, each on its own
port, named by the service port's name as in Istio), an Ingress for the
gateway listener, and the seed's RouteRule format with weights 50/50.
"""

from __future__ import annotations

import os

import yaml

from bench.peers import Backend

SERVICE = "bootcamp"
HOST = "bootcamp.default.svc.cluster.local"
VIP = "198.19.0.10"
SERVICE_PORT = 8080


def service_entry(backends: list[Backend]) -> dict[str, object]:
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "ServiceEntry",
        "metadata": {"name": SERVICE},
        "spec": {
            "hosts": [HOST],
            "addresses": [VIP],
            "ports": [{"number": SERVICE_PORT, "name": "http", "protocol": "HTTP"}],
            "resolution": "STATIC",
            "endpoints": [
                {"address": b.host, "ports": {"http": b.port}, "labels": {"version": b.version}}
                for b in backends
            ],
        },
    }


def ingress() -> dict[str, object]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": SERVICE},
        "spec": {
            "rules": [
                {
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {
                                    "service": {"name": SERVICE, "port": {"number": SERVICE_PORT}}
                                },
                            }
                        ]
                    }
                }
            ]
        },
    }


def route_rule(weights: dict[str, int]) -> dict[str, object]:
    return {
        "apiVersion": "config.istio.io/v1alpha2",
        "kind": "RouteRule",
        "metadata": {"name": f"{SERVICE}-default"},
        "spec": {
            "destination": {"name": SERVICE},
            "precedence": 1,
            "route": [{"labels": {"version": v}, "weight": w} for v, w in weights.items()],
        },
    }


def bootcamp_documents(backends: list[Backend]) -> str:
    """Multi-document YAML: ServiceEntry, Ingress, RouteRule 50/50."""
    weights = {b.version: 100 // len(backends) for b in backends}
    docs = [service_entry(backends), ingress(), route_rule(weights)]
    return yaml.safe_dump_all(docs, sort_keys=False)


def write_rules(directory: str, backends: list[Backend]) -> str:
    """Write the rule directory (a ConfigMap mount's shape) readable by uid 1337."""
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "bootcamp.yaml")
    with open(path, "w") as f:
        f.write(bootcamp_documents(backends))
    os.chmod(path, 0o644)
    return directory
