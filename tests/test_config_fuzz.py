"""Fuzz invariant for the kind readers: load, or raise ConfigError; never anything else.

Valid documents of every kind are mutated at one random place (a value
replaced by another JSON value, a key dropped); whatever comes out, the loader
must answer with a table or with diagnostics, never with a traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4proxy.rules import ConfigError, load_rules

DATA = os.path.join(os.path.dirname(__file__), "data", "rules")

EXTRA = """\
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {name: jason, namespace: default}
spec:
  destination: {name: reviews, namespace: default, domain: cluster.local}
  precedence: 2
  match:
    source: {labels: {app: client}}
    request:
      headers:
        cookie: {regex: "^(.*?;)?(user=jason)(;.*)?$"}
        uri: {prefix: /api}
  route:
  - {labels: {version: v1}, weight: 30}
  - {labels: {version: v2}, weight: 70}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web}
spec:
  defaultBackend: {service: {name: bootcamp, port: {number: 8080}}}
  rules:
  - host: a.example.com
    http:
      paths:
      - {path: /x, pathType: Prefix, backend: {service: {name: bootcamp, port: {name: http}}}}
---
apiVersion: extensions/v1beta1
kind: Ingress
metadata: {name: old}
spec:
  rules:
  - http:
      paths:
      - {path: /bootcamp.*, backend: {serviceName: bootcamp, servicePort: 8080}}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: tcp}
spec:
  hosts: [db]
  tcp:
  - match: [{port: 5432, sourceLabels: {app: x}}]
    route: [{destination: {host: db, port: {number: 5432}}}]
"""


def _base_documents() -> list[Any]:
    docs: list[Any] = []
    for name in ("registry.yaml", "vs-50-v2.yaml"):
        with open(os.path.join(DATA, name)) as f:
            docs.extend(yaml.safe_load_all(f))
    docs.extend(yaml.safe_load_all(EXTRA))
    return docs


BASE = _base_documents()


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_paths(v, (*prefix, i)))
    return out


ALL_PATHS = [p for p in _paths(BASE) if len(p) > 1]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.text(max_size=8)
    | st.sampled_from(["v1", "/", "HTTP", "bootcamp", "*", "Foo-Bar", "(", "", "8080"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _mutate(path: tuple[Any, ...], new: Any, drop: bool) -> list[Any]:
    docs = json.loads(json.dumps(BASE))
    parent = docs
    for part in path[:-1]:
        parent = parent[part]
    if drop and isinstance(parent, dict):
        del parent[path[-1]]
    elif drop and isinstance(parent, list):
        parent.pop(path[-1])
    else:
        parent[path[-1]] = new
    return list(docs)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_PATHS), json_values, st.booleans())
def test_mutated_documents_load_or_raise_config_error(
    path: tuple[Any, ...], new: Any, drop: bool
) -> None:
    docs = _mutate(path, new, drop)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(docs, f)
    try:
        load_rules([f.name])
    except ConfigError as exc:
        assert exc.diagnostics
        assert all(d.message for d in exc.diagnostics)
    finally:
        os.unlink(f.name)


def test_the_unmutated_base_is_valid() -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(BASE, f)
    try:
        result = load_rules([f.name])
    finally:
        os.unlink(f.name)
    assert len(result.table.services()) == 1
