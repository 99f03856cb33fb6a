"""Rule documents → one validated :class:`~l4proxy.routing.RouteTable`.

Reads RouteRule (config.istio.io/v1alpha2), VirtualService and
DestinationRule (networking.istio.io v1alpha3/v1beta1/v1), ServiceEntry (the
service registry) and Ingress (extensions/v1beta1, networking.k8s.io/v1) from
multi-document YAML or JSON files and directories (ConfigMap mounts included).
Kubernetes objects (Deployment, Service, ...) are skipped with a note; every
other unknown kind, and every field l4proxy does not implement, is an error.

Public API::

    result = load_rules(["rules/"], namespace="default", domain="cluster.local")
    result.table     # RouteTable
    result.notes     # warnings and notes (skipped objects, services not yet known)
    result.sources   # files read
    # raises ConfigUnreadable (a path cannot be read) or ConfigError (invalid)
"""

from l4proxy.config._errors import (
    ConfigError,
    ConfigUnreadable,
    Diagnostic,
    ObjectSummary,
    Severity,
)
from l4proxy.config._loader import RULE_KINDS, RULE_SUFFIXES, LoadResult, load_rules, rule_files
from l4proxy.config._yaml import DEFAULT_MAX_BYTES, DEFAULT_MAX_NODES

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_NODES",
    "RULE_KINDS",
    "RULE_SUFFIXES",
    "ConfigError",
    "ConfigUnreadable",
    "Diagnostic",
    "LoadResult",
    "ObjectSummary",
    "Severity",
    "load_rules",
    "rule_files",
]
