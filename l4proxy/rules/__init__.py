"""The control side: rule documents → one validated route table, and its upkeep.

This package decides; it never moves a byte. Its modules:

* this ``__init__`` and the ``_``-modules: the loaders, one per API
  (``_routerule``, ``_networking``, ``_istio_gateway_servers``, ``_ingress``,
  ``_gateway_api``), the binding of VirtualServices to Istio Gateways
  (``_istio_gateway``), the
  bounded YAML reader (``_yaml``), the schema and diagnostics (``_schema``,
  ``_errors``), header edits as both APIs write them (``_header_ops``) and
  as the table merges them and builds redirects (``_edits``), and the
  compiler from drafts to a table (``_table``);
* :mod:`~l4proxy.rules.routing`: the model (:class:`RouteTable`) and the
  sans-IO selection (route, weighted subset, endpoint order);
* :mod:`~l4proxy.rules.classify`: what a connection or request is (inbound,
  passthrough, refused, a service's port), as a pure function;
* :mod:`~l4proxy.rules.watch`, :mod:`~l4proxy.rules.dns`,
  :mod:`~l4proxy.rules.health`: reloads, DNS endpoints, outlier detection;
* :mod:`~l4proxy.rules.validate`, :mod:`~l4proxy.rules.apply`: the
  ``l4proxy validate`` and ``create|replace|delete`` commands.

Rule documents → one validated :class:`~l4proxy.rules.routing.RouteTable`.

Reads RouteRule (config.istio.io/v1alpha2), VirtualService, DestinationRule
and Gateway (networking.istio.io v1alpha3/v1beta1/v1), ServiceEntry (the
service registry), Ingress (extensions/v1beta1, networking.k8s.io/v1) and the
Gateway API's HTTPRoute, Gateway and ReferenceGrant (gateway.networking.k8s.io)
from multi-document YAML or JSON files and directories (ConfigMap mounts
included).
Kubernetes objects (Deployment, Service, ...) are skipped with a note; every
other unknown kind, and every field l4proxy does not implement, is an error.

Public API::

    result = load_rules(["rules/"], namespace="default", domain="cluster.local")
    result.table     # RouteTable
    result.notes     # warnings and notes (skipped objects, services not yet known)
    result.sources   # files read
    # raises ConfigUnreadable (a path cannot be read) or ConfigError (invalid)
"""

from l4proxy.rules._errors import (
    UNATTACHED,
    UNRESOLVED,
    ConfigError,
    ConfigUnreadable,
    Diagnostic,
    ObjectSummary,
    RouteParentRef,
    Severity,
)
from l4proxy.rules._loader import RULE_KINDS, RULE_SUFFIXES, LoadResult, load_rules, rule_files
from l4proxy.rules._yaml import DEFAULT_MAX_BYTES, DEFAULT_MAX_NODES

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_NODES",
    "RULE_KINDS",
    "RULE_SUFFIXES",
    "UNATTACHED",
    "UNRESOLVED",
    "ConfigError",
    "ConfigUnreadable",
    "Diagnostic",
    "LoadResult",
    "ObjectSummary",
    "RouteParentRef",
    "Severity",
    "load_rules",
    "rule_files",
]
